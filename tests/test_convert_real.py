"""Converters on real CT (../shared/data/real_ct, or $NNUNETV2_DSM_SHARED/data/real_ct; skipped when absent).

The real files are linked into the layout each source is distributed in, then converted with the CLI's code path.
"""
import os

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk

from _convert_helpers import assert_same_grid, read, snapshot
from nnunetv2_dsm.dataset_conversion.fixtures import code
from nnunetv2_dsm.dataset_conversion.sources.totalsegmentator import LABELS as TS_LABELS, V2_NAMES
from nnunetv2_dsm.dataset_conversion.writer import convert_by_name
from nnunetv2_dsm.labels import region_values, class_index


def _link_tree(pairs):
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, dst)


def test_totalsegmentator_example_equals_shipped_multilabel(tmp_path, real_ct_dir):
    ts = real_ct_dir / "totalsegmentator"
    case = tmp_path / "in" / "s0000"
    _link_tree([(ts / "example_ct_sm.nii.gz", case / "ct.nii.gz")]
               + [(p, case / "segmentations" / p.name) for p in sorted((ts / "example_seg_fast").glob("*.nii.gz"))])
    before = snapshot(ts)
    summary = convert_by_name("totalsegmentator", tmp_path / "in", 1, raw_dir=tmp_path / "raw", progress=False)
    assert summary.ok, summary.table()
    assert snapshot(ts) == before
    # the shipped multi-label file (class_map["total"] ids), mapped through the same name table
    shipped = sitk.ReadImage(str(ts / "example_seg_fast.nii.gz"))
    lut = np.zeros(len(V2_NAMES) + 1, np.uint8)
    for i, name in enumerate(V2_NAMES, start=1):
        spec = TS_LABELS[name]
        lut[i] = code((spec,) if isinstance(spec, str) else spec) if spec else 0
    expected = sitk.GetImageFromArray(lut[sitk.GetArrayFromImage(shipped)])
    expected.CopyInformation(shipped)
    expected = sitk.DICOMOrient(expected, "LPS")
    lab, larr = read(summary.dataset_dir / "labelsTr" / "TS_s0000.nii.gz")
    img, iarr = read(summary.dataset_dir / "imagesTr" / "TS_s0000_0000.nii.gz")
    assert_same_grid(lab, expected)
    assert_same_grid(img, lab)
    np.testing.assert_array_equal(larr, sitk.GetArrayFromImage(expected))
    np.testing.assert_array_equal(iarr, sitk.GetArrayFromImage(sitk.DICOMOrient(
        sitk.ReadImage(str(ts / "example_ct_sm.nii.gz")), "LPS")))
    # sanity: real anatomy under the converted masks; right organs on the patient's right (LPS x < 0)
    liver = np.isin(larr, region_values(class_index("Liver")))
    assert 20 < iarr[liver].mean() < 80
    for right, left in (("Right Kidney", "Left Kidney"), ("Right Lung", "Left Lung")):
        xr = np.nonzero(np.isin(larr, region_values(class_index(right))))[2].mean()
        xl = np.nonzero(np.isin(larr, region_values(class_index(left))))[2].mean()
        assert xr < xl, f"{right} should have smaller LPS x than {left}"


def test_chaos_sample_pairs_slices_by_name(tmp_path, real_ct_dir):
    ch = real_ct_dir / "chaos_ct"
    pid = tmp_path / "in" / "Train_Sets" / "CT" / "21"
    _link_tree([(p, pid / "DICOM_anon" / p.name) for p in sorted((ch / "DICOM_anon").iterdir())]
               + [(p, pid / "Ground" / p.name) for p in sorted((ch / "Ground").iterdir())])
    summary = convert_by_name("chaos", tmp_path / "in", 2, raw_dir=tmp_path / "raw", progress=False)
    assert summary.ok, summary.table()
    img, iarr = read(summary.dataset_dir / "imagesTr" / "CHAOS_21_0000.nii.gz")
    lab, larr = read(summary.dataset_dir / "labelsTr" / "CHAOS_21.nii.gz")
    assert larr.shape == iarr.shape == (40, 512, 512)
    assert set(np.unique(larr)) <= {0, class_index("Liver")}
    liver = larr > 0
    assert 100 <= iarr[liver].mean() <= 180, iarr[liver].mean()
    # the 7 most superior slices (file names i0000-i0006) hold no liver
    z = np.array([img.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(larr.shape[0])])
    assert liver[np.argsort(-z)[:7]].sum() == 0
    # the check has teeth: a z-flipped or transposed pairing falls outside the range
    assert not 100 <= iarr[liver[::-1]].mean() <= 180
    assert not 100 <= iarr[liver.transpose(0, 2, 1)].mean() <= 180


