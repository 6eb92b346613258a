"""Segmentation and voxel-level detection metrics on numpy arrays: DSC, AUROC, FPR at 95 % TPR.

All functions are exact and tie-aware, and scale to whole CT volumes (512 x 512 x 300 ~ 78 M voxels):

* :func:`dice` counts with ``np.count_nonzero``; no float masks are built.
* :func:`auroc` is the Mann-Whitney statistic ``P(s+ > s-) + 0.5 P(s+ == s-)``, which is exactly the area under
  the (tied-points-joined) ROC curve and therefore equals ``sklearn.metrics.roc_auc_score``. It sorts the positive
  and the negative scores separately (numpy's SIMD sort) and counts, for every positive, the negatives below /
  equal to it with two ``searchsorted`` passes: O(n log n), no per-threshold Python loop, no O(n^2).
* :func:`fpr_at_95_tpr` reads the ROC curve at its first threshold (scanning from high to low scores) whose TPR is
  >= 0.95, i.e. ``fpr[np.argmax(tpr >= 0.95)]`` of ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
  That threshold is the k-th largest positive score, k the smallest count with ``k / P >= 0.95``; the FPR is the
  fraction of negatives scoring >= it.

Edge-case values (also in docs/evaluation.md):

=====================================  ==========================================================================
DSC, reference and prediction empty    ``nan`` -- not evaluable; nnU-Net's own evaluation reports the same
DSC, one of the two empty              ``0.0``
AUROC / FPR95, no positive or no       ``nan`` -- undefined (scikit-learn raises / returns nan)
negative voxel (or no voxel at all)
NaN in the scores                      ``ValueError``
=====================================  ==========================================================================
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

__all__ = ["confusion", "dice", "SortedScores", "auroc", "fpr_at_95_tpr", "auroc_and_fpr95"]

_CHUNK = 1 << 23  # positives per searchsorted pass: bounds the int64 temporaries to 64 MiB each


def _as_bool(a, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        return a
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{what} must be boolean or 0/1 numbers, got dtype {a.dtype}")
    if a.size and ((a != 0) & (a != 1)).any():
        raise ValueError(f"{what} must be boolean or 0/1; found other values")
    return a != 0


def confusion(pred, ref, mask=None) -> Tuple[int, int, int, int]:
    """(TP, FP, FN, TN) of two binary masks of equal shape, optionally counted only where ``mask`` is True."""
    pred, ref = _as_bool(pred, "pred"), _as_bool(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} differs from ref shape {ref.shape}")
    if mask is not None:
        mask = _as_bool(mask, "mask")
        if mask.shape != ref.shape:
            raise ValueError(f"mask shape {mask.shape} differs from ref shape {ref.shape}")
        pred, ref = pred & mask, ref & mask
        total = int(np.count_nonzero(mask))
    else:
        total = ref.size
    tp = int(np.count_nonzero(pred & ref))
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    fp, fn = n_pred - tp, n_ref - tp
    return tp, fp, fn, total - tp - fp - fn


def dice_from_counts(tp: int, n_pred: int, n_ref: int) -> float:
    """``2 TP / (|pred| + |ref|)``; ``nan`` when both are empty, ``0.0`` when exactly one is."""
    denom = n_pred + n_ref
    return float("nan") if denom == 0 else 2.0 * tp / denom


def dice(pred, ref) -> float:
    """Dice similarity coefficient of two binary masks (any non-zero value counts as foreground).

    Returns ``2|P & R| / (|P| + |R|)``; ``nan`` if both masks are empty (not evaluable -- the same value nnU-Net's
    ``compute_metrics`` reports; excluded from means), ``0.0`` if only one of them is empty.
    """
    pred, ref = _as_bool(pred, "pred"), _as_bool(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} differs from ref shape {ref.shape}")
    tp = int(np.count_nonzero(pred & ref))
    return dice_from_counts(tp, int(np.count_nonzero(pred)), int(np.count_nonzero(ref)))


class SortedScores:
    """Positive and negative scores, each sorted ascending; computes AUROC and FPR-at-TPR from one sort.

    Build it with :meth:`from_arrays` (scores, labels and an optional region mask of one shape). Scores keep their
    dtype (float32 stays float32: casting to float64 would not change ties, casting down could create them).
    """

    def __init__(self, pos: np.ndarray, neg: np.ndarray):
        self.pos, self.neg = pos, neg

    @classmethod
    def from_arrays(cls, scores, labels, mask=None) -> "SortedScores":
        """Split ``scores`` by ``labels`` (True = positive) inside ``mask`` (None: everywhere) and sort both parts."""
        scores = np.asarray(scores)
        labels = _as_bool(labels, "labels")
        if scores.shape != labels.shape:
            raise ValueError(f"scores shape {scores.shape} differs from labels shape {labels.shape}")
        if scores.dtype.kind not in "biuf":
            raise ValueError(f"scores must be numeric, got dtype {scores.dtype}")
        if mask is None:
            pos, neg = scores[labels], scores[~labels]
        else:
            mask = _as_bool(mask, "mask")
            if mask.shape != scores.shape:
                raise ValueError(f"mask shape {mask.shape} differs from scores shape {scores.shape}")
            pos, neg = scores[labels & mask], scores[~labels & mask]
        pos.sort()
        neg.sort()
        # after sorting, NaNs sit at the end of each part
        if (pos.size and np.isnan(pos[-1])) or (neg.size and np.isnan(neg[-1])):
            raise ValueError("scores contain NaN; AUROC / FPR95 are not defined for them")
        return cls(pos, neg)

    @property
    def n_pos(self) -> int:
        return int(self.pos.size)

    @property
    def n_neg(self) -> int:
        return int(self.neg.size)

    def auroc(self) -> float:
        """Mann-Whitney AUROC, ties counted one half; ``nan`` without positives or without negatives."""
        p, n = self.n_pos, self.n_neg
        if p == 0 or n == 0:
            return float("nan")
        below = equal2 = 0  # Python ints: exact for any volume
        for start in range(0, p, _CHUNK):
            chunk = self.pos[start:start + _CHUNK]
            left = np.searchsorted(self.neg, chunk, side="left")     # negatives strictly below
            right = np.searchsorted(self.neg, chunk, side="right")   # ... plus the tied ones
            below += int(left.sum(dtype=np.int64))
            equal2 += int(right.sum(dtype=np.int64))
        # sum over positives of (#neg < s) + 0.5 (#neg == s) = (left + right) / 2
        return (below + equal2) / (2.0 * p * n)

    def fpr_at_tpr(self, tpr: float = 0.95) -> float:
        """FPR at the first ROC threshold (high to low) whose TPR is >= ``tpr``; ``nan`` if undefined."""
        p, n = self.n_pos, self.n_neg
        if p == 0 or n == 0:
            return float("nan")
        if not 0.0 < tpr <= 1.0:
            raise ValueError(f"tpr must lie in (0, 1], got {tpr}")
        # smallest k with k / p >= tpr, in the same float64 arithmetic as roc_curve's tps / tps[-1]
        k = min(max(math.ceil(tpr * p), 1), p)
        while k > 1 and (k - 1) / p >= tpr:
            k -= 1
        while k / p < tpr:
            k += 1
        threshold = self.pos[p - k]  # k-th largest positive score
        n_at_or_above = n - int(np.searchsorted(self.neg, threshold, side="left"))
        return n_at_or_above / n


def auroc(scores, labels, mask: Optional[np.ndarray] = None) -> float:
    """Voxel-level AUROC of ``scores`` (higher = more positive) against binary ``labels``.

    Tie-aware (Mann-Whitney U / (P N)), equal to ``sklearn.metrics.roc_auc_score(labels, scores)``. ``mask``
    restricts the evaluation to its True voxels. ``nan`` when there is no positive or no negative voxel.
    """
    return SortedScores.from_arrays(scores, labels, mask).auroc()


def fpr_at_95_tpr(scores, labels, mask: Optional[np.ndarray] = None, tpr: float = 0.95) -> float:
    """False-positive rate at the first ROC threshold where the true-positive rate reaches ``tpr`` (0.95).

    Equals ``fpr[np.argmax(tpr_curve >= 0.95)]`` of ``sklearn.metrics.roc_curve(labels, scores,
    drop_intermediate=False)``: every voxel scoring >= the threshold is called positive, ties included. ``mask``
    restricts the evaluation; ``nan`` when there is no positive or no negative voxel. Lower is better.
    """
    return SortedScores.from_arrays(scores, labels, mask).fpr_at_tpr(tpr)


def auroc_and_fpr95(scores, labels, mask: Optional[np.ndarray] = None, tpr: float = 0.95) -> Tuple[float, float]:
    """``(auroc(...), fpr_at_95_tpr(...))`` sharing one split-and-sort: use this when both are wanted."""
    s = SortedScores.from_arrays(scores, labels, mask)
    return s.auroc(), s.fpr_at_tpr(tpr)
