"""Diffusion-guided query refinement (DQR) of the tumor queries: paper §4.2.1–4.2.2, Eq. 14–19.

At kMMM scale l (coarse → fine), after the organ queries' kMMM update:

1. anomaly mask visual prompt from the organ-query responses R_l (Eq. 14–15): voxels whose normalised
   −max_n R_l exceeds 0.5 are the ones tumor queries may attend to;
2. semantic diffusion of the scale's features F_l guided by the coarser scale's enhanced features (Eq. 16–18;
   the coarsest scale guides itself);
3. prompt-masked cross-attention of the tumor queries over the enhanced features (Eq. 19);
4. organ and tumor queries concatenated → self-attention → FFN ("we then concatenate organ and tumor queries
   and apply self-attention among them");
5. per-layer tumor mask logits for deep supervision.

These are the paper's four diffusion-guided decoder layers (§5.3). The official code adds a fifth diffusion on the
full-resolution decoder feature; it is left out here: it cost Stage 2 a quarter of its training step, 4 GB of
memory and most of its extra prediction time over Stage 1 (docs/performance.md), for a step the paper does not
describe.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn

from nnunetv2_dsm.labels import NUM_TUMORS
from nnunetv2_dsm.network.anomaly import anomaly_prompt
from nnunetv2_dsm.network.kmeans_layer import mask_logits
from nnunetv2_dsm.network.attention import QuerySelfAttention
from nnunetv2_dsm.network.prompt_attention import PromptMaskedCrossAttention
from nnunetv2_dsm.network.semantic_diffusion import SemanticDiffusion


def zero_init_(*layers: nn.Linear) -> None:
    """Zero the weights and biases of the output layers of residual branches (kMaX-DeepLab, ReZero): each branch then
    starts as the identity."""
    for layer in layers:
        nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


class TumorQueryRefinement(nn.Module):
    """Stage 2's additions at each kMMM scale (module docstring). The organ–tumor self-attention blocks start as the
    identity (their residual output layers are zero), so a fresh Stage 2 network returns exactly the organ queries,
    and hence the organ logits, of the Stage 1 model it starts from."""

    def __init__(self, feature_channels: Sequence[int], arch, ndim: int = 3):
        super().__init__()
        chans = list(feature_channels)
        self.queries = nn.Parameter(torch.randn(NUM_TUMORS, arch.dim))  # unit scale, as kMaX's cluster centres
        self.diffusion = nn.ModuleList(SemanticDiffusion(c, chans[max(i - 1, 0)]) for i, c in enumerate(chans))
        self.cross_attention = nn.ModuleList(
            PromptMaskedCrossAttention(arch.dim, c, num_heads=arch.num_heads) for c in chans)
        self.interaction = nn.ModuleList(
            QuerySelfAttention(arch.dim, num_heads=arch.num_heads, ffn_dim=arch.ffn_dim) for _ in chans)
        for block in self.interaction:
            zero_init_(block.out, block.ffn[-1])
        self.kernel_norm = nn.ModuleList(nn.LayerNorm(arch.dim) for _ in chans)
        self.kernel = nn.ModuleList(nn.Linear(arch.dim, arch.mask_dim) for _ in chans)

    def init_state(self, batch_size: int) -> Dict:
        return {"queries": self.queries.expand(batch_size, -1, -1), "guide": None, "layer": 0}

    def refine(self, organ_queries: torch.Tensor, state: Dict, features: torch.Tensor,
               organ_response: torch.Tensor, pixel_embedding: torch.Tensor, organs: Optional[torch.Tensor] = None):
        """One scale: organ queries (B, No, D), features (B, C, *S), organ responses (B, No, *S), that layer's
        unit pixel embedding (B, Dm, *S), the trained organs (No,) bool (Eq. 14 reads only their responses; None:
        all) → (organ queries, new state, tumor logits (B, Nt, *S))."""
        i = state["layer"]
        _, attend = anomaly_prompt(organ_response, organs=organs)
        guide = features if state["guide"] is None else state["guide"]
        enhanced = self.diffusion[i](features, guide)
        tumor = self.cross_attention[i](state["queries"], enhanced, attend)
        both = self.interaction[i](torch.cat((organ_queries, tumor), 1))
        organ_queries, tumor = both[:, :organ_queries.shape[1]], both[:, organ_queries.shape[1]:]
        logits = mask_logits(pixel_embedding, self.kernel[i](self.kernel_norm[i](tumor)))
        return organ_queries, {"queries": tumor, "guide": enhanced, "layer": i + 1}, logits

    def extra_repr(self) -> str:
        return f"scales={len(self.diffusion)}, tumor_queries={self.queries.shape[0]}"
