"""DSM losses: partial-label Dice + BCE (paper Eq. 11–13), deep supervision over the kMMM layers, alignment.

Partial labels (paper §4.1.2, after Liu et al. 2023): every case annotates only some of the 45 classes. The loss
is computed per (case, class) pair and only over the pairs the case annotates; the others are never touched, so
they contribute exactly zero loss and zero gradient.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]


def partial_label_dice_bce(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
                           smooth: float = 1e-5) -> torch.Tensor:
    """Eq. 11–13 on annotated pairs only.

    logits (B, C, *S); target (B, C', *S) binary with C' >= C (channel c of both is class c + 1); annotated
    (B, C') bool. Returns the mean over annotated (b, c) pairs of BCE(b, c) (mean over voxels, Eq. 12) plus
    soft Dice loss 1 − (2 Σ p t + s) / (Σ p + Σ t + s) (Eq. 11); 0 (with a graph) when nothing is annotated.
    """
    b_idx, c_idx = annotated[:, :logits.shape[1]].nonzero(as_tuple=True)
    if b_idx.numel() == 0:
        return logits.sum() * 0.0
    lg = logits[b_idx, c_idx].flatten(1).float()
    tg = target[b_idx, c_idx].flatten(1).float()
    bce = F.binary_cross_entropy_with_logits(lg, tg, reduction="none").mean(1)
    p = torch.sigmoid(lg)
    dice = 1 - (2 * (p * tg).sum(1) + smooth) / (p.sum(1) + tg.sum(1) + smooth)
    return (bce + dice).mean()


def alignment_loss(query_class_log_probs: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Paper §4.2.3: "the similarities between matched query embedding and text embedding should be maximized" —
    cross-entropy of Eq. 20's p_j over the class prompts with target class j, for every query j whose class the
    case annotates. log p (B, N, K), annotated (B, K) → scalar."""
    n = query_class_log_probs.shape[1]
    diag = query_class_log_probs.diagonal(dim1=1, dim2=2)[:, :n]  # (B, N): log p_j(j)
    mask = annotated[:, :n]
    if not mask.any():
        return query_class_log_probs.sum() * 0.0
    return -diag[mask].mean()


def deep_supervision_weights(n_outputs: int) -> np.ndarray:
    """Final output weight 1, then 1/2, 1/4, ... for the kMMM layers fine → coarse, normalised to sum 1. No zero
    weight: every layer's prediction head must train (fix of the official code, which had no auxiliary loss)."""
    w = np.array([0.5 ** i for i in range(n_outputs)])
    return w / w.sum()


class DSMLoss(nn.Module):
    """Weighted partial-label Dice+BCE over [final, layer outputs...] plus the Stage-2 alignment term."""

    def __init__(self, n_outputs: int, alignment_weight: float = 1.0, smooth: float = 1e-5):
        super().__init__()
        self.weights = deep_supervision_weights(n_outputs).tolist()
        self.alignment_weight = alignment_weight
        self.smooth = smooth

    def forward(self, outputs: TensorOrList, targets: TensorOrList, annotated: torch.Tensor,
                extras: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs, targets = [outputs], [targets if isinstance(targets, torch.Tensor) else targets[0]]
        if len(outputs) > len(targets):
            raise ValueError(f"{len(outputs)} network outputs but {len(targets)} targets; the trainer's deep "
                             f"supervision scales must list one target resolution per output")
        weights = self.weights if len(outputs) == len(self.weights) else deep_supervision_weights(len(outputs))
        loss = sum(w * partial_label_dice_bce(o, t, annotated, self.smooth)
                   for w, o, t in zip(weights, outputs, targets))
        if extras and "query_class_log_probs" in extras and self.alignment_weight:
            loss = loss + self.alignment_weight * alignment_loss(extras["query_class_log_probs"], annotated)
        return loss


@torch.no_grad()
def masked_tp_fp_fn(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor):
    """Hard true/false positives and false negatives per class, counted only where the case annotates the class.
    logits, target (B, C, *S); annotated (B, C) → three (C,) numpy arrays (nnU-Net's pseudo-Dice inputs)."""
    pred = logits > 0  # sigmoid(x) > 0.5
    tgt = target.bool()
    m = annotated[:, :logits.shape[1]].reshape(*annotated.shape[:1], -1, *[1] * (logits.ndim - 2)).to(pred.device)
    axes = [0] + list(range(2, logits.ndim))
    tp = (pred & tgt & m).sum(axes)
    fp = (pred & ~tgt & m).sum(axes)
    fn = (~pred & tgt & m).sum(axes)
    return tp.cpu().numpy(), fp.cpu().numpy(), fn.cpu().numpy()
