"""Input discovery, checks and reorientation of nnUNetv2_dsm_predict that need no trained model."""
import itertools

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_dsm.cli.predict import main
from nnunetv2_dsm.inference.inputs import (InputError, Reorientation, find_cases, load_case, read_image,
                                           select_part)
from nnunetv2_dsm.inference.predictor import PredictionError, check_model_folder, slug


def _img(path, shape=(4, 5, 6), dtype=np.int16):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape, dtype)), str(path), True)


def _names(cases):
    return [(c.case_id, [f.rsplit("/", 1)[1] for f in c.files]) for c in cases]


def test_nnunet_naming_groups_channels_and_checks_their_number(tmp_path):
    _img(tmp_path / "a_0000.nii.gz"), _img(tmp_path / "b_0000.nii.gz")
    (tmp_path / "._a_0000.nii.gz").write_bytes(b"junk")  # macOS AppleDouble files are ignored
    assert _names(find_cases(str(tmp_path), 1)) == [("a", ["a_0000.nii.gz"]), ("b", ["b_0000.nii.gz"])]
    _img(tmp_path / "b_0001.nii.gz")
    with pytest.raises(InputError, match=r"case b .* has channel files \['b_0000.nii.gz', 'b_0001.nii.gz'\]"):
        find_cases(str(tmp_path), 1)


def test_any_file_name_is_one_case_and_a_single_file_works(tmp_path):
    _img(tmp_path / "patient 7.nii"), _img(tmp_path / "ct.mha"), _img(tmp_path / "x_0000.nii.gz")
    assert _names(find_cases(str(tmp_path), 1)) == [("ct", ["ct.mha"]), ("patient 7", ["patient 7.nii"]),
                                                    ("x_0000", ["x_0000.nii.gz"])]
    assert _names(find_cases(str(tmp_path / "x_0000.nii.gz"), 1)) == [("x", ["x_0000.nii.gz"])]
    with pytest.raises(InputError, match="takes 2 channels per case"):
        find_cases(str(tmp_path), 2)
    with pytest.raises(InputError, match="does not exist"):
        find_cases(str(tmp_path / "nope"), 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images in"):
        find_cases(str(tmp_path / "empty"), 1)


def test_parts_split_the_cases_as_nnunet_does():
    assert select_part(list(range(7)), 3, 1) == [1, 4]
    with pytest.raises(InputError, match="-part_id must lie in 0 ... 2"):
        select_part([1], 3, 3)


def test_reorientation_is_exact_for_all_48_axis_orders():
    arr = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 2.0, 3.0))
    n = 0
    for axes in itertools.product("RL", "AP", "SI"):
        for code in map("".join, itertools.permutations(axes)):
            stored = sitk.DICOMOrient(img, code)
            r = Reorientation.of(stored)
            a = sitk.GetArrayFromImage(stored)
            np.testing.assert_array_equal(r.to_canonical(a), arr)
            np.testing.assert_array_equal(r.to_input(arr[None])[0], a)
            n += 1
    assert n == 48


def test_bad_images_are_named(tmp_path, capsys):
    _img(tmp_path / "a.nii.gz", (40, 40, 40))
    data = (tmp_path / "a.nii.gz").read_bytes()
    (tmp_path / "a.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="a.nii.gz is truncated"):
        read_image(str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.int16)), str(tmp_path / "slice.nii.gz"))
    with pytest.raises(InputError, match=r"slice.nii.gz is a 2D image \(6×5\) but the model is 3D"):
        read_image(str(tmp_path / "slice.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((5, 4, 3, 2), np.int16), np.eye(4)), str(tmp_path / "t.nii.gz"))
    with pytest.raises(InputError, match=r"t.nii.gz is a 4D image \(5×4×3×2\)"):
        read_image(str(tmp_path / "t.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 3), np.uint8), isVector=True), str(tmp_path / "c.nii.gz"))
    with pytest.raises(InputError, match=r"c.nii.gz has 3 components per voxel"):
        read_image(str(tmp_path / "c.nii.gz"))
    nan = np.zeros((4, 5, 6), np.float32)
    nan[0, 0, :3] = np.nan
    nan[1, 1, 1] = -5
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(tmp_path / "nan.nii.gz"))
    data, props = load_case(find_cases(str(tmp_path / "nan.nii.gz"))[0])
    assert "nan.nii.gz: 3 of 120 voxels are NaN or infinite; they are set to -5" in capsys.readouterr().err
    assert np.isfinite(data).all() and (data == -5).sum() == 4


def test_missing_model_folder_or_fold(tmp_path):
    with pytest.raises(PredictionError, match="does not exist: train it first"):
        check_model_folder(str(tmp_path / "nope"), [0], "checkpoint_final.pth")
    (tmp_path / "fold_0").mkdir()
    with pytest.raises(PredictionError, match=r"fold_1.checkpoint_final.pth not found"):
        (tmp_path / "fold_0" / "checkpoint_final.pth").write_bytes(b"x")
        check_model_folder(str(tmp_path), [0, 1], "checkpoint_final.pth")


@pytest.mark.parametrize("flags, message", [
    (["--prompts", " "], "empty prompt"),
    (["-f", "zero"], "-f takes fold numbers or 'all', got zero"),
    (["--roi_subset", "liverr"], "unknown class 'liverr'"),
])
def test_bad_flags_exit_2_with_one_line(flags, message, capsys):
    assert main(["-i", "x", "-o", "y", "-d", "1", "-c", "3d_fullres", "-device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("nnUNetv2_dsm_predict: error:")
    assert slug("Pancreas Tumor!") == "pancreas_tumor"
