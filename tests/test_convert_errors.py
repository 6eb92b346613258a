"""Bad input, resume after an interruption, idempotency, atomic writes, and the command line."""
import json
import os
import shutil
import stat

import nibabel as nib
import numpy as np
import pytest

from _convert_helpers import check_dataset, snapshot
from nnunetv2_dsm.dataset_conversion import writer
from nnunetv2_dsm.dataset_conversion.cli import convert_main
from nnunetv2_dsm.dataset_conversion.fixtures import write_fixture
from nnunetv2_dsm.dataset_conversion.spec import InputError
from nnunetv2_dsm.dataset_conversion.writer import convert_by_name


def _convert(fx, tmp_path, source=None, **kw):
    return convert_by_name(source or fx.source, fx.root, 501, raw_dir=tmp_path / "raw", progress=False, **kw)


def _btcv(tmp_path, n=3):
    return write_fixture("btcv", tmp_path / "in", n_cases=n)


def _rewrite_label(path, fn, dtype=None):
    img = nib.load(str(path))
    data = fn(np.asarray(img.dataobj).astype(np.float64))
    nib.save(nib.Nifti1Image(data.astype(dtype or img.get_data_dtype()), img.affine, img.header), str(path))


def test_image_without_label_and_label_without_image_are_documented_skips(tmp_path):
    fx = _btcv(tmp_path)
    (fx.root / "RawData/Training/label/label0002.nii.gz").unlink()
    (fx.root / "RawData/Training/img/img0003.nii.gz").unlink()
    s = _convert(fx, tmp_path)
    assert s.ok and s.dataset_json_written
    assert [r.case_id for r in s.results if not r.test] == ["BTCV_0001"]
    skipped = dict(s.notes.skipped)
    assert any("img0002" in k and "image without label" in v for k, v in skipped.items())
    assert any("label0003" in k and "label without image" in v for k, v in skipped.items())
    assert "SKIPPED" in s.table()


def test_corrupt_file_fails_the_case_naming_the_file(tmp_path, capsys):
    fx = _btcv(tmp_path)
    img = fx.root / "RawData/Training/img/img0002.nii.gz"
    img.write_bytes(img.read_bytes()[:300])                     # truncated download
    s = _convert(fx, tmp_path)
    assert not s.ok and not s.dataset_json_written and not (s.dataset_dir / "dataset.json").exists()
    (failed,) = s.failed
    assert failed.case_id == "BTCV_0002" and str(img) in failed.error and "extract it again" in failed.error
    assert "dataset.json NOT written" in s.table()
    # the CLI exits 1 and prints the table; --skip-failed writes dataset.json without the case
    assert convert_main(["btcv", str(fx.root), "-d", "501", "-o", str(tmp_path / "raw"), "--no-progress"]) == 1
    assert "FAILED BTCV_0002" in capsys.readouterr().out
    s = _convert(fx, tmp_path, skip_failed=True)
    ds = json.loads((s.dataset_dir / "dataset.json").read_text())
    assert sorted(ds["dsm_manifest"]["cases"]) == ["BTCV_0001", "BTCV_0003"] and ds["numTraining"] == 2


def test_unknown_label_value(tmp_path):
    fx = _btcv(tmp_path)
    lab = fx.root / "RawData/Training/label/label0001.nii.gz"
    _rewrite_label(lab, lambda a: np.where(a == 1, 99, a))
    s = _convert(fx, tmp_path)
    (failed,) = s.failed
    assert str(lab) in failed.error and "[99]" in failed.error and "--unknown-labels background" in failed.error
    s = _convert(fx, tmp_path, unknown_labels="background")
    assert s.ok and any("99" in w for r in s.results for w in r.warnings)
    assert "Spleen" not in next(r for r in s.results if r.case_id == "BTCV_0001").present


def test_float_labels_must_be_whole_numbers(tmp_path):
    fx = write_fixture("ct_org", tmp_path / "in")
    lab = fx.root / "OrganSegmentations/labels-21.nii.gz"
    _rewrite_label(lab, lambda a: np.where(a == 1, 1.5, a), np.float32)
    s = _convert(fx, tmp_path)
    (failed,) = s.failed
    assert str(lab) in failed.error and "non-integer" in failed.error and "1.5" in failed.error


def test_image_label_geometry_mismatch(tmp_path):
    fx = _btcv(tmp_path)
    lab = fx.root / "RawData/Training/label/label0001.nii.gz"
    img = nib.load(str(lab))
    aff = img.affine.copy()
    aff[:3, :3] *= 1.5
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), str(lab))
    s = _convert(fx, tmp_path)
    (failed,) = s.failed
    assert "geometry mismatch" in failed.error and str(lab) in failed.error and "img0001" in failed.error


def test_duplicate_case_ids(tmp_path):
    fx = write_fixture("lits", tmp_path / "in")
    batch = fx.root / "media/nas/01_Datasets/CT/LITS/Training Batch 1"
    copy = fx.root / "extra copy"
    copy.mkdir()
    shutil.copy(batch / "volume-0.nii", copy / "volume-0.nii")
    with pytest.raises(InputError, match="volume-0.nii.*volume-0.nii|two files for the same case id"):
        _convert(fx, tmp_path)


