"""Fault suite, nnUNetv2_dsm_convert: every fault gives the documented exit code and one line naming the file and
the fix (no traceback), and changes nothing outside the output dataset (checksums)."""
import json
import os
import shutil
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool

import nibabel as nib
import numpy as np
import pytest

from _fault_helpers import assert_error, btcv, btcv_files, checksums, rewrite, run, with_values
from nnunetv2_dsm.dataset_conversion import writer
from nnunetv2_dsm.dataset_conversion.cli import convert_main
from nnunetv2_dsm.dataset_conversion.fixtures import write_fixture
from nnunetv2_dsm.dataset_conversion.outputs import output_lock

OUT = "Dataset501_BTCV"


def convert(tmp_path, capsys, *extra, source="btcv", root=None):
    """Run convert on tmp_path/in -> tmp_path/raw and check that nothing outside the output dataset changed;
    returns (exit code, stderr) and keeps stdout in ``convert.out``."""
    before = checksums(tmp_path, [tmp_path / "raw"])
    code, err, out = run(convert_main, [source, root or tmp_path / "in", "-d", "501", "-o", tmp_path / "raw",
                                        "--no-progress", *extra], capsys)
    assert checksums(tmp_path, [tmp_path / "raw"]) == before
    convert.out = out
    return code, err


# ----------------------------------------------------------------------------------------------- bad voxel data
@pytest.mark.parametrize("bad", [[np.nan, np.nan], [np.inf, -np.inf]], ids=["nan", "inf"])
def test_nonfinite_ct_fails_the_case_with_the_count(tmp_path, capsys, bad):
    fx = btcv(tmp_path)
    img, _ = btcv_files(fx)
    rewrite(img, with_values(bad), np.float32)
    code, _ = convert(tmp_path, capsys)
    assert code == 1
    s = writer.convert_by_name("btcv", fx.root, 501, raw_dir=tmp_path / "raw", progress=False)
    line = next(r.error for r in s.failed)
    assert "holds 2 NaN or infinite voxels" in line and "--allow-nonfinite" in line and str(img) in line
    assert not (tmp_path / "raw" / OUT / "imagesTr" / "BTCV_0001_0000.nii.gz").exists()
    assert not (tmp_path / "raw" / OUT / "dataset.json").exists()


def test_nonfinite_ct_with_allow_flag_is_written_finite_with_a_warning(tmp_path, capsys):
    fx = btcv(tmp_path)
    img, _ = btcv_files(fx)
    rewrite(img, with_values([np.nan, np.inf, -np.inf]), np.float32)
    lowest = float(np.nanmin(np.where(np.isfinite(nib.load(str(img)).get_fdata()), nib.load(str(img)).get_fdata(),
                                      np.nan)))
    code, _ = convert(tmp_path, capsys, "--allow-nonfinite")
    assert code == 0
    assert "WARNING BTCV_0001: 3 NaN/infinite voxels" in convert.out
    out = nib.load(str(tmp_path / "raw" / OUT / "imagesTr" / "BTCV_0001_0000.nii.gz")).get_fdata()
    assert np.isfinite(out).all() and out.min() == lowest
    assert (out == lowest).sum() >= 3


def test_nonfinite_warning_is_in_the_summary(tmp_path):
    fx = btcv(tmp_path)
    img, _ = btcv_files(fx)
    rewrite(img, with_values([np.nan]), np.float32)
    s = writer.convert_by_name("btcv", fx.root, 501, raw_dir=tmp_path / "raw", progress=False, allow_nonfinite=True)
    assert s.ok and "WARNING BTCV_0001: 1 NaN/infinite voxels" in s.table()


def test_nan_in_a_float_label_is_an_error_not_background(tmp_path):
    fx = btcv(tmp_path)
    _, lab = btcv_files(fx)
    rewrite(lab, with_values([np.nan]), np.float32)
    s = writer.convert_by_name("btcv", fx.root, 501, raw_dir=tmp_path / "raw", progress=False)
    [r] = s.failed
    assert r.case_id == "BTCV_0001" and "holds 1 NaN or infinite values" in r.error and str(lab) in r.error


