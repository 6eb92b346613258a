"""The DSM network: nnU-Net's planned U-Net + the kMMM decoder (Stage 1) + tumor-query refinement (Stage 2).

Stage 1 (paper §4.1): 25 learnable organ queries pass four kMMM layers over the four coarsest encoder scales
(coarse → fine); the final masks are the inner products of the organ query embeddings with a pixel embedding of
the last decoder feature map (sigmoid, multi-label). Stage 1 has no tumor queries: its 20 tumor channels are a
constant "absent" logit, so the network still answers all 45 regions nnU-Net expects.

Stage 2 (paper §4.2) adds 20 tumor queries. At every scale: the anomaly prompt from that layer's organ-query
responses (Eq. 14–15), the semantic diffusion of the scale's features guided by the coarser scale (Eq. 16–18),
prompt-masked cross-attention of the tumor queries (Eq. 19), then organ and tumor queries attend to each other.
Class k's mask is query k's mask (index match), a tumor's gated by its host organ's tissue (``network.host_gate``:
tumor = min(tumor query mask, −host tissue), at every layer and at the end); the CLIP class-prompt alignment (Eq. 20)
learns to name the queries, and free-text prompts mix the masks of the trained queries that match them
(network/alignment.py).

Output: one structure, :class:`nnunetv2_dsm.network.output.DSMOutput` (mask logits (B, 45, *S) whose organ channels
are organ tissue without the tumors, so that Eq. 14 can read them at full resolution; the label table's regions are
``output.label_table_logits`` of them; the per-layer
predictions fine → coarse that the trainer supervises kMaX-style, the final queries and pixel embedding, Eq. 20's
log-probabilities). nnU-Net's predictor sees it through ``output.PredictionNetwork``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_dsm.labels import NUM_CLASSES, NUM_ORGANS, NUM_TUMORS
from nnunetv2_dsm.network.alignment import ClassPromptAlignment
from nnunetv2_dsm.network.backbone import UNetFeatures, kmmm_stage_indices
from nnunetv2_dsm.network.host_gate import gate_tumor_channels
from nnunetv2_dsm.network.kmeans_layer import KMeansMaskMambaLayer, centre_queries, conv1x1, mask_logits
from nnunetv2_dsm.network.output import ABSENT_LOGIT, DSMOutput

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


# Narrow decoders for tests, demos and CPU benchmarks (the ``_tiny``/``_demo`` trainer variants)
TINY_ARCHITECTURE = DSMArchitecture(dim=64, mask_dim=32, pixel_dim=16, num_heads=4, ffn_dim=128)


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
        self.identity_norm = nn.LayerNorm(arch.dim)
        self.final_kernel = nn.Linear(arch.dim, arch.pixel_dim)
        self.final_bias = nn.Linear(arch.dim, 1)
        if stage == 2:
            from nnunetv2_dsm.network.tumor_refinement import TumorQueryRefinement
            self.tumor = TumorQueryRefinement(chans, arch, ndim)
            self.alignment = ClassPromptAlignment(arch.dim, NUM_CLASSES)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "trained_classes", torch.ones(NUM_CLASSES, dtype=torch.bool))  # older files
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def identity_queries(self, n: int) -> torch.Tensor:
        """The learnable queries the decoder starts from, (n, D): the 25 organ queries, then (Stage 2, n = 45) the
        20 tumor queries. They are each class's own parameters, shared by no other class."""
        if n == NUM_ORGANS:
            return self.organ_queries
        return torch.cat((self.organ_queries, self.tumor.queries), 0)

    def query_kernels(self, queries: torch.Tensor):
        """Final mask kernels (B, N, Dp) and biases (B, N) of the queries: mask_j = <pixel embedding, kernel_j> + b_j.
        The kernels read the queries centred within their group (organs, tumors: ``centre_queries``) plus, at the
        same scale (both layer-normed), the class's own starting query (``identity_queries``, centred the same way);
        the biases read the queries themselves.

        The identity term: after the four kMMM layers a query is mostly the shared updates it received (norm 8 at the
        start, 40–74 at the end of the benchmark's trainings), so queries that claimed similar voxels (the bright
        kidneys and aorta) left the decoder nearly parallel and their kernels with them: on the seed-1 budget-2
        Stage 2 model the left-kidney and aorta kernels had cosine 1.00 (and the same norm and bias), and both masks
        covered both organs on the training cases that annotate them; on the seed-1 budget-1 Stage 1 model the two
        kidney kernels had cosine 0.98. The class's own query gives its kernel a part that no other class shares
        (as Mask2Former re-adds each query's learnable positional embedding at every layer)."""
        identity = centre_queries(self.identity_queries(queries.shape[1])[None], NUM_ORGANS)
        kernel_in = self.final_norm(centre_queries(queries, NUM_ORGANS)) + self.identity_norm(identity)
        return self.final_kernel(kernel_in), self.final_bias(self.final_norm(queries))[..., 0]

    def forward(self, x: torch.Tensor) -> DSMOutput:
        """x (B, C, *S) → :class:`DSMOutput`."""
        skips, decoded = self.backbone(x)
        queries = self.organ_queries.expand(x.shape[0], -1, -1)
        layers: List[torch.Tensor] = []
        tumor_state = self.tumor.init_state(x.shape[0]) if self.stage == 2 else None
        for layer, feat in zip(self.kmmm, (skips[i] for i in self.scale_indices)):
            queries, organ_response, _, pixel_embedding = layer(queries, feat)
            if self.stage == 2:
                queries, tumor_state, tumor_logits = self.tumor.refine(
                    queries, tumor_state, feat, organ_response, pixel_embedding, self.trained_classes[:NUM_ORGANS])
                organ_response = gate_tumor_channels(torch.cat((organ_response, tumor_logits), 1))
            layers.insert(0, organ_response)                    # fine → coarse
        log_p = None
        if self.stage == 2:
            queries = torch.cat((queries, tumor_state["queries"]), 1)
            log_p = self.alignment(queries)
        pixel_embedding = F.normalize(self.pixel_head(decoded), dim=1)
        kernels, biases = self.query_kernels(queries)
        logits = mask_logits(pixel_embedding, kernels, biases)
        if self.stage == 2:
            logits = gate_tumor_channels(logits)
        else:
            absent = logits.new_full((logits.shape[0], NUM_TUMORS, *logits.shape[2:]), ABSENT_LOGIT)
            logits = torch.cat((logits, absent), 1)
        return DSMOutput(logits, layers, queries, pixel_embedding, log_p)
