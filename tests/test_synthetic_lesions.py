"""Synthetic lesions (training/synthetic_lesions.py): where they go, what they change, what they leave alone."""
import numpy as np
import torch
import torch.nn.functional as F

from nnunetv2_dsm.labels import NUM_CLASSES, class_index
from nnunetv2_dsm.training.synthetic_lesions import (LESION_CONTRAST_HU, add_synthetic_lesions, ct_contrast_scale,
                                                     lesion_contrast_hu, lesion_organs)

LIVER, KIDNEY_R, AORTA = class_index("Liver") - 1, class_index("Right Kidney") - 1, class_index("Aorta") - 1
LIVER_TUMOR = class_index("Liver Tumor") - 1


def _annotated(*names):
    a = np.zeros(NUM_CLASSES, dtype=bool)
    a[[class_index(n) - 1 for n in names]] = True
    return a


def _batch(shape=(16, 16, 16)):
    """Two cases: liver (left half) and right kidney (a cube); targets at full and half resolution."""
    full = torch.zeros(2, NUM_CLASSES, *shape)
    full[:, LIVER, :, :, :8] = 1
    full[:, KIDNEY_R, 10:14, 10:14, 10:14] = 1
    half = F.interpolate(full, scale_factor=0.5, mode="nearest")
    data = torch.randn(2, 1, *shape)
    return data, [full, half]


def test_only_annotated_tumour_hosts_whose_tumours_the_case_does_not_annotate_get_lesions():
    assert set(lesion_organs(_annotated("Liver", "Right Kidney", "Bladder"))) == {LIVER, KIDNEY_R}  # no bladder
    assert KIDNEY_R in lesion_organs(_annotated("Liver", "Liver Tumor", "Right Kidney"))             # tumour
    assert LIVER not in lesion_organs(_annotated("Liver", "Liver Tumor", "Right Kidney"))
    assert lesion_organs(_annotated("Right Kidney", "Kidney Cyst")) == []
    assert lesion_organs(_annotated("Liver Tumor")) == []


def test_aorta_hosts_a_tumour_class_so_it_is_eligible():
    # labels.TUMOR_HOSTS lists "Aortic Tumor" in the aorta: an annotated aorta is a host like any other
    assert AORTA in lesion_organs(_annotated("Aorta"))


def test_every_eligible_organ_gets_its_own_lesion_and_only_its_own_target_is_cleared():
    data, targets = _batch()
    annotated = np.stack([_annotated("Liver", "Right Kidney")] * 2)
    new_data, new_targets, lesions = add_synthetic_lesions(data, targets, annotated, 1 / 100.0, (1.0, 1.0, 1.0),
                                                           np.random.default_rng(0), probability=1.0)
    organ_before = targets[0][:, [LIVER, KIDNEY_R]].amax(1) > 0
    assert not (lesions & ~organ_before).any()                  # clipped to the organs
    diff = (new_data - data)[:, 0]
    assert torch.equal(diff != 0, lesions)                      # the image changes exactly on the lesions
    small = F.interpolate(lesions[:, None].float(), size=(8, 8, 8), mode="nearest")[:, 0] > 0.5
    for b in range(2):
        for c in (LIVER, KIDNEY_R):                             # probability 1: each organ present gets one
            inside = targets[0][b, c].bool() & lesions[b]
            assert inside.any()
            shift = diff[b][inside]
            assert float(shift.max() - shift.min()) < 1e-5         # one shift per lesion
            assert LESION_CONTRAST_HU[0] / 100 - 1e-5 <= abs(float(shift[0])) <= LESION_CONTRAST_HU[1] / 100 + 1e-5
            assert (new_targets[0][b, c][lesions[b]] == 0).all()
            keep = ~lesions[b]
            assert torch.equal(new_targets[0][b, c][keep], targets[0][b, c][keep])
            # the coarser level follows (nearest downsampling of the lesion)
            assert (new_targets[1][b, c][small[b]] == 0).all()
            assert torch.equal(new_targets[1][b, c][~small[b]], targets[1][b, c][~small[b]])
        others = [k for k in range(NUM_CLASSES) if k not in (LIVER, KIDNEY_R)]
        assert torch.equal(new_targets[0][b, others], targets[0][b, others])


def test_contrast_is_log_uniform_on_its_range():
    rng = np.random.default_rng(0)
    hu = np.array([lesion_contrast_hu(rng) for _ in range(20000)])
    lo, hi = LESION_CONTRAST_HU
    assert hu.min() >= lo and hu.max() <= hi
    # log-uniform: the geometric midpoint splits the draws in half, and [lo, 2 lo) holds its log share
    assert abs(np.mean(hu < np.sqrt(lo * hi)) - 0.5) < 0.02
    assert abs(np.mean(hu < 2 * lo) - np.log(2) / np.log(hi / lo)) < 0.02


def test_inputs_are_not_modified_and_the_generator_makes_it_repeatable():
    data, targets = _batch()
    keep_data, keep_t = data.clone(), [t.clone() for t in targets]
    annotated = np.stack([_annotated("Liver", "Right Kidney")] * 2)
    out1 = add_synthetic_lesions(data, targets, annotated, 0.01, (1.0, 1.0, 1.0), np.random.default_rng(3), 1.0)
    out2 = add_synthetic_lesions(data, targets, annotated, 0.01, (1.0, 1.0, 1.0), np.random.default_rng(3), 1.0)
    assert torch.equal(data, keep_data) and all(torch.equal(a, b) for a, b in zip(targets, keep_t))
    assert torch.equal(out1[0], out2[0]) and torch.equal(out1[2], out2[2])


def test_no_lesion_without_an_eligible_organ_or_at_probability_zero():
    data, targets = _batch()
    liver_tumor_case = np.stack([_annotated("Liver", "Liver Tumor")] * 2)
    targets[0][:, KIDNEY_R] = 0        # the kidney is not annotated anyway; the liver's tumours are
    out = add_synthetic_lesions(data, targets, liver_tumor_case, 0.01, (1.0, 1.0, 1.0), np.random.default_rng(0), 1.0)
    assert not out[2].any() and torch.equal(out[0], data)
    both = np.stack([_annotated("Liver", "Right Kidney")] * 2)
    out = add_synthetic_lesions(data, targets, both, 0.01, (1.0, 1.0, 1.0), np.random.default_rng(0), 0.0)
    assert not out[2].any()


def test_contrast_scale_reads_ct_normalisation_only():
    class P:
        foreground_intensity_properties_per_channel = {"0": {"std": 250.0}}

    class C:
        normalization_schemes = ["CTNormalization"]

    class Z:
        normalization_schemes = ["ZScoreNormalization"]

    assert abs(ct_contrast_scale(P, C) - 1 / 250.0) < 1e-12
    assert ct_contrast_scale(P, Z) is None