def test_label_file_given_as_the_ct_is_refused(tmp_path):
    fx = btcv(tmp_path)
    img, lab = btcv_files(fx)
    shutil.copyfile(lab, img)                                   # uint8 label map where the CT should be
    s = writer.convert_by_name("btcv", fx.root, 501, raw_dir=tmp_path / "raw", progress=False)
    [r] = s.failed
    assert "8-bit image" in r.error and "not a CT" in r.error and str(img) in r.error


def test_small_integer_image_is_refused_as_a_label_map(tmp_path):
    fx = btcv(tmp_path)
    img, lab = btcv_files(fx)
    rewrite(img, lambda a: np.where(a > 0, 3, 0), np.int16)
    s = writer.convert_by_name("btcv", fx.root, 501, raw_dir=tmp_path / "raw", progress=False)
    [r] = s.failed
    assert "label map, not a CT" in r.error


def test_truncated_image_fails_the_case(tmp_path, capsys):
    fx = btcv(tmp_path)
    img, _ = btcv_files(fx)
    img.write_bytes(img.read_bytes()[:-200])
    code, _ = convert(tmp_path, capsys)
    assert code == 1
    s = writer.convert_by_name("btcv", fx.root, 501, raw_dir=tmp_path / "raw", progress=False)
    assert "truncated" in s.failed[0].error and str(img) in s.failed[0].error


def test_edit_keeping_size_and_mtime_is_converted_again(tmp_path):
    fx = write_fixture("lits", tmp_path / "in", n_cases=1)
    lab = next(fx.root.rglob("segmentation-0.nii"))
    s1 = writer.convert_by_name("lits", fx.root, 501, raw_dir=tmp_path / "raw", progress=False)
    assert s1.ok
    out_lab = s1.dataset_dir / "labelsTr" / "LiTS_0000.nii.gz"
    before = nib.load(str(out_lab)).get_fdata()
    st = lab.stat()
    img = nib.load(str(lab))
    data = np.asarray(img.dataobj).copy()
    data[data == 1] = 0                                          # drop the liver, same size on disk (.nii)
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(lab))
    assert lab.stat().st_size == st.st_size
    os.utime(lab, ns=(st.st_atime_ns, st.st_mtime_ns))
    s2 = writer.convert_by_name("lits", fx.root, 501, raw_dir=tmp_path / "raw", progress=False)
    assert {r.case_id: r.status for r in s2.results}["LiTS_0000"] == "written"
    assert not np.array_equal(nib.load(str(out_lab)).get_fdata(), before)


def test_ctime_change_alone_is_not_a_reconversion(tmp_path):
    fx = btcv(tmp_path)
    s1 = writer.convert_by_name("btcv", fx.root, 501, raw_dir=tmp_path / "raw", progress=False)
    for p in fx.root.rglob("*.nii.gz"):
        os.chmod(p, 0o644)                                       # ctime changes, content does not
    s2 = writer.convert_by_name("btcv", fx.root, 501, raw_dir=tmp_path / "raw", progress=False)
    assert s1.ok and [r.status for r in s2.results] == ["done"] * len(s2.results)


# ------------------------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("np_arg", ["0", "-3", "two"])
def test_bad_number_of_processes_is_refused(tmp_path, capsys, np_arg):
    btcv(tmp_path)
    code, err = convert(tmp_path, capsys, "-np", np_arg)
    assert code == 2 and "-np" in err and "Traceback" not in err
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("name", ["..", "a/b", "-x", "with space"])
def test_unusable_dataset_name_is_refused(tmp_path, capsys, name):
    btcv(tmp_path)
    code, err = convert(tmp_path, capsys, f"--name={name}")
    assert_error(code, err, 2, "dataset name", "letters, digits")
    assert not list(tmp_path.rglob("Dataset*"))


