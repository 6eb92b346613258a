"""nnunetv2_dsm.evaluation.metrics: DSC, AUROC, FPR95 against scikit-learn and on every documented edge case."""
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from nnunetv2_dsm.evaluation.metrics import (SortedScores, auroc, auroc_and_fpr95, confusion, dice,
                                             fpr_at_95_tpr)


def sk_fpr95(labels, scores, tpr=0.95):
    fpr, tpr_curve, _ = roc_curve(labels, scores, drop_intermediate=False)
    return fpr[np.argmax(tpr_curve >= tpr)]


def _cases(seed, n_trials, decimals=None):
    rng = np.random.default_rng(seed)
    for _ in range(n_trials):
        n = int(rng.integers(2, 3000))
        scores = rng.normal(size=n).astype(np.float32)
        labels = rng.random(n) < rng.uniform(0.01, 0.9)
        labels[rng.integers(n)] = True
        labels[rng.integers(n)] = False
        if labels.all() or not labels.any():
            continue
        scores = scores + labels * rng.uniform(0, 2)  # some signal, not perfect
        if decimals is not None:
            scores = np.round(scores, decimals).astype(np.float32)
        yield scores.astype(np.float32), labels


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_auroc_and_fpr95_equal_sklearn(decimals):
    n = 0
    for scores, labels in _cases(decimals or 7, 60, decimals):
        a, f = auroc_and_fpr95(scores, labels)
        assert a == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert f == sk_fpr95(labels, scores)
        assert auroc(scores, labels) == a and fpr_at_95_tpr(scores, labels) == f
        n += 1
    assert n > 40


def test_heavy_ties_on_a_large_volume_equal_sklearn():
    rng = np.random.default_rng(3)
    labels = rng.random((20, 100, 100)) < 0.05
    scores = np.round(rng.random(labels.shape, dtype=np.float32) * 0.7 + 0.3 * labels, 1).astype(np.float32)
    assert len(np.unique(scores)) <= 11
    a, f = auroc_and_fpr95(scores, labels)
    assert a == pytest.approx(roc_auc_score(labels.ravel(), scores.ravel()), abs=1e-12)
    assert f == sk_fpr95(labels.ravel(), scores.ravel())


@pytest.mark.parametrize("n_pos", [1, 19, 20, 21, 40, 60, 100, 101, 1000])
def test_fpr95_threshold_count_matches_sklearn_float_arithmetic(n_pos):
    # positive counts where 0.95 * P is (or is near) an integer: k must be the smallest k with k / P >= 0.95
    rng = np.random.default_rng(n_pos)
    pos = rng.permutation(n_pos).astype(np.float32)
    neg = rng.permutation(3 * n_pos).astype(np.float32) / 3 - 0.1
    scores, labels = np.concatenate([pos, neg]), np.r_[np.ones(n_pos, bool), np.zeros(3 * n_pos, bool)]
    assert fpr_at_95_tpr(scores, labels) == sk_fpr95(labels, scores)


def test_all_equal_scores_and_perfect_and_inverted_separation():
    labels = np.array([1, 1, 0, 0, 0], bool)
    assert auroc_and_fpr95(np.full(5, 0.3, np.float32), labels) == (0.5, 1.0)
    good = np.array([0.9, 0.8, 0.1, 0.2, 0.3], np.float32)
    assert auroc_and_fpr95(good, labels) == (1.0, 0.0)
    assert auroc_and_fpr95(-good, labels) == (0.0, 1.0)
    # a negative tied with the lowest positive counts as a false positive at the 95 % threshold
    tied = np.array([0.9, 0.8, 0.8, 0.2, 0.3], np.float32)
    assert fpr_at_95_tpr(tied, labels) == pytest.approx(1 / 3)
    assert auroc(tied, labels) == pytest.approx((3 + 2.5) / 6)


def test_labels_as_ints_mask_and_float64():
    rng = np.random.default_rng(5)
    scores, labels = rng.random(500), rng.random(500) < 0.3
    mask = rng.random(500) < 0.6
    assert auroc(scores, labels.astype(np.uint8)) == auroc(scores, labels)
    assert auroc(scores, labels, mask) == pytest.approx(roc_auc_score(labels[mask], scores[mask]), abs=1e-12)
    assert fpr_at_95_tpr(scores, labels, mask) == sk_fpr95(labels[mask], scores[mask])
    s = SortedScores.from_arrays(scores, labels, mask)
    assert (s.n_pos, s.n_neg) == (int((labels & mask).sum()), int((~labels & mask).sum()))
    assert s.pos.dtype == np.float64 and SortedScores.from_arrays(scores.astype(np.float32), labels).pos.dtype == \
        np.float32


def test_detection_edge_cases_are_nan_or_errors():
    s = np.array([0.1, 0.2, 0.3], np.float32)
    for labels in (np.zeros(3, bool), np.ones(3, bool)):  # one class only: undefined
        a, f = auroc_and_fpr95(s, labels)
        assert math.isnan(a) and math.isnan(f)
    a, f = auroc_and_fpr95(np.zeros(0, np.float32), np.zeros(0, bool))
    assert math.isnan(a) and math.isnan(f)
    assert math.isnan(auroc(s, [1, 0, 1], mask=np.array([True, False, True])))  # the mask leaves one class
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([0.1, np.nan, 0.3]), [1, 0, 0])
    with pytest.raises(ValueError, match="shape"):
        auroc(s, [1, 0])
    with pytest.raises(ValueError, match="0/1"):
        auroc(s, [2, 0, 1])
    with pytest.raises(ValueError, match="tpr"):
        SortedScores.from_arrays(s, [1, 0, 1]).fpr_at_tpr(0.0)
    # infinite scores are ordinary extreme values
    assert auroc_and_fpr95(np.array([np.inf, 1, -np.inf]), [1, 0, 0]) == (1.0, 0.0)


def test_dice_values_and_edge_cases():
    ref = np.zeros((4, 4), bool)
    ref[:2, :2] = True                                  # 4 voxels
    pred = np.zeros((4, 4), bool)
    pred[:2, 1:3] = True                                # 4 voxels, 2 shared
    assert dice(pred, ref) == pytest.approx(2 * 2 / 8)
    assert dice(ref, ref) == 1.0
    assert math.isnan(dice(np.zeros(5, bool), np.zeros(5, bool)))   # not evaluable (nnU-Net: NaN)
    assert dice(pred, np.zeros_like(ref)) == 0.0                     # empty reference, false positives
    assert dice(np.zeros_like(pred), ref) == 0.0                     # missed structure
    assert dice(pred.astype(np.uint8), ref.astype(np.float32)) == dice(pred, ref)
    with pytest.raises(ValueError, match="shape"):
        dice(pred, ref[:2])


def test_confusion_counts_with_and_without_mask():
    ref = np.array([1, 1, 0, 0, 1, 0], bool)
    pred = np.array([1, 0, 1, 0, 1, 0], bool)
    assert confusion(pred, ref) == (2, 1, 1, 2)
    mask = np.array([1, 1, 1, 0, 0, 0], bool)
    assert confusion(pred, ref, mask) == (1, 1, 1, 0)
