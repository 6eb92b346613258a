"""A tumor is found inside its host organ where its query beats the host's tissue: the host gate of the tumor masks.

A tumor channel t is its query's mask logit less the host's tissue logit wherever that tissue is claimed:

    tumor_t = a_t − relu( max_{h ∈ hosts(t)} R_h )  =  min( a_t , a_t − max_h R_h )          (B, 20, *S)

* a_t, the tumor query's own mask logit;
* max_h R_h, the tissue logit of the tumor's host organ(s) (labels.TUMOR_HOSTS; both kidneys for a kidney tumor).
  The organ channels are organ *tissue*, trained without the tumors (training/loss.py: organ_targets_without_tumors).

Outside its host (R_h < 0) a tumor is its query's mask. Inside the host it is positive only where the tumor query is
more confident than the host's tissue (a_t > R_h, i.e. sigmoid(a_t) > sigmoid(R_h)): a two-class softmax between
tumor and host, which is how nnU-Net's softmax tells a kidney tumor from its kidney.

Why this form (docs/accuracy.md, log of changes). With the query mask alone, a sigmoid mask trained on a small tumor
inside a large organ learned the organ (the liver-tumor kernel at cosine 0.95 with the liver's, every tumor-free
liver of the test set labelled tumor). The first gate, min(a_t, −R_h), fixed that but left the tumor query nothing
to learn inside its host: there −R_h was the minimum, so the loss reached the host tissue only, and the query was
free to cover the whole host. Probed on the seed-1 Stage 2 model: the kidney-tumor query answered +4.2 in the left
kidney's tissue and +3.6 inside its tumors, the cyst query −1 inside the cysts, and the kidney tissue +3.1 inside
the tumors against +3.2 in the kidney, so no kidney tumor or cyst was ever found (DSC 0 on every seed). Here, inside
the host, the loss reaches both: the tumor query learns to rise above the host tissue on tumor voxels and to stay
below it on tissue voxels, and the host tissue is still pushed down inside the tumors, which Eq. 14 reads. This is
this project's design, not the paper's (docs/fidelity.md): DSM feeds the anomaly score to the tumor queries as an
attention prompt (Eq. 15, 19) and reads their masks alone.
"""
from __future__ import annotations

from typing import Tuple

import torch

from nnunetv2_dsm.labels import NUM_ORGANS, NUM_TUMORS, TUMOR_HOSTS, TUMOR_NAMES, class_index

# host organ channels (0-based, organs) of each tumor channel (0-based, tumors), in tumor order; the one
# translation of labels.TUMOR_HOSTS into channels (network/output.py reads it too)
TUMOR_HOST_CHANNELS: Tuple[Tuple[int, ...], ...] = tuple(
    tuple(class_index(h) - 1 for h in TUMOR_HOSTS[name]) for name in TUMOR_NAMES)
# each tumor's first and last host channel (the same channel for a single host): max over its hosts is
# max(R[first], R[last]), two gathers for all 20 tumors (no host set has more than two organs)
_FIRST_HOST = [hosts[0] for hosts in TUMOR_HOST_CHANNELS]
_LAST_HOST = [hosts[-1] for hosts in TUMOR_HOST_CHANNELS]
assert all(len(hosts) <= 2 for hosts in TUMOR_HOST_CHANNELS)


def host_gated_tumor_logits(tumor_logits: torch.Tensor, organ_logits: torch.Tensor) -> torch.Tensor:
    """tumor_t = a_t − relu(max_{h ∈ hosts(t)} R_h): tumor query logits a (B, 20, *S) and organ tissue logits
    R (B, 25, *S) of the same resolution → gated tumor logits (B, 20, *S) (module docstring)."""
    if tumor_logits.shape[1] != NUM_TUMORS or organ_logits.shape[1] != NUM_ORGANS:
        raise ValueError(f"expected (B, {NUM_TUMORS}, *S) tumor and (B, {NUM_ORGANS}, *S) organ logits, got "
                         f"{tuple(tumor_logits.shape)} and {tuple(organ_logits.shape)}")
    host = torch.maximum(organ_logits[:, _FIRST_HOST], organ_logits[:, _LAST_HOST])
    return tumor_logits - torch.relu(host).to(tumor_logits.dtype)


def gate_tumor_channels(logits: torch.Tensor) -> torch.Tensor:
    """Organ tissue and tumor query logits (B, 45, *S) → the same with the 20 tumor channels host-gated."""
    return torch.cat((logits[:, :NUM_ORGANS],
                      host_gated_tumor_logits(logits[:, NUM_ORGANS:], logits[:, :NUM_ORGANS])), 1)