def test_unknown_source_is_one_line(tmp_path, capsys):
    btcv(tmp_path)
    code, err = convert(tmp_path, capsys, source="nosuch")
    assert_error(code, err, 2, "unknown SOURCE 'nosuch'")


# ---------------------------------------------------------------------------------------------- bad output path
def test_output_path_that_is_a_file(tmp_path, capsys):
    btcv(tmp_path)
    (tmp_path / "raw").write_text("not a folder")
    code, err, out = run(convert_main, ["btcv", tmp_path / "in", "-d", "501", "-o", tmp_path / "raw", "--no-progress"],
                    capsys)
    assert_error(code, err, 2, str(tmp_path / "raw"), "is a file")
    assert (tmp_path / "raw").read_text() == "not a folder"


def test_output_path_that_cannot_be_created(tmp_path, capsys):
    btcv(tmp_path)
    code, err, out = run(convert_main, ["btcv", tmp_path / "in", "-d", "501", "-o", "/proc/dsm_no_such/raw",
                                   "--no-progress"], capsys)
    assert_error(code, err, 2, "/proc/dsm_no_such/raw")


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    btcv(tmp_path)
    code, err, out = run(convert_main, ["btcv", tmp_path / "in", "-d", "501", "-o", tmp_path / "raw", "--name", "..",
                                   "--debug"], capsys)
    assert code == 2 and "Traceback" in err and "error: dataset name" in err


# ------------------------------------------------------------------------- files convert did not write, locking
def test_own_file_at_an_output_name_is_not_overwritten(tmp_path, capsys):
    btcv(tmp_path)
    mine = tmp_path / "raw" / OUT / "imagesTr" / "BTCV_0001_0000.nii.gz"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own file")
    code, err = convert(tmp_path, capsys)
    assert_error(code, err, 2, str(mine), "did not write")
    assert mine.read_bytes() == b"my own file" and sorted(mine.parent.iterdir()) == [mine]


def test_foreign_dataset_json_is_not_replaced(tmp_path, capsys):
    btcv(tmp_path)
    js = tmp_path / "raw" / OUT / "dataset.json"
    js.parent.mkdir(parents=True)
    js.write_text('{"name": "mine"}')
    code, err = convert(tmp_path, capsys)
    assert_error(code, err, 2, str(js), "did not write")
    assert js.read_text() == '{"name": "mine"}'


def test_subfolder_in_imagesTr_is_refused(tmp_path, capsys):
    btcv(tmp_path)
    sub = tmp_path / "raw" / OUT / "imagesTr" / "extra"
    sub.mkdir(parents=True)
    (sub / "keep.txt").write_text("x")
    code, err = convert(tmp_path, capsys)
    assert_error(code, err, 2, str(sub))
    assert (sub / "keep.txt").read_text() == "x"


def test_second_run_on_the_same_output_is_refused_by_the_lock(tmp_path, capsys):
    btcv(tmp_path)
    out = tmp_path / "raw" / OUT
    with output_lock(out, "test"):
        (out / ".dsm_convert" / "tmp").mkdir(parents=True)
        (out / ".dsm_convert" / "tmp" / "other_run.part").write_bytes(b"partial")
        code, err, _ = run(convert_main, ["btcv", tmp_path / "in", "-d", "501", "-o", tmp_path / "raw",
                                          "--no-progress"], capsys)
        assert_error(code, err, 2, str(out), "another", "-d")
        assert (out / ".dsm_convert" / "tmp" / "other_run.part").read_bytes() == b"partial"
    code, _, _ = run(convert_main, ["btcv", tmp_path / "in", "-d", "501", "-o", tmp_path / "raw", "--no-progress"],
                  capsys)
    assert code == 0                                               # released with the holder


# --------------------------------------------------------------------------------------- input layout problems
def test_symlink_loop_is_named_not_a_duplicate_case(tmp_path, capsys):
    fx = btcv(tmp_path)
    os.symlink("..", fx.root / "RawData" / "Training" / "loop")
    code, err = convert(tmp_path, capsys)
    assert_error(code, err, 2, "symbolic link loop", "loop")
    assert "duplicate" not in err


