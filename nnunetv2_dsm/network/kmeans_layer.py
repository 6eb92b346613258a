"""The k-means Mask Mamba (kMMM) layer: paper §4.1.1, Eq. 8–10 (k-means cross-attention of kMaX-DeepLab with a
selective SSM over the voxel sequence of the mask logits before the cluster-wise arg-max).

One layer updates N learnable class queries Q (B, N, D) from one scale's pixel features F (B, C, *S):

1. pixel projection P = GELU(GN(Conv1×1(F)))                                              (B, D, *S)
2. query response (Eq. 9): mask logits M = <L2norm(Conv1×1(P)), Linear(LN(Q - mean_n Q))> and the SSM over the voxel
   sequence of those logits, R = M + Mamba(LN(M)) — tokens are voxels (C-order flatten), channels the N logits
3. cluster-wise arg-max assignment (Eq. 10): a hard one-hot without gradient, as in kMaX-DeepLab; voxels that no
   query claims (every response ≤ 0) join the void cluster and update no query. The SSM and the
   mask head learn because R itself is supervised (the official code ran both under no_grad and never supervised
   R: they never trained). A straight-through gradient (softmax backward) was tried and dropped: on one fixed
   batch its loss rose from 1.64 to 1.92 in 30 AdamW steps while the hard assignment's fell to 0.97 in 20
   (docs/fidelity.md)
4. k-means update (Eq. 10): U_n = Σ_v A_nv · V_v, the per-cluster **sum** of values V = Conv1×1(P);
   Q ← Q + Linear(LN(U)) for the queries that won voxels (an empty cluster keeps its centre)
5. query self-attention and FFN (pre-norm residual).

R is returned too: it is the layer's prediction (deep supervision trains it, kMaX style) and the organ-query
response Stage 2 turns into the anomaly prompt.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_dsm.network.attention import QuerySelfAttention
from nnunetv2_dsm.network.ssm import Mamba


def conv1x1(in_ch: int, out_ch: int, ndim: int, bias: bool = True) -> nn.Module:
    return (nn.Conv3d if ndim == 3 else nn.Conv2d)(in_ch, out_ch, 1, bias=bias)


def mask_logits(pixel_embedding: torch.Tensor, kernels: torch.Tensor,
                biases: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Query–pixel affinity (the inner product of Eq. 9): pixel_embedding (B, Dm, *S) with unit-norm channels,
    kernels (B, N, Dm), optional per-query biases (B, N) → logits (B, N, *S)."""
    b, dm = pixel_embedding.shape[:2]
    out = torch.bmm(kernels, pixel_embedding.reshape(b, dm, -1))
    if biases is not None:
        out = out + biases.unsqueeze(-1)
    return out.reshape(b, kernels.shape[1], *pixel_embedding.shape[2:])


def centre_queries(queries: torch.Tensor, group: int = 0) -> torch.Tensor:
    """Each query minus the mean of its group of queries, per channel: queries (B, N, D) → (B, N, D); the first
    ``group`` queries (the organs) and the rest (the tumors) are centred separately (``group`` 0: all together).

    The mask kernels are read from the centred queries (kMaX normalises its mask kernels across the queries with a
    batch norm; a LayerNorm per query does not). Without it the decoder's shared residual updates (self-attention
    with near-uniform weights, the FFN) added one common vector to every query: after Stage 1 of the accuracy
    benchmark (seed 1, 50 iterations) the final kernels of all organs but the liver had pairwise cosine 1.00
    (mean 0.999), every organ mask fired on the same bright voxels (kidneys and aorta), and the label map kept
    only the last-written class there (test DSC 0 for kidneys and aorta). A common shift of the queries now
    leaves the kernels unchanged."""
    if 0 < group < queries.shape[1]:
        return torch.cat((centre_queries(queries[:, :group]), centre_queries(queries[:, group:])), 1)
    return queries - queries.mean(dim=1, keepdim=True)


def kmeans_assignment(response: torch.Tensor) -> torch.Tensor:
    """Cluster-wise arg-max of Eq. 10 with a void cluster: response (B, N, T) → assignment (B, N, T), one-hot over N
    where the voxel's largest response is positive (some query claims it: sigmoid > 0.5), all zero where no query
    claims it (background). Not differentiable (no gradient flows back into the response through it), as in kMaX.

    The void cluster plays the role of kMaX's void/stuff centres and Mask2Former's no-object class: without it every
    background voxel (most of a CT) was summed into some organ's update, so an organ query's centre was mostly made
    of the background its mask had to reject. With sigmoid masks "no query claims the voxel" is the natural void
    criterion, and it needs no extra query or parameter.

    Measured (docs/accuracy.md, "Which queries win the k-means clusters"): in the benchmark's trained models the void
    takes no voxel. The queries of classes no training case annotates get no loss, respond > 0 everywhere and win
    98-100 % of the voxels at every layer; the trained organs win only where their response beats those (Stage 1:
    nowhere; Stage 2: the liver, on 0.3-0.6 % of the finest layer's voxels). Letting only the trained queries
    compete was tried on three seeds: the organ mean moved both ways and the kidney-tumour and cyst AUROCs fell on
    every seed, so it was not kept (nor the same without the void)."""
    with torch.no_grad():
        best, index = response.max(dim=1)
        onehot = F.one_hot(index, response.shape[1]).transpose(1, 2)
        return (onehot * (best > 0).unsqueeze(1)).to(response.dtype)


