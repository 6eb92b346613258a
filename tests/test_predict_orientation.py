"""nnUNetv2_dsm_predict on any input: files of any name, any orientation, DICOM series. A random-weight Stage 2
model from tiny plans (no training) is enough: the assertions are about geometry, not accuracy."""
import numpy as np
import SimpleITK as sitk
import torch

from _predict_helpers import model, phantom_lps, predict, reoriented, write_dicom_series  # noqa: F401 (fixture)
from nnunetv2_dsm.cli.predict import main
from nnunetv2_dsm.inference.inputs import Reorientation


def same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def lps_array(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS"))


def test_same_ct_in_any_orientation_gives_the_same_world_space_segmentation(model, tmp_path):
    lps = phantom_lps()
    inputs = {"lps": lps, "ras": reoriented(lps, "RAS"), "permuted": reoriented(lps, "IRA")}
    (tmp_path / "in").mkdir()
    for name, img in inputs.items():
        sitk.WriteImage(img, str(tmp_path / "in" / f"{name}.nii.gz"))
    assert predict(tmp_path / "in", tmp_path / "out", "--save_anomaly_maps", "--save_probabilities") == 0
    for name, img in inputs.items():  # every output on its input's own grid
        same_grid(sitk.ReadImage(str(tmp_path / "out" / f"{name}.nii.gz")), img)
        same_grid(sitk.ReadImage(str(tmp_path / "out" / "anomaly_maps" / f"{name}.nii.gz")), img)
    seg = {n: lps_array(tmp_path / "out" / f"{n}.nii.gz") for n in inputs}
    anomaly = {n: lps_array(tmp_path / "out" / "anomaly_maps" / f"{n}.nii.gz") for n in inputs}
    assert (seg["lps"] > 0).any()
    for n in ("ras", "permuted"):
        np.testing.assert_array_equal(seg[n], seg["lps"])
        np.testing.assert_allclose(anomaly[n], anomaly["lps"], atol=1e-5)
    # nnU-Net's npz: (45, *the input's own array shape), the same probabilities in world space
    probs = {n: np.load(tmp_path / "out" / f"{n}.npz")["probabilities"] for n in inputs}
    for n, img in inputs.items():
        assert probs[n].shape == (45, *sitk.GetArrayFromImage(img).shape)
        np.testing.assert_allclose(Reorientation.of(img).to_canonical(probs[n]), probs["lps"], atol=1e-6)
    # the prediction is not left/right symmetric, so a mirrored (unreoriented) one would have failed above
    assert np.abs(anomaly["lps"] - anomaly["lps"][..., ::-1]).max() > 1e-2


def test_dicom_series_gives_the_same_result_as_its_nifti(model, tmp_path):
    ct = phantom_lps(seed=1)
    write_dicom_series(ct, tmp_path / "series" / "CT_1")
    (tmp_path / "series" / "CT_1" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # an index: ignored
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    assert predict(tmp_path / "series", tmp_path / "out_dicom") == 0   # a folder of DICOM series folders
    assert predict(tmp_path / "ct.nii.gz", tmp_path / "out_nifti") == 0  # a single file of any name
    dicom, nifti = (sitk.ReadImage(str(p)) for p in (tmp_path / "out_dicom" / "CT_1.nii.gz",
                                                      tmp_path / "out_nifti" / "ct.nii.gz"))
    same_grid(dicom, ct)
    same_grid(nifti, ct)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(dicom), sitk.GetArrayFromImage(nifti))


def _fails(capsys, *args) -> str:
    assert predict(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nnUNetv2_dsm_predict: error: "), err
    return err[0]


def test_bad_input_exits_2_naming_the_file(model, tmp_path, capsys):
    ct = phantom_lps()
    write_dicom_series(ct, tmp_path / "two", prefix="A")
    write_dicom_series(ct, tmp_path / "two", prefix="B")
    assert "mixes 2 DICOM series" in _fails(capsys, tmp_path / "two", tmp_path / "o")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((28, 32), np.int16)), str(tmp_path / "slice.nii.gz"))
    assert "slice.nii.gz is a 2D image (32×28) but the model is 3D" in _fails(capsys, tmp_path / "slice.nii.gz",
                                                                             tmp_path / "o")
    assert "-step_size must lie in (0, 1]" in _fails(capsys, tmp_path / "slice.nii.gz", tmp_path / "o",
                                                     "-step_size", "0")
    # in a folder of several cases, an unusable one is skipped: the others are predicted, exit status 1
    (tmp_path / "batch").mkdir()
    sitk.WriteImage(ct, str(tmp_path / "batch" / "good.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((28, 32), np.int16)), str(tmp_path / "batch" / "flat.nii.gz"))
    assert predict(tmp_path / "batch", tmp_path / "o_batch") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of 2 cases could not be read" in err[0] and "flat.nii.gz is a 2D image" in err[0]
    assert (tmp_path / "o_batch" / "good.nii.gz").is_file()


def test_unknown_dataset_and_missing_gpu_are_one_line_errors(model, tmp_path, capsys):
    args = ["-i", str(tmp_path), "-o", str(tmp_path / "o"), "-c", "3d_fullres", "-f", "0"]
    assert main([*args, "-d", "996", "-device", "cpu"]) == 2
    assert "-d 996: unknown dataset" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*args, "-d", "997", "-device", "cuda"]) == 2
        assert "no CUDA GPU is visible" in capsys.readouterr().err