@pytest.mark.parametrize("pid, problem", [("a..b", "'..'"), ("p\\1", "path separator"), ("p\x07", "non-printable")],
                         ids=["dots", "backslash", "control"])
def test_chaos_patient_folder_unusable_as_case_id_is_refused(tmp_path, capsys, pid, problem):
    fx = write_fixture("chaos", tmp_path / "in")
    folder = next(p for p in fx.root.rglob("DICOM_anon")).parent
    folder.rename(folder.with_name(pid))
    code, err = convert(tmp_path, capsys, source="chaos")
    assert_error(code, err, 2, "not usable as a file name", problem)
    assert not (tmp_path / "raw" / "Dataset501_CHAOS" / "imagesTr").exists()


def _strip_kits23_markers(base):
    """A KiTS23 copy without kits23.json, instances/ and case ids >= 300: only the folder name says 23."""
    for p in [base / "kits23.json", base / "case_00400", base / "case_00401", *base.rglob("instances")]:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def test_kits23_folder_without_markers_keeps_its_cysts(tmp_path):
    fx = write_fixture("kits", tmp_path / "in", version="23", n_cases=2)
    base = fx.root / "kits23" / "dataset"
    _strip_kits23_markers(base)
    s = writer.convert_by_name("kits", fx.root, 501, raw_dir=tmp_path / "raw", progress=False)
    assert s.ok, s.table()
    ds = json.loads((s.dataset_dir / "dataset.json").read_text())
    assert "Kidney Cyst" in ds["dsm_manifest"]["cases"]["KiTS_00000"]["annotated"]


def test_cyst_in_a_folder_taken_for_kits19_says_how_to_fix_it(tmp_path):
    fx = write_fixture("kits", tmp_path / "in", version="23", n_cases=2)
    base = fx.root / "kits23" / "dataset"
    _strip_kits23_markers(base)
    plain = tmp_path / "in2" / "data"
    plain.parent.mkdir()
    shutil.move(str(base), str(plain))
    s = writer.convert_by_name("kits", plain.parent, 501, raw_dir=tmp_path / "raw", progress=False)
    [r] = s.failed
    assert "label 3" in r.error and "kits23" in r.error and "background" not in r.error


# ------------------------------------------------------------------------------------- workers and interruption
class _DeadPool:
    """A ProcessPoolExecutor whose worker was killed (what the OOM killer leaves behind)."""

    def __init__(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def submit(self, *a, **k):
        f = Future()
        f.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
        return f


def test_killed_worker_fails_the_unfinished_cases_with_advice(tmp_path, capsys, monkeypatch):
    btcv(tmp_path)
    monkeypatch.setattr(writer, "ProcessPoolExecutor", _DeadPool)
    code, err, out = run(convert_main, ["btcv", tmp_path / "in", "-d", "501", "-o", tmp_path / "raw", "--no-progress",
                                   "-np", "2"], capsys)
    assert code == 1 and "Traceback" not in err
    assert "FAILED BTCV_0001: a worker process died" in out


def test_killed_worker_summary_names_each_case(tmp_path, monkeypatch):
    fx = btcv(tmp_path)
    monkeypatch.setattr(writer, "ProcessPoolExecutor", _DeadPool)
    s = writer.convert_by_name("btcv", fx.root, 501, raw_dir=tmp_path / "raw", progress=False, num_processes=2)
    assert [r.case_id for r in s.failed] == [r.case_id for r in s.results] and len(s.failed) == 3
    assert all("fewer processes (-np" in r.error for r in s.failed) and not s.dataset_json_written


def test_ctrl_c_exits_130(tmp_path, capsys, monkeypatch):
    btcv(tmp_path)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(writer, "_convert_case", interrupted)
    code, err = convert(tmp_path, capsys)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