def test_dicom_series_with_flipped_nifti_label_aligns_in_physical_space(tmp_path, real_ct_dir):
    """The TotalSegmentator DICOM series + its NIfTI label (stored y-flipped) laid out as a Pancreas-CT case;
    the label is the liver (TotalSegmentator id 5), so 'Pancreas' below is the liver."""
    ts = real_ct_dir / "totalsegmentator"
    series = tmp_path / "in" / "Pancreas-CT" / "PANCREAS_0001" / "11-24-2015-PANCREAS0001-Pancreas-1" / "Pancreas-2"
    pairs = []
    for p in sorted((ts / "example_ct_dicom").iterdir()):
        n = int(pydicom.dcmread(str(p), stop_before_pixels=True).InstanceNumber)
        pairs.append((p, series / f"1-{n:03d}.dcm"))
    _link_tree(pairs)
    seg = nib.load(str(ts / "example_seg_dicom.nii.gz"))
    liver = (np.asarray(seg.dataobj) == 5).astype(np.uint8)
    out = tmp_path / "in" / "TCIA_pancreas_labels-02-05-2017" / "label0001.nii.gz"
    out.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(liver, seg.affine, seg.header), str(out))
    summary = convert_by_name("pancreas_ct", tmp_path / "in", 3, raw_dir=tmp_path / "raw", progress=False)
    assert summary.ok, summary.table()
    img, iarr = read(summary.dataset_dir / "imagesTr" / "PancreasCT_0001_0000.nii.gz")
    lab, larr = read(summary.dataset_dir / "labelsTr" / "PancreasCT_0001.nii.gz")
    assert_same_grid(img, lab)
    assert iarr.shape == (20, 512, 512)
    mask = larr > 0
    assert mask.sum() == liver.sum()                      # exact flip: not a voxel lost or gained
    assert 40 <= iarr[mask].mean() <= 140, iarr[mask].mean()
    # pairing the arrays by index (what a naive converter does) fails the same check
    index_paired = sitk.GetArrayFromImage(sitk.ReadImage(str(ts / "example_seg_dicom.nii.gz"))) == 5
    assert not 40 <= iarr[index_paired].mean() <= 140


def test_left_right_split_on_real_anatomy(tmp_path, real_ct_dir):
    """The TotalSegmentator example as a CT-ORG case (float32; one label for both lungs, one for both kidneys):
    the split must give back TotalSegmentator's own sides, voxel for voxel."""
    ts = real_ct_dir / "totalsegmentator"
    ct = sitk.ReadImage(str(ts / "example_ct_sm.nii.gz"))
    mask = lambda n: sitk.GetArrayFromImage(sitk.ReadImage(str(ts / "example_seg_fast" / f"{n}.nii.gz"))) > 0  # noqa
    right = {"Lung": mask("lung_upper_lobe_right") | mask("lung_middle_lobe_right") | mask("lung_lower_lobe_right"),
             "Kidney": mask("kidney_right")}
    left = {"Lung": mask("lung_upper_lobe_left") | mask("lung_lower_lobe_left"), "Kidney": mask("kidney_left")}
    lab = np.zeros(right["Lung"].shape, np.float32)
    lab[mask("liver")] = 1
    for organ, value in (("Lung", 3), ("Kidney", 4)):
        lab[right[organ] | left[organ]] = value
    folder = tmp_path / "in" / "OrganSegmentations"
    folder.mkdir(parents=True)
    for arr, name in ((sitk.GetArrayFromImage(ct).astype(np.float32), "volume-7.nii.gz"), (lab, "labels-7.nii.gz")):
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(ct)
        sitk.WriteImage(img, str(folder / name), True)
    summary = convert_by_name("ct_org", tmp_path / "in", 4, raw_dir=tmp_path / "raw", progress=False)
    assert summary.ok, summary.table()
    out = sitk.ReadImage(str(summary.dataset_dir / "labelsTr" / "CTORG_7.nii.gz"))
    back = sitk.GetArrayFromImage(sitk.DICOMOrient(out, "RAS"))      # back to the example's own orientation
    for organ in ("Lung", "Kidney"):
        assert right[organ].sum() > 100 and left[organ].sum() > 100
        np.testing.assert_array_equal(back[right[organ]], class_index(f"Right {organ}"))
        np.testing.assert_array_equal(back[left[organ]], class_index(f"Left {organ}"))