def test_empty_folder_and_wrong_source(tmp_path):
    (tmp_path / "empty" / "__MACOSX").mkdir(parents=True)
    (tmp_path / "empty" / "._junk").write_bytes(b"x")
    with pytest.raises(InputError, match="is empty"):
        convert_by_name("btcv", tmp_path / "empty", 501, raw_dir=tmp_path / "raw")
    fx = _btcv(tmp_path)
    with pytest.raises(InputError, match="no lits case found.*looks like a btcv dataset.*nnUNetv2_dsm_convert btcv"):
        _convert(fx, tmp_path, source="lits")
    assert convert_main(["lits", str(fx.root), "-d", "501", "-o", str(tmp_path / "raw")]) == 2
    with pytest.raises(InputError, match="unknown SOURCE"):
        convert_by_name("btvc", fx.root, 501, raw_dir=tmp_path / "raw")


def test_dataset_id_clash_and_foreign_files(tmp_path):
    fx = _btcv(tmp_path)
    (tmp_path / "raw" / "Dataset501_Other").mkdir(parents=True)
    with pytest.raises(InputError, match="unique ids"):
        _convert(fx, tmp_path)
    (tmp_path / "raw" / "Dataset501_Other").rmdir()
    s = _convert(fx, tmp_path)
    (s.dataset_dir / "imagesTr" / "Foreign_0001_0000.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="does not produce"):
        _convert(fx, tmp_path)


def test_idempotent_rerun_and_read_only_sources(tmp_path):
    fx = _btcv(tmp_path)
    for p in [fx.root, *fx.root.rglob("*")]:                    # sources are only read
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        s1 = _convert(fx, tmp_path)
        out1 = snapshot(s1.dataset_dir)
        s2 = _convert(fx, tmp_path)
        assert [r.status for r in s2.results] == ["done"] * len(fx.cases)
        assert snapshot(s2.dataset_dir) == out1                  # not a byte or an mtime changed
        assert "0 written, 3 already done" in s2.table()
    finally:
        for p in [fx.root, *fx.root.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    # a changed input file is converted again, the others are not
    lab = fx.root / "RawData/Training/label/label0002.nii.gz"
    lab.write_bytes(lab.read_bytes())
    os.utime(lab, ns=(1, 1))
    s3 = _convert(fx, tmp_path)
    assert {r.case_id: r.status for r in s3.results if r.status == "written"} == {"BTCV_0002": "written"}
    check_dataset(fx, s3.dataset_dir)


def test_interrupted_run_resumes_without_redoing_cases(tmp_path, monkeypatch):
    fx = _btcv(tmp_path, n=4)
    real, calls = writer._convert_case, []

    def interrupted(source, case, *a):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(case.case_id)
        return real(source, case, *a)

    monkeypatch.setattr(writer, "_convert_case", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _convert(fx, tmp_path)
    out = tmp_path / "raw" / "Dataset501_BTCV"
    assert not (out / "dataset.json").exists()
    first = snapshot(out / "imagesTr")
    monkeypatch.setattr(writer, "_convert_case", real)
    s = _convert(fx, tmp_path)
    assert {r.case_id for r in s.results if r.status == "done"} == set(calls)
    for k, v in first.items():
        assert snapshot(out / "imagesTr")[k] == v               # finished cases untouched
    check_dataset(fx, s.dataset_dir)


def test_writes_are_atomic(tmp_path, monkeypatch):
    fx = _btcv(tmp_path, n=2)
    real = writer._write_image

    def crash(img, dst, tmp_dir, level):
        if "labelsTr" in str(dst) and "0002" in dst.name:
            (tmp_dir / f"{os.getpid()}_{dst.name}").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(img, dst, tmp_dir, level)

    monkeypatch.setattr(writer, "_write_image", crash)
    with pytest.raises(KeyboardInterrupt):
        _convert(fx, tmp_path)
    out = tmp_path / "raw" / "Dataset501_BTCV"
    assert not (out / "labelsTr" / "BTCV_0002.nii.gz").exists()      # no partial file in place
    monkeypatch.setattr(writer, "_write_image", real)
    s = _convert(fx, tmp_path)
    assert {r.case_id: r.status for r in s.results}["BTCV_0002"] == "written"
    assert not (out / writer.STATE_DIR / "tmp").exists()
    check_dataset(fx, s.dataset_dir)


def test_cli_progress_summary_and_parallel(tmp_path, capsys):
    fx = write_fixture("word", tmp_path / "in")
    assert convert_main(["word", str(fx.root), "-d", "502", "-o", str(tmp_path / "raw"), "-np", "2"]) == 0
    out, err = capsys.readouterr()
    assert "word" in err and "3/3" in err                               # tqdm bar over cases
    assert "labelled cases (imagesTr): 2" in out and "Right Adrenal Gland" in out
    check_dataset(fx, tmp_path / "raw" / "Dataset502_WORD")


def test_chaos_positions_must_follow_the_file_name_order(tmp_path):
    import pydicom
    fx = write_fixture("chaos", tmp_path / "in")
    folder = fx.root / "Train_Sets/CT/1/DICOM_anon"
    a, b = folder / "i0003,0000b.dcm", folder / "i0007,0000b.dcm"
    da, db = pydicom.dcmread(str(a)), pydicom.dcmread(str(b))
    da.ImagePositionPatient, db.ImagePositionPatient = db.ImagePositionPatient, da.ImagePositionPatient
    da.save_as(str(a))
    db.save_as(str(b))
    s = _convert(fx, tmp_path)
    (failed,) = s.failed
    assert failed.case_id == "CHAOS_1" and "file-name order" in failed.error
