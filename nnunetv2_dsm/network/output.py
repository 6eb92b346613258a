"""The DSM network's output contract, and nnU-Net's view of it at prediction time.

:class:`DSMOutput` is the one structure ``DSMNetwork.forward`` returns, in training and at inference (Mask2Former's
``pred_masks`` / ``aux_outputs``): the class logits, the per-layer predictions, the Eq. 20 log-probabilities and the
final queries and pixel embedding that inference heads (free-text prompts, anomaly maps) read.

nnU-Net's predictor (``nnUNetv2_predict``, the trainers' final validation, ``nnUNetv2_dsm_predict``) expects a
module whose forward returns one logits tensor with ``label_manager.num_segmentation_heads`` channels.
:class:`PredictionNetwork` is that thin adapter: the 45 class logits (classes the model was not trained on answer
"absent"), followed by the channels of any inference heads. It holds no weights of its own and loads and saves
exactly the DSM network's state dict, so nnU-Net's checkpoints load into it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Protocol, Sequence

import torch
from torch import nn

from nnunetv2_dsm.labels import NUM_ORGANS
from nnunetv2_dsm.network.host_gate import TUMOR_HOST_CHANNELS

ABSENT_LOGIT = -20.0  # sigmoid(-20) ≈ 2e-9: the answer of a class without a (trained) query


@dataclass
class DSMOutput:
    """What ``DSMNetwork.forward`` returns.

    logits                 (B, 45, *S)  mask logits at the input resolution (sigmoid, multi-label): the 25 organ
                           channels are organ *tissue* (trained without the organ's annotated tumors, so that Eq. 14
                           can read them), the 20 tumor channels the tumors (host-gated: ``network.host_gate``);
                           :func:`label_table_logits` turns them into the label table's regions (an organ includes
                           its tumors)
    layers                 [(B, 25 [+ 20], *S_l)]  each kMMM layer's organ [and tumor] responses, fine → coarse
                           (the deep-supervision predictions; each layer's organs feed its anomaly prompt, Eq. 14–15)
    queries                (B, N, D)    the final organ [and tumor] queries
    pixel_embedding        (B, Dp, *S)  the unit-norm final pixel embedding (mask_j = <embedding, kernel_j> + b_j)
    query_class_log_probs  (B, N, 45)   Eq. 20's log p_j(k) (Stage 2), else None
    """
    logits: torch.Tensor
    layers: List[torch.Tensor]
    queries: torch.Tensor
    pixel_embedding: torch.Tensor
    query_class_log_probs: Optional[torch.Tensor] = None

    def predictions(self) -> List[torch.Tensor]:
        """[final logits, layer outputs fine → coarse]: one per deep-supervision target."""
        return [self.logits, *self.layers]


class InferenceHead(Protocol):
    """Extra prediction channels computed from a forward pass: ``head(network, output) -> (B, C, *S)``."""
    num_channels: int

    def __call__(self, network: nn.Module, output: DSMOutput) -> torch.Tensor: ...


# (host, tumor) channel pairs, 0-based, of the tumors with a single host organ: the label table counts such a tumor's
# voxels for its host ("tumor inside that host"). A tumor of a paired organ is written "host not encoded"
# (labels.regions_class_order), so it is counted for neither side.
SINGLE_HOST_TUMORS = tuple((hosts[0], NUM_ORGANS + t) for t, hosts in enumerate(TUMOR_HOST_CHANNELS) if len(hosts) == 1)


def label_table_logits(logits: torch.Tensor) -> torch.Tensor:
    """Organ tissue → the label table's organ regions: logits (B, 45, *S) → (B, 45, *S) where organ h becomes
    max(tissue_h, tumor_t for every tumor t whose single host is h) (sigmoid is monotone: the union of the two
    masks); tumor channels and the organs of paired hosts are unchanged."""
    regions = logits.clone()
    for host, tumor in SINGLE_HOST_TUMORS:
        regions[:, host] = torch.maximum(regions[:, host], logits[:, tumor])
    return regions


# (host channels, tumor channel), 0-based, of the tumors whose host is one of a pair (kidneys, adrenals, lungs)
PAIRED_HOST_TUMORS = tuple((hosts, NUM_ORGANS + t) for t, hosts in enumerate(TUMOR_HOST_CHANNELS) if len(hosts) > 1)


def exclusive_classes(logits: torch.Tensor) -> torch.Tensor:
    """Organ tissue and tumor logits (B, 45, *S) → (B, 45, *S) with at most one organ per voxel, the most
    confident: every other organ channel is capped at 0 (sigmoid ≤ 0.5, so nnU-Net's label map does not write
    it). A tumor of a paired host (kidney, adrenal, lung) is also capped where one of its hosts' tissue is more
    confident than the tumor. Tumors of a single host are unchanged.

    The sigmoid masks are trained one class at a time and overlap where the model is unsure. nnU-Net writes the
    regions in ``regions_class_order``, and the last one above 0.5 wins, whatever its confidence. After the
    accuracy benchmark's Stage 2 (seed 0) the aorta and the stomach had been found but lost their voxels to later
    organs (aorta DSC 0.03). TotalSegmentator's softmax argmax makes the same one-organ-per-voxel choice.

    Tumors are written after the organs. A single-host tumor's label keeps its host (liver tumor = liver + tumor),
    so overriding costs the organ nothing. A paired host's tumor is written without its side, so a faint kidney-tumor
    mask over a kidney erased that kidney (left kidney DSC 0.01; 0.36 when the tumor has to beat the kidney).
    Letting every tumor compete with its host cost the liver tumors (DSC 0.145 → 0.000: the liver tissue channel
    stays above the tumor inside them)."""
    organs = logits[:, :NUM_ORGANS]
    winner = torch.zeros_like(organs, dtype=torch.bool).scatter_(1, organs.argmax(1, keepdim=True), True)
    out = torch.cat((torch.where(winner, organs, organs.clamp(max=0.0)), logits[:, NUM_ORGANS:]), 1)
    for hosts, tumor in PAIRED_HOST_TUMORS:
        host_wins = logits[:, list(hosts)].amax(1) >= logits[:, tumor]
        out[:, tumor] = torch.where(host_wins, logits[:, tumor].clamp(max=0.0), logits[:, tumor])
    return out


def mask_untrained_classes(logits: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """logits (B, 45, *S), trained (45,) bool → logits with every untrained class at ABSENT_LOGIT."""
    if bool(trained.all()):
        return logits
    keep = trained.to(logits.device).reshape(1, -1, *[1] * (logits.ndim - 2))
    return torch.where(keep, logits, logits.new_tensor(ABSENT_LOGIT))


class PredictionNetwork(nn.Module):
    """nnU-Net's predictor's view of a DSM network: ``forward(x) -> (B, 45 + Σ head channels, *S)``.

    The classes no training case annotated (the network's ``trained_classes`` record) answer ABSENT_LOGIT: their
    queries never had a loss, and their masks would overwrite trained organs in nnU-Net's label map. Each voxel
    keeps at most one organ, the most confident, and a paired host's tumor only where it beats its host
    (:func:`exclusive_classes`); the organ channels then take in their single-host tumors (:func:`label_table_logits`), as the label table defines them. ``heads`` add
    channels after the classes (``nnunetv2_dsm.inference.open_vocabulary``). ``state_dict``/``load_state_dict``
    are the DSM network's own, so nnU-Net's checkpoints and fold switching work unchanged."""

    def __init__(self, network: nn.Module, heads: Sequence[InferenceHead] = ()):
        super().__init__()
        self.network = network
        self.heads = list(heads)

    @property
    def num_extra_channels(self) -> int:
        return sum(h.num_channels for h in self.heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        logits = label_table_logits(exclusive_classes(mask_untrained_classes(out.logits,
                                                                             self.network.trained_classes)))
        extra = [head(self.network, out).to(logits.dtype) for head in self.heads]
        return torch.cat([logits, *extra], 1) if extra else logits

    def state_dict(self, *args, **kwargs):
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)
