"""Fault suite, nnUNetv2_dsm_evaluate: a truncated, corrupt or NaN/Inf file is an error naming it (SimpleITK alone
zero-fills a truncated file and reads NaN as 0, which used to be scored), exit 2 in one line, no summary written,
inputs unchanged."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from _fault_helpers import assert_error, checksums, run
from nnunetv2_dsm import labels as L
from nnunetv2_dsm.cli.evaluate import main

SHAPE = (24, 24, 24)


def write(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), True)


@pytest.fixture
def folders(tmp_path):
    """ref/pred/amap with one case: a noisy liver with a tumor and a spleen (so the gzip stream is long enough
    to cut)."""
    rng = np.random.default_rng(0)
    liver = rng.random(SHAPE) < 0.5
    spleen = ~liver & (rng.random(SHAPE) < 0.5)
    tumor = liver & (rng.random(SHAPE) < 0.2)
    lab = L.encode(L.multi_hot_from_classes({"Liver": liver, "Liver Tumor": tumor, "Spleen": spleen}, SHAPE))
    d = {k: tmp_path / k for k in ("ref", "pred", "amap")}
    for p in d.values():
        p.mkdir()
    write(d["ref"] / "c1.nii.gz", lab)
    write(d["pred"] / "c1.nii.gz", lab)
    write(d["amap"] / "c1.nii.gz", rng.random(SHAPE).astype(np.float32))
    return d


def evaluate(folders, capsys, *extra):
    """Run the command with -o tmp/out; check that the inputs did not change."""
    out = folders["ref"].parent / "out"
    before = checksums(folders["ref"].parent, [out])
    code, err, _ = run(main, ["-ref", folders["ref"], "-pred", folders["pred"], "-np", "1", "-q", "-o", out, *extra],
                       capsys)
    assert checksums(folders["ref"].parent, [out]) == before
    return code, err, out


def test_baseline_scores_one(folders, capsys):
    code, err, out = evaluate(folders, capsys, "--anomaly-maps", folders["amap"])
    assert code == 0 and json.loads((out / "summary.json").read_text())     # the intact inputs evaluate


@pytest.mark.parametrize("which", ["pred", "ref"])
def test_truncated_file_is_an_error_not_a_low_score(folders, capsys, which):
    f = folders[which] / "c1.nii.gz"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    code, err, out = evaluate(folders, capsys)
    assert_error(code, err, 2, str(f), "truncated")
    assert not (out / "summary.json").exists()


def test_corrupt_gzip_is_an_error(folders, capsys):
    f = folders["pred"] / "c1.nii.gz"
    data = bytearray(f.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    f.write_bytes(bytes(data))
    code, err, _ = evaluate(folders, capsys)
    assert_error(code, err, 2, str(f))


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_nonfinite_anomaly_map_is_an_error(folders, capsys, value):
    f = folders["amap"] / "c1.nii.gz"
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
    a[0, 0, :5] = value
    write(f, a)
    code, err, out = evaluate(folders, capsys, "--anomaly-maps", folders["amap"])
    assert_error(code, err, 2, str(f), "5 NaN or infinite values")
    assert not (out / "summary.json").exists()


def test_float_prediction_with_nan_is_an_error(folders, capsys):
    f = folders["pred"] / "c1.nii.gz"
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(f))).astype(np.float32)
    a[3, 3, 3] = np.nan
    write(f, a)
    code, err, _ = evaluate(folders, capsys)
    assert_error(code, err, 2, str(f), "1 NaN or infinite values")


def test_output_that_is_a_file(folders, capsys, tmp_path):
    target = tmp_path / "out"
    target.write_text("x")
    code, err, _ = run(main, ["-ref", folders["ref"], "-pred", folders["pred"], "-np", "1", "-o", target], capsys)
    assert_error(code, err, 2, str(target), "is a file")
    assert target.read_text() == "x"


@pytest.mark.parametrize("n", ["0", "-3"])
def test_bad_number_of_processes(folders, capsys, n):
    code, err, out = evaluate(folders, capsys, "-np", n)
    assert code == 2 and "-np must be >= 1" in err and not out.exists()


def test_debug_shows_the_traceback(folders, capsys):
    (folders["pred"] / "c1.nii.gz").unlink()
    code, err, _ = evaluate(folders, capsys, "--debug")
    assert code == 2 and "Traceback" in err and "error:" in err
