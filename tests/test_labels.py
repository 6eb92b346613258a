import itertools

import numpy as np
import pytest
import torch

from nnunetv2_dsm import labels as L
from nnunetv2_dsm.manifest import ManifestError, load_manifest, make_entry, make_manifest


def test_class_table_is_the_papers_45_in_order():
    assert len(L.CLASS_NAMES) == 45 and L.NUM_ORGANS == 25
    assert L.CLASS_NAMES[0] == "Spleen" and L.CLASS_NAMES[24] == "Celiac Truck"
    assert L.CLASS_NAMES[25] == "Spleen Tumor" and L.CLASS_NAMES[44] == "Rectal Tumor"
    assert L.class_index("Liver Tumor") == 31 and L.class_index("  liver tumor ") == 31
    assert set(L.TUMOR_HOSTS) == set(L.TUMOR_NAMES)
    assert all(h in L.ORGAN_NAMES for hosts in L.TUMOR_HOSTS.values() for h in hosts)


def test_unknown_class_names_the_closest_matches():
    with pytest.raises(L.UnknownClassError, match="Liver Tumor"):
        L.class_index("Liver Tumour")


def _all_valid_voxels():
    """Every multi-hot vector the encoding must represent: background, each organ, each tumor in each host and
    with its host unannotated."""
    vecs = [np.zeros(45, bool)]
    for k in range(25):
        v = np.zeros(45, bool); v[k] = True; vecs.append(v)
    for t in L.TUMOR_NAMES:
        for host in L.TUMOR_HOSTS[t] + (None,):
            v = np.zeros(45, bool); v[L.class_index(t) - 1] = True
            if host is not None:
                v[L.class_index(host) - 1] = True
            vecs.append(v)
    return np.stack(vecs, 1)  # (45, n)


def test_round_trip_multi_hot_integer_regions_is_exact_for_every_class_and_host():
    mh = _all_valid_voxels()
    ints = L.encode(mh)
    assert len(np.unique(ints)) == mh.shape[1] == L.MAX_LABEL + 1  # every valid vector has its own integer
    np.testing.assert_array_equal(L.decode(ints), mh)
    # the same decoding through nnU-Net's own region transform, driven by our dataset.json regions
    from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    lm = LabelManager(L.dataset_json_labels(), L.regions_class_order())
    assert lm.has_regions and lm.num_segmentation_heads == 45
    t = ConvertSegmentationToRegionsTransform(lm.foreground_regions, channel_in_seg=0)
    out = t(segmentation=torch.from_numpy(ints.astype(np.int16))[None, :, None, None])["segmentation"]
    np.testing.assert_array_equal(out[:, :, 0, 0].numpy(), mh)


def test_lateral_hosts_keep_their_side():
    for t in ("Kidney Tumor", "Kidney Cyst", "Adrenal Tumor", "Adrenal Cyst", "Lung Tumor", "Lung Cyst"):
        right, left = L.TUMOR_HOSTS[t]
        vr, vl = L.tumor_label(t, right), L.tumor_label(t, left)
        assert vr != vl
        dr, dl = L.decode(np.array([vr, vl])).T
        assert dr[L.class_index(right) - 1] and not dr[L.class_index(left) - 1]
        assert dl[L.class_index(left) - 1] and not dl[L.class_index(right) - 1]


def test_encode_rejects_impossible_voxels():
    mh = np.zeros((45, 3), bool)
    mh[L.class_index("Liver") - 1, 0] = mh[L.class_index("Spleen") - 1, 0] = True
    with pytest.raises(ValueError, match="more than one of the organs"):
        L.encode(mh)
    mh = np.zeros((45, 1), bool)
    mh[L.class_index("Spleen") - 1] = mh[L.class_index("Liver Tumor") - 1] = True
    with pytest.raises(ValueError, match="not one of its hosts"):
        L.encode(mh)
    with pytest.raises(ValueError, match="not part of the DSM encoding"):
        L.decode(np.array([L.MAX_LABEL + 1]))


def test_regions_class_order_writes_a_label_inside_the_region():
    """nnU-Net writes regions_class_order[i] where region i is predicted: that integer must decode to a vector
    containing class i (and, for single-host tumors, the host organ too)."""
    order = L.regions_class_order()
    assert len(order) == 45
    decoded = L.decode(np.array(order))  # (45, 45): column i = what label order[i] means
    assert decoded.diagonal().all()
    liver_tumor = L.class_index("Liver Tumor") - 1
    assert decoded[L.class_index("Liver") - 1, liver_tumor]


def test_encoding_of_random_multi_label_volumes_round_trips():
    rng = np.random.default_rng(0)
    choices = _all_valid_voxels()
    vol = choices[:, rng.integers(0, choices.shape[1], size=(7, 5, 4))]
    np.testing.assert_array_equal(L.decode(L.encode(vol)), vol)
    assert L.encode(vol).dtype == L.LABEL_DTYPE


def test_manifest_masks_and_stages():
    dj = {"dsm_manifest": make_manifest({
        "a": make_entry("btcv", ["Liver", "Spleen"]),
        "b": make_entry("lits", ["Liver", "Liver Tumor"]),
        "c": make_entry("lits", ["Liver"], subset="test"),
        "d": make_entry("msd", ["Pancreas", "Pancreas Tumor"], subset="inference"),
    })}
    m = load_manifest(dj)
    mask = m.annotated_mask(["b", "a"])
    assert mask.shape == (2, 45)
    assert set(np.flatnonzero(mask[0]) + 1) == {6, 31} and set(np.flatnonzero(mask[1]) + 1) == {1, 6}
    assert m.training_cases(1) == ["a"] and m.training_cases(2) == ["a", "b"]


@pytest.mark.parametrize("bad, match", [
    ({}, "has no 'dsm_manifest'"),
    ({"dsm_manifest": {"cases": {"x": {"source": "btcv", "annotated": ["Lever"]}}}}, "unknown annotated class"),
    ({"dsm_manifest": {"cases": {"x": {"annotated": ["Liver"]}}}}, "needs 'source'"),
])
def test_manifest_errors_name_the_file_and_the_fix(bad, match):
    with pytest.raises(ManifestError, match=match) as e:
        load_manifest(bad, where="/data/Dataset500/dataset.json")
    assert "/data/Dataset500/dataset.json" in str(e.value)
