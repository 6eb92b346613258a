"""Prompt-based masked cross-attention of the tumor queries (paper §4.2.2, Eq. 19). The organ–tumor
self-attention that follows it is :class:`nnunetv2_dsm.network.attention.QuerySelfAttention`.

Eq. 19 (Mask2Former masked attention with the anomaly prompt P of Eq. 15 as the mask), per head:

    Q_t ← Q_t + W_o · softmax(q kᵀ / √d_h + M) v,   q = W_q LN(Q_t),  k = W_k LN(F̂),  v = W_v LN(F̂)
    M_{n,v} = 0 where P_v is True (anomalous voxel), −∞ elsewhere

with F̂ the boundary-enhanced features of Eq. 18 flattened to (B, T, C). Guard: a sample whose prompt has no True
voxel attends to every voxel (Mask2Former's rule; otherwise every logit is −∞ and the softmax is NaN). The same
mask applies to every tumor query and head. Attention runs through ``scaled_dot_product_attention`` with a
boolean mask broadcast as (B, 1, 1, T): memory linear in the number of voxels T. No dropout, no positional
encoding (the official TextAttend has none either): the result is invariant to a joint permutation of the voxels
and their prompt.

Deviation from the official ``TextAttend`` (docs/fidelity.md): it adds the prompt as a soft bias
(+0.2·Â / −1) to all 45 queries, post-norm, followed by a gumbel grouping block whose output replaces the queries.
Here the prompt is a hard mask on the tumor queries only, in a pre-norm residual block, as the paper and ZePT
describe. The key projection has no bias: a key bias adds the same logit to every voxel of a query, cancels in
the softmax and would never receive a gradient.
"""
from __future__ import annotations

import torch
from torch import nn

from nnunetv2_dsm.network.attention import multihead_attention


def prompt_mask(attend: torch.Tensor) -> torch.Tensor:
    """The attention mask of Eq. 19 from the anomaly prompt: attend (B, *S) bool → (B, 1, 1, T) bool, True = the
    voxel may be attended. A sample without any True voxel gets all True (the empty-prompt guard)."""
    flat = attend.reshape(attend.shape[0], -1).bool()
    flat = flat | ~flat.any(dim=1, keepdim=True)
    return flat[:, None, None, :]


class PromptMaskedCrossAttention(nn.Module):
    """Eq. 19: tumor queries attend to the boundary-enhanced features inside the anomaly prompt.

    ``forward(queries (B, Nt, D), features (B, C, *S), attend (B, *S) bool) -> (B, Nt, D)``; 2-D or 3-D features.
    Pre-norm residual: Q + W_o · MaskedAttn(W_q LN(Q), W_k LN(F̂), W_v LN(F̂)).
    """

    def __init__(self, dim: int, feat_channels: int, num_heads: int = 8):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.feat_channels, self.num_heads = dim, feat_channels, num_heads
        self.query_norm = nn.LayerNorm(dim)
        self.feature_norm = nn.LayerNorm(feat_channels)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(feat_channels, dim, bias=False)
        self.v = nn.Linear(feat_channels, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, features: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        b, c = features.shape[:2]
        if features.ndim not in (4, 5) or c != self.feat_channels or queries.shape[0] != b \
                or queries.shape[-1] != self.dim:
            raise ValueError(f"expected queries (B,Nt,{self.dim}) and features (B,{self.feat_channels},*S) with "
                             f"2 or 3 spatial dims; got {tuple(queries.shape)} and {tuple(features.shape)}")
        if tuple(attend.shape) != (b, *features.shape[2:]):
            raise ValueError(f"attend must be (B, *S) = {(b, *features.shape[2:])}, got {tuple(attend.shape)}")
        tokens = self.feature_norm(features.reshape(b, c, -1).transpose(1, 2))  # (B, T, C)
        attn = multihead_attention(self.q(self.query_norm(queries)), self.k(tokens), self.v(tokens),
                                   self.num_heads, prompt_mask(attend.to(features.device)))
        return queries + self.out(attn)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, feat_channels={self.feat_channels}, num_heads={self.num_heads}"
