"""A tumor is found inside its host organ where the host's tissue response fails: the host gate of the tumor masks.

A tumor channel t is a conjunction of two logits (a fuzzy AND, the minimum of the log-odds):

    tumor_t = min( a_t , −max_{h ∈ hosts(t)} R_h )                                  (B, 20, *S)

* a_t, the tumor query's own mask logit: "inside the region where this tumor can be", which may include the host
  tissue around the tumor;
* −max_h R_h, Eq. 14's anomaly score restricted to the tumor's host organ(s) (labels.TUMOR_HOSTS; both kidneys
  for a kidney tumor): "no host tissue here". The organ channels are organ *tissue*, trained without the tumors
  (training/loss.py: organ_targets_without_tumors), so they are low exactly inside the tumors.

Why (docs/accuracy.md, diagnosis of 2026-12-05): with the query mask alone, a sigmoid mask trained on a small tumor
inside a large organ learned the organ. The liver-tumor kernel ended at cosine 0.95 with the liver's, the channel
ranked liver tissue above tumor (AUROC 0.19–0.23 inside the liver), and every tumor-free liver of the test set was
labelled tumor. The tumor query alone must separate the tumor from the tissue around it. Through the gate it only
has to find the tumor's neighbourhood; the host's tissue, which Stage 1 learned, must be absent there. The tumor
loss then also trains the host tissue to fail inside the tumors, which is what Eq. 14 reads. This is this project's
design, not the paper's (docs/fidelity.md): DSM feeds the anomaly score to the tumor queries as an attention prompt
(Eq. 15, 19) and reads their masks alone.

The gradient of the minimum flows to the smaller argument: where the tumor query claims too much the loss lowers
a_t, and where the host tissue claims a tumor voxel it lowers the host.
"""
from __future__ import annotations

from typing import Tuple

import torch

from nnunetv2_dsm.labels import NUM_ORGANS, NUM_TUMORS, TUMOR_HOSTS, TUMOR_NAMES, class_index

# host organ channels (0-based, organs) of each tumor channel (0-based, tumors), in tumor order; the one
# translation of labels.TUMOR_HOSTS into channels (network/output.py and training/synthetic_lesions.py read it too)
TUMOR_HOST_CHANNELS: Tuple[Tuple[int, ...], ...] = tuple(
    tuple(class_index(h) - 1 for h in TUMOR_HOSTS[name]) for name in TUMOR_NAMES)
# each tumor's first and last host channel (the same channel for a single host): −max over its hosts is
# −max(R[first], R[last]), two gathers for all 20 tumors (no host set has more than two organs)
_FIRST_HOST = [hosts[0] for hosts in TUMOR_HOST_CHANNELS]
_LAST_HOST = [hosts[-1] for hosts in TUMOR_HOST_CHANNELS]
assert all(len(hosts) <= 2 for hosts in TUMOR_HOST_CHANNELS)


def host_gated_tumor_logits(tumor_logits: torch.Tensor, organ_logits: torch.Tensor) -> torch.Tensor:
    """tumor_t = min(a_t, −max_{h ∈ hosts(t)} R_h): tumor query logits a (B, 20, *S) and organ tissue logits
    R (B, 25, *S) of the same resolution → gated tumor logits (B, 20, *S) (module docstring)."""
    if tumor_logits.shape[1] != NUM_TUMORS or organ_logits.shape[1] != NUM_ORGANS:
        raise ValueError(f"expected (B, {NUM_TUMORS}, *S) tumor and (B, {NUM_ORGANS}, *S) organ logits, got "
                         f"{tuple(tumor_logits.shape)} and {tuple(organ_logits.shape)}")
    no_host = -torch.maximum(organ_logits[:, _FIRST_HOST], organ_logits[:, _LAST_HOST])
    return torch.minimum(tumor_logits, no_host.to(tumor_logits.dtype))


def gate_tumor_channels(logits: torch.Tensor) -> torch.Tensor:
    """Organ tissue and tumor query logits (B, 45, *S) → the same with the 20 tumor channels host-gated."""
    return torch.cat((logits[:, :NUM_ORGANS],
                      host_gated_tumor_logits(logits[:, NUM_ORGANS:], logits[:, :NUM_ORGANS])), 1)
