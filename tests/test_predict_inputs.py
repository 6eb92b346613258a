"""Input checks of nnUNetv2_dsm_predict that need no trained model."""
import pytest
import SimpleITK as sitk
import numpy as np

from nnunetv2_dsm.cli.predict import main
from nnunetv2_dsm.inference.predictor import PredictionError, check_model_folder, input_lists, slug


def _img(path, shape=(4, 5, 6)):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape, np.int16)), str(path), True)


def test_input_lists_groups_channels_and_checks_their_number(tmp_path):
    _img(tmp_path / "a_0000.nii.gz"), _img(tmp_path / "b_0000.nii.gz")
    (tmp_path / "._a_0000.nii.gz").write_bytes(b"junk")  # macOS AppleDouble files are ignored
    assert [[p.rsplit("/", 1)[1] for p in case] for case in input_lists(str(tmp_path), ".nii.gz", 1)] == \
        [["a_0000.nii.gz"], ["b_0000.nii.gz"]]
    _img(tmp_path / "b_0001.nii.gz")
    with pytest.raises(PredictionError, match=r"case b .* has channel files \['_0000.nii.gz', '_0001.nii.gz'\]"):
        input_lists(str(tmp_path), ".nii.gz", 1)


def test_unreadable_or_truncated_input_is_named(tmp_path):
    _img(tmp_path / "a_0000.nii.gz", (40, 40, 40))
    data = (tmp_path / "a_0000.nii.gz").read_bytes()
    (tmp_path / "a_0000.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(PredictionError, match="cannot read .*a_0000.nii.gz"):
        input_lists(str(tmp_path), ".nii.gz", 1)
    (tmp_path / "a_0000.nii.gz").unlink()
    (tmp_path / "x.nii.gz").write_bytes(b"")
    with pytest.raises(PredictionError, match="must be named <case>_0000.nii.gz"):
        input_lists(str(tmp_path), ".nii.gz", 1)


def test_missing_model_folder_or_fold(tmp_path):
    with pytest.raises(PredictionError, match="does not exist: train it first"):
        check_model_folder(str(tmp_path / "nope"), [0], "checkpoint_final.pth")
    (tmp_path / "fold_0").mkdir()
    with pytest.raises(PredictionError, match=r"fold_1.checkpoint_final.pth not found"):
        (tmp_path / "fold_0" / "checkpoint_final.pth").write_bytes(b"x")
        check_model_folder(str(tmp_path), [0, 1], "checkpoint_final.pth")


def test_empty_prompt_is_refused(capsys):
    with pytest.raises(SystemExit, match="empty prompt"):
        main(["-i", "x", "-o", "y", "-d", "1", "-c", "3d_fullres", "--prompts", " "])
    assert slug("Pancreas Tumor!") == "pancreas_tumor"
    with pytest.raises(PredictionError, match="empty"):
        slug("!!")
