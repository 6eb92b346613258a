"""DSM losses: partial-label Dice + BCE (paper Eq. 11–13), deep supervision over the kMMM layers, alignment.

Partial labels (paper §4.1.2, after Liu et al. 2023): every case annotates only some of the 45 classes. The loss
is computed per (case, class) pair and only over the pairs the case annotates; in Stage 2 an organ pair the case
does not annotate learns the frozen Stage 1 model's answer (:func:`stage1_distillation`); every other pair contributes
exactly zero loss and zero gradient.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_dsm.labels import NUM_ORGANS
from nnunetv2_dsm.network.output import DSMOutput

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]
Normalizer = Callable[[torch.Tensor], torch.Tensor]  # number of annotated pairs → the divisor of their sum


def partial_label_dice_bce(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
                           smooth: float = 1e-5, normalizer: Optional[Normalizer] = None) -> torch.Tensor:
    """Eq. 11–13 on annotated pairs only.

    logits (B, C, *S); target (B, C', *S) binary with C' >= C (channel c of both is class c + 1); annotated
    (B, C') bool. Returns the mean over annotated (b, c) pairs of BCE(b, c) (mean over voxels, Eq. 12) plus
    soft Dice loss 1 − (2 Σ p t + s) / (Σ p + Σ t + s) (Eq. 11); 0 (with a graph) when nothing is annotated.
    With ``normalizer`` (a function of this call's pair count, a 0-d tensor, returning the divisor, e.g.
    ``nnunetv2_dsm.training.distributed.global_pair_normalizer``) it returns the sum over the pairs divided by
    ``normalizer(count)`` instead; the normalizer is called whether or not this batch annotates anything.
    """
    mask = annotated[:, :logits.shape[1]]
    divisor = normalizer(mask.sum()) if normalizer is not None else None
    b_idx, c_idx = mask.nonzero(as_tuple=True)
    if b_idx.numel() == 0:
        return logits.sum() * 0.0
    lg = logits[b_idx, c_idx].flatten(1).float()
    tg = target[b_idx, c_idx].flatten(1).float()
    bce = F.binary_cross_entropy_with_logits(lg, tg, reduction="none").mean(1)
    p = torch.sigmoid(lg)
    dice = 1 - (2 * (p * tg).sum(1) + smooth) / (p.sum(1) + tg.sum(1) + smooth)
    per_pair = bce + dice
    return per_pair.mean() if divisor is None else per_pair.sum() / divisor


def alignment_loss(query_class_log_probs: torch.Tensor) -> torch.Tensor:
    """Paper §4.2.3: "the similarities between matched query embedding and text embedding should be maximized" —
    cross-entropy of Eq. 20's p_j over the class prompts with target class j (query j is class j's query), for
    every query of every case: the match is by index, so it needs no annotation. log p (B, N, K) → scalar, the
    mean over (b, j). (Counting only the classes a case annotates left the projections of untrained queries
    random and sharp at τ = 0.01; they then held up to 0.57 of other classes' mixing weight.)"""
    n = query_class_log_probs.shape[1]
    return -query_class_log_probs.diagonal(dim1=1, dim2=2)[:, :n].mean()


def organ_targets_without_tumors(target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Organ-tissue targets for Eq. 14: target (B, 45, *S) multi-hot, annotated (B, 45) bool → the same target with
    every voxel of an annotated tumor removed from the 25 organ channels (the tumor channels are unchanged).

    The organ responses are what the anomaly score −max R reads (Eq. 14): trained to claim tumor voxels, they made
    it lowest exactly inside the tumors (liver-tumor AUROC 0.04 in the demo). Every output (the final masks and each
    kMMM layer) learns organ tissue without tumors; the label table's organ regions, which include their tumors,
    are composed at prediction (``network.output.label_table_logits``)."""
    tumor = target[:, NUM_ORGANS:] * annotated[:, NUM_ORGANS:target.shape[1]].reshape(
        *annotated.shape[:1], -1, *[1] * (target.ndim - 2)).to(target.dtype)
    tumor_any = tumor.amax(dim=1, keepdim=True) > 0
    organs = target[:, :NUM_ORGANS] * (~tumor_any).to(target.dtype)
    return torch.cat((organs, target[:, NUM_ORGANS:]), 1)


def stage1_distillation(logits: torch.Tensor, teacher: torch.Tensor, annotated: torch.Tensor,
                        teacher_trained: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Stage 2 keeps Stage 1's answer where no label speaks (learning without forgetting, Li & Hoiem 2016).

    An organ channel gets a loss only on the cases that annotate it, so on a LiTS or KiTS case nothing holds the
    aorta or the spleen where Stage 1 left them, and Stage 2 drifted from them (seed 1 aorta 0.94 → 0.27). For each
    case b and each organ c that b does not annotate but Stage 1 was trained on: BCE(x_bc, p_bc) with the frozen
    Stage 1 model's probability p as a soft target, averaged over the voxels that are not annotated tumor (Stage 1
    never saw a tumor; no organ's tissue is known to be there); returns the mean over those (b, c) pairs, or 0 with
    a graph.

    logits (B, C ≥ 25, *S) the student's; teacher (B, 25, *S) Stage 1's organ probabilities at the same resolution;
    annotated (B, C') bool; teacher_trained (25,) bool (Stage 1's ``trained_classes``); target (B, C', *S) the
    label-table multi-hot (for the annotated tumor voxels). At Stage 2's first step the student's organ logits are
    Stage 1's, so the term's gradient is zero there."""
    spatial = [1] * (target.ndim - 2)
    tumor_annotated = annotated[:, NUM_ORGANS:target.shape[1]].reshape(*annotated.shape[:1], -1, *spatial)
    free = ~(target[:, NUM_ORGANS:].bool() & tumor_annotated).any(1).flatten(1)           # (B, V)
    pairs = ~annotated[:, :NUM_ORGANS] & teacher_trained[:NUM_ORGANS].to(annotated.device)  # (B, 25)
    if not bool(pairs.any()):
        return logits.sum() * 0.0
    bce = F.binary_cross_entropy_with_logits(logits[:, :NUM_ORGANS].flatten(2).float(),
                                             teacher.flatten(2).float(), reduction="none")  # (B, 25, V)
    per_pair = (bce * free.unsqueeze(1)).sum(2) / free.sum(1, keepdim=True).clamp(min=1)
    return per_pair[pairs].mean()


def deep_supervision_weights(n_outputs: int) -> np.ndarray:
    """Final output weight 1, then 1/2, 1/4, ... for the kMMM layers fine → coarse, normalised to sum 1. No zero
    weight: every layer's prediction head must train (fix of the official code, which had no auxiliary loss)."""
    w = np.array([0.5 ** i for i in range(n_outputs)])
    return w / w.sum()


class DSMLoss(nn.Module):
    """Weighted partial-label Dice+BCE over the network's predictions [final, layer outputs fine → coarse] plus the
    Stage 2 alignment term: ``loss(output: DSMOutput, targets)``.

    ``targets``: one (B, 45, *S) multi-hot target per deep-supervision scale (nnU-Net's list), or a single tensor for
    the final logits only. The classes each case annotates, (B, 45) bool, are ``annotated`` or, when that is None,
    the ``annotated`` attribute the trainer sets for every batch (so nnU-Net's own ``train_step`` calls the loss
    unchanged). Every output is supervised with :func:`organ_targets_without_tumors`. When the Stage 2 trainer
    sets ``teacher`` (the frozen Stage 1 model's organ probabilities, one per output) and ``teacher_trained`` for the
    batch, each output also gets :func:`stage1_distillation` (a mean over this rank's pairs, also under DDP). ``normalizer``: see
    :func:`partial_label_dice_bce` (the trainers pass the global one under DDP)."""

    def __init__(self, n_outputs: int, alignment_weight: float = 1.0, smooth: float = 1e-5,
                 normalizer: Optional[Normalizer] = None):
        super().__init__()
        self.weights = deep_supervision_weights(n_outputs).tolist()
        self.alignment_weight = alignment_weight
        self.smooth = smooth
        self.normalizer = normalizer
        self.annotated: Optional[torch.Tensor] = None
        self.teacher: Optional[List[torch.Tensor]] = None
        self.teacher_trained: Optional[torch.Tensor] = None

    def forward(self, output: DSMOutput, targets: TensorOrList,
                annotated: Optional[torch.Tensor] = None) -> torch.Tensor:
        annotated = self.annotated if annotated is None else annotated
        if annotated is None:
            raise RuntimeError("DSMLoss needs the classes each case annotates: pass `annotated` (B, 45) or set "
                               "loss.annotated for the batch (the DSM trainers do)")
        targets = [targets] if isinstance(targets, torch.Tensor) else list(targets)
        predictions = output.predictions()[:len(targets)]
        weights = self.weights if len(predictions) == len(self.weights) else deep_supervision_weights(len(predictions))
        tissue_targets = [organ_targets_without_tumors(t, annotated) for t in targets]
        loss = sum(w * partial_label_dice_bce(o, t, annotated, self.smooth, self.normalizer)
                   for w, o, t in zip(weights, predictions, tissue_targets))
        if self.teacher is not None:
            loss = loss + sum(w * stage1_distillation(o, p, annotated, self.teacher_trained, t)
                              for w, o, p, t in zip(weights, predictions, self.teacher, targets))
        if output.query_class_log_probs is not None and self.alignment_weight:
            log_p = output.query_class_log_probs
            align = alignment_loss(log_p)             # a mean over this rank's (case, query) pairs
            if self.normalizer is not None:           # → their sum over the global count (ranks may differ in size)
                count = log_p.new_tensor(float(log_p.shape[0] * log_p.shape[1]))
                align = align * count / self.normalizer(count)
            loss = loss + self.alignment_weight * align
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
