"""Anomaly mask visual prompt: paper §4.2.1, Eq. 14–15.

At one kMMM scale the organ queries answer every voxel with a response (logit) R (B, N, *S). A voxel that no
organ query claims — every response low — is an outlier of the organ distribution and a tumor candidate:

* Eq. 14, anomaly score:     A = −max_n R_n                                           (B, *S)
* Eq. 15, mask prompt:       Â = (A − min A) / (max A − min A + ε), min/max over the voxels of *each sample*
                             P = Â > τ, τ = 0.5 (True: the tumor queries attend there)

Deviation from the official code (docs/fidelity.md, difference 4): it normalises over the whole batch tensor
without ε (one sample's range then sets every sample's prompt, and a constant map gives NaN) and feeds the map as
an additive soft bias (+0.2·Â / −1). Here the normalisation is per sample with ε in the denominator (a constant
map gives 0, not NaN), and the prompt is a hard boolean mask (Mask2Former masked attention, as in ZePT and the
paper's wording "mask prompt area").
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def anomaly_score(organ_logits: torch.Tensor, organs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 14: the negative maximal organ-query response.

    organ_logits (B, N, *S) → anomaly score (B, *S), A = −max_n R_n. High where every organ query answers low.
    ``organs`` (N,) bool: the max runs over these queries only — the organs the model was trained on
    (``DSMNetwork.trained_classes``); a query no case ever supervised answers arbitrarily and would mask a tumor.
    None or no True entry: every query. Differentiable (the no-grad choice is made by :func:`anomaly_prompt`).
    """
    if organ_logits.ndim < 3:
        raise ValueError(f"organ_logits must be (B, N, *S), got shape {tuple(organ_logits.shape)}")
    if organs is not None:       # tensor ops only (no host sync, no data-dependent shape under torch.compile)
        keep = organs.to(organ_logits.device).bool()
        keep = (keep | ~keep.any()).reshape(1, -1, *[1] * (organ_logits.ndim - 2))
        organ_logits = organ_logits.masked_fill(~keep, torch.finfo(organ_logits.dtype).min)
    return -organ_logits.amax(dim=1)


def normalize_per_sample(score: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Min–max normalisation of Eq. 15, per sample.

    score (B, *S) → (B, *S) in [0, 1): (A − min A) / (max A − min A + eps), min and max over the spatial dims of
    each sample separately. A constant map gives 0 everywhere (never NaN). Computed in float32.
    """
    if score.ndim < 2:
        raise ValueError(f"score must be (B, *S), got shape {tuple(score.shape)}")
    flat = score.float().flatten(1)
    lo = flat.amin(dim=1, keepdim=True)
    hi = flat.amax(dim=1, keepdim=True)
    return ((flat - lo) / (hi - lo + eps)).clamp_(0.0, 1.0).view(score.shape)


def anomaly_prompt(organ_logits: torch.Tensor, threshold: float = 0.5, eps: float = 1e-6,
                   organs: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eq. 14–15: the anomaly mask visual prompt.

    organ_logits (B, N, *S) → (normalised anomaly (B, *S) float32 in [0, 1], attend (B, *S) bool), where
    ``attend = normalised > threshold`` marks the anomalous region the tumor queries attend to (Eq. 19).
    ``organs``: see :func:`anomaly_score`.

    Computed without gradient: the prompt is a hard mask (thresholding has no useful gradient), and the organ
    responses it is read from are trained by their own losses (the per-layer organ predictions are deeply
    supervised), so the tumor branch must not pull them towards making prompts.
    """
    with torch.no_grad():
        normalised = normalize_per_sample(anomaly_score(organ_logits.detach(), organs), eps)
        return normalised, normalised > threshold
