"""The DSM network: nnU-Net's planned U-Net + the kMMM decoder (Stage 1) + tumour-query refinement (Stage 2).

Stage 1 (paper §4.1): 25 learnable organ queries pass four kMMM layers over the four coarsest encoder scales
(coarse → fine); the final masks are the inner products of the organ query embeddings with a pixel embedding of
the last decoder feature map (sigmoid, multi-label). Stage 1 has no tumour queries: its 20 tumour channels are a
constant "absent" logit, so the network still answers all 45 regions nnU-Net expects.

Stage 2 (paper §4.2) adds 20 tumour queries. At every scale: the anomaly prompt from that layer's organ-query
responses (Eq. 14–15), the semantic diffusion of the scale's features guided by the coarser scale (Eq. 16–18),
prompt-masked cross-attention of the tumour queries (Eq. 19), then organ and tumour queries attend to each other.
Class k's mask is query k's mask (index match); the CLIP class-prompt alignment (Eq. 20) learns to name the
queries, and free-text prompts mix the masks of the trained queries that match them (network/alignment.py).

Output: raw logits (B, 45, *S). With ``deep_supervision`` on, a list [final, layer 4, ..., layer 1] — the
per-layer predictions fine → coarse, which the trainer supervises (kMaX-style auxiliary losses).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_dsm.labels import NUM_CLASSES, NUM_ORGANS, NUM_TUMOURS
from nnunetv2_dsm.network.alignment import ClassPromptAlignment
from nnunetv2_dsm.network.backbone import UNetFeatures, kmmm_stage_indices
from nnunetv2_dsm.network.kmeans_layer import KMeansMaskMambaLayer, conv1x1, mask_logits

ABSENT_LOGIT = -20.0  # sigmoid(-20) ≈ 2e-9: Stage 1's answer for the tumour channels it has no queries for


def mask_untrained_classes(logits: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """logits (B, 45, *S), trained (45,) bool → logits with every untrained class at ABSENT_LOGIT."""
    if bool(trained.all()):
        return logits
    keep = trained.to(logits.device).reshape(1, -1, *[1] * (logits.ndim - 2))
    return torch.where(keep, logits, logits.new_tensor(ABSENT_LOGIT))


@dataclass(frozen=True)
class DSMArchitecture:
    """Widths of the DSM decoders. Defaults follow kMaX/DSM (query width 256, mask embedding 128, 8 heads);
    a plans configuration may override any of them under the key ``"dsm_architecture"``."""
    dim: int = 256
    mask_dim: int = 128
    pixel_dim: int = 32
    num_heads: int = 8
    ffn_dim: int = 1024

    @classmethod
    def from_plans(cls, configuration: Dict, default: "DSMArchitecture") -> "DSMArchitecture":
        override = dict(configuration.get("dsm_architecture", {}))
        unknown = set(override) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} under 'dsm_architecture' in the plans; allowed: "
                             f"{[f.name for f in fields(cls)]}")
        return cls(**{**asdict(default), **override})


class DSMNetwork(nn.Module):
    def __init__(self, backbone: UNetFeatures, stage: int, arch: DSMArchitecture = DSMArchitecture(),
                 ndim: int = 3, deep_supervision: bool = True):
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.stage, self.arch, self.deep_supervision = stage, arch, deep_supervision
        # Inference only: a callable adding channels after the 45 classes when deep supervision is off
        # (nnunetv2_dsm.inference.open_vocabulary: free-text prompt masks, the anomaly map). Not part of the weights.
        self.inference_extras = None
        # Inference: classes no training case annotated answer ABSENT_LOGIT (their queries never got a loss; left
        # as they are, their masks overwrite trained classes in nnU-Net's label map). Set by the trainer, saved in
        # the checkpoint; all True until then.
        self.register_buffer("trained_classes", torch.ones(NUM_CLASSES, dtype=torch.bool))
        self.backbone = backbone
        self.scale_indices = kmmm_stage_indices(len(backbone.encoder_channels))
        chans = [backbone.encoder_channels[i] for i in self.scale_indices]
        self.organ_queries = nn.Parameter(torch.randn(NUM_ORGANS, arch.dim))  # unit scale, as kMaX's cluster centres
        self.kmmm = nn.ModuleList(KMeansMaskMambaLayer(c, arch.dim, arch.mask_dim, NUM_ORGANS, arch.num_heads,
                                                       arch.ffn_dim, ndim) for c in chans)
        self.pixel_head = nn.Sequential(conv1x1(backbone.decoder_channels, arch.pixel_dim, ndim),
                                        nn.GroupNorm(4, arch.pixel_dim), nn.GELU(),
                                        conv1x1(arch.pixel_dim, arch.pixel_dim, ndim))
        self.final_norm = nn.LayerNorm(arch.dim)
        self.final_kernel = nn.Linear(arch.dim, arch.pixel_dim)
        self.final_bias = nn.Linear(arch.dim, 1)
        if stage == 2:
            from nnunetv2_dsm.network.tumour_refinement import TumourQueryRefinement
            self.tumour = TumourQueryRefinement(chans, arch, ndim)
            self.alignment = ClassPromptAlignment(arch.dim, NUM_CLASSES)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "trained_classes", torch.ones(NUM_CLASSES, dtype=torch.bool))  # older files
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def query_kernels(self, queries: torch.Tensor):
        """Final mask kernels (B, N, Dp) and biases (B, N) of the queries: mask_j = <pixel embedding, kernel_j> + b_j."""
        h = self.final_norm(queries)
        return self.final_kernel(h), self.final_bias(h)[..., 0]

    def forward(self, x: torch.Tensor, return_extras: bool = False):
        skips, decoded = self.backbone(x)
        features = [skips[i] for i in self.scale_indices]
        queries = self.organ_queries.expand(x.shape[0], -1, -1)
        aux: List[torch.Tensor] = []
        extras: Dict[str, torch.Tensor] = {}
        tumour_state = self.tumour.init_state(x.shape[0]) if self.stage == 2 else None
        organ_response = None
        for layer, feat in zip(self.kmmm, features):
            queries, organ_response, pixel, pixel_embedding = layer(queries, feat)
            response = organ_response
            if self.stage == 2:
                queries, tumour_state, tumour_logits = self.tumour.refine(
                    queries, tumour_state, feat, organ_response, pixel_embedding)
                response = torch.cat((organ_response, tumour_logits), 1)
            aux.append(response)
        if self.stage == 2:
            queries = torch.cat((queries, tumour_state["queries"]), 1)
            extras["query_class_log_probs"] = self.alignment(queries)
        pixel_embedding = F.normalize(self.pixel_head(decoded), dim=1)
        kernels, biases = self.query_kernels(queries)
        logits = mask_logits(pixel_embedding, kernels) + biases.reshape(*biases.shape, *[1] * (x.ndim - 2))
        if self.stage == 1:
            absent = logits.new_full((logits.shape[0], NUM_TUMOURS, *logits.shape[2:]), ABSENT_LOGIT)
            logits = torch.cat((logits, absent), 1)
        if not self.deep_supervision:
            logits = mask_untrained_classes(logits, self.trained_classes)
        if not self.deep_supervision and self.inference_extras is not None:
            extra = self.inference_extras(self, queries, pixel_embedding, logits, organ_response)
            logits = torch.cat((logits, extra), 1)
        out = [logits] + aux[::-1] if self.deep_supervision else logits
        return (out, extras) if return_extras else out