def kmeans_update(assignment: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """k-means cluster update of Eq. 10 (kMaX): assignment (B, N, T), values (B, D, T) → (B, N, D) float32, the
    per-cluster sum of the values of the voxels assigned to each query.

    Always float32, also under autocast: the sum runs over up to all voxels of a patch (6,588 at initialisation on
    a 128³ patch, more on larger clusters) and overflows float16's 65,504; inf/NaN queries would make GradScaler
    skip every step without a word."""
    with torch.autocast(device_type=values.device.type, enabled=False):
        return torch.bmm(assignment.float(), values.float().transpose(1, 2))


def nonempty_clusters(assignment: torch.Tensor) -> torch.Tensor:
    """(B, N, T) assignment → (B, N, 1) float: 1 where the query won at least one voxel. A query with an empty
    cluster keeps its centre (k-means): without this mask every empty cluster received the same update
    Linear(LN(0)), which at the first layers (one or two queries win every voxel) made all queries nearly
    identical (pairwise cosine 0.97 after layer 1, 0.999 for the final kernels: every class predicted the same
    mask)."""
    return (assignment.sum(-1, keepdim=True) > 0).to(assignment.dtype)


class VoxelSequenceSSM(nn.Module):
    """The SSM of Eq. 9 over the voxel sequence of N mask logits: (B, N, *S) → (B, N, *S), residual."""

    def __init__(self, num_queries: int):
        super().__init__()
        self.norm = nn.LayerNorm(num_queries)
        self.mamba = Mamba(d_model=num_queries, d_state=16, d_conv=4, expand=2)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        b, n = logits.shape[:2]
        tokens = logits.reshape(b, n, -1).transpose(1, 2)  # (B, T, N): voxels in C order
        out = tokens + self.mamba(self.norm(tokens))
        return out.transpose(1, 2).reshape(logits.shape)


class KMeansMaskMambaLayer(nn.Module):
    """One kMMM layer: ``forward(queries (B,N,D), features (B,C,*S)) -> (queries, response (B,N,*S),
    pixel (B,D,*S), pixel_embedding (B,Dm,*S))``."""

    def __init__(self, feature_channels: int, dim: int, mask_dim: int, num_queries: int, num_heads: int,
                 ffn_dim: int, ndim: int = 3):
        super().__init__()
        self.pixel_proj = nn.Sequential(conv1x1(feature_channels, dim, ndim), nn.GroupNorm(8, dim), nn.GELU())
        self.pixel_embed = conv1x1(dim, mask_dim, ndim)
        self.query_norm = nn.LayerNorm(dim)
        self.query_kernel = nn.Linear(dim, mask_dim)
        self.ssm = VoxelSequenceSSM(num_queries)
        self.values = conv1x1(dim, dim, ndim)
        self.update_norm = nn.LayerNorm(dim)
        self.update_proj = nn.Linear(dim, dim)
        self.query_mixing = QuerySelfAttention(dim, num_heads, ffn_dim)

    def response(self, queries: torch.Tensor, pixel: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Eq. 9: mask logits of every query then the voxel-sequence SSM. Returns (response, pixel_embedding)."""
        pixel_embedding = F.normalize(self.pixel_embed(pixel), dim=1)
        logits = mask_logits(pixel_embedding, self.query_kernel(self.query_norm(centre_queries(queries))))
        return self.ssm(logits), pixel_embedding

    def forward(self, queries: torch.Tensor, features: torch.Tensor):
        pixel = self.pixel_proj(features)
        response, pixel_embedding = self.response(queries, pixel)
        b, n = response.shape[:2]
        assignment = kmeans_assignment(response.reshape(b, n, -1))
        update = kmeans_update(assignment, self.values(pixel).reshape(b, pixel.shape[1], -1))  # float32, (B, N, D)
        queries = queries + self.update_proj(self.update_norm(update)) * nonempty_clusters(assignment)
        return self.query_mixing(queries), response, pixel, pixel_embedding
