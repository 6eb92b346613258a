"""Fault suite, nnUNetv2_dsm_merge: it deletes or replaces only files it placed, refuses anything else naming it,
never links a file from outside its inputs, and reports bad inputs in one line; checksums show nothing outside the
merged dataset changed (nothing at all when it refuses)."""
import json
import shutil

import pytest

from _convert_helpers import convert_fixture
from _fault_helpers import assert_error, checksums, run
from nnunetv2_dsm.dataset_conversion import merge as merge_module
from nnunetv2_dsm.dataset_conversion.cli import merge_main
from nnunetv2_dsm.dataset_conversion.outputs import output_lock

OUT = "Dataset100_DSMUniversal"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Converted BTCV (11) and LiTS (12) datasets, five cases each, copied by every test."""
    tmp = tmp_path_factory.mktemp("merge_faults")
    for source, did in (("btcv", 11), ("lits", 12)):
        _, s = convert_fixture(tmp, source, did, n_cases=5)
        assert s.ok, s.table()
    return tmp / "raw"


@pytest.fixture
def raw(template, tmp_path):
    shutil.copytree(template, tmp_path / "raw", symlinks=True)
    return tmp_path / "raw"


def merge(raw, capsys, *extra):
    return run(merge_main, ["-d", "100", "-i", "11", "12", "-o", raw, *extra], capsys)


def refused_without_change(raw, capsys, *fragments, extra=()):
    """Merge again: exit 2 with one line holding ``fragments``, and not a byte or mtime changed anywhere."""
    before = checksums(raw.parent)
    code, err, _ = merge(raw, capsys, *extra)
    assert_error(code, err, 2, *fragments)
    assert checksums(raw.parent) == before


# ------------------------------------------------------------------------------------------ files it did not write
@pytest.mark.parametrize("where, name", [("imagesTs", "MyCase_0001_0000.nii.gz"), ("labelsTr", "README"),
                                         ("labelsTs", "MyCase_0001.nii.gz")])
def test_rerun_keeps_a_file_merge_did_not_write(raw, capsys, where, name):
    assert merge(raw, capsys)[0] == 0
    mine = raw / OUT / where / name
    mine.write_text("the user's own file")
    refused_without_change(raw, capsys, str(mine), "did not write", "Move it out")
    assert mine.read_text() == "the user's own file"


def test_subfolder_in_merged_imagesTr_is_refused(raw, capsys):
    assert merge(raw, capsys)[0] == 0
    (raw / OUT / "imagesTr" / "extra").mkdir()
    refused_without_change(raw, capsys, str(raw / OUT / "imagesTr" / "extra"), "a folder")


def test_other_split_removes_only_files_merge_placed(raw, capsys):
    assert merge(raw, capsys)[0] == 0
    before = checksums(raw, [raw / OUT])
    assert merge(raw, capsys, "--seed", "3")[0] == 0
    ds = json.loads((raw / OUT / "dataset.json").read_text())
    cases = ds["dsm_manifest"]["cases"]
    tr = sorted(p.name for p in (raw / OUT / "imagesTr").iterdir())
    assert tr == sorted(f"{c}_0000.nii.gz" for c, e in cases.items() if e["subset"] == "train")
    ts = sorted(p.name for p in (raw / OUT / "imagesTs").iterdir())
    assert ts == sorted(f"{c}_0000.nii.gz" for c, e in cases.items() if e["subset"] != "train")
    assert checksums(raw, [raw / OUT]) == before                   # the inputs are untouched


def test_interrupted_merge_resumes_and_owns_what_it_placed(raw, capsys, monkeypatch):
    real, calls = merge_module.place, []

    def interrupted(*a):
        calls.append(a)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(merge_module, "place", interrupted)
    code, err, _ = merge(raw, capsys)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    monkeypatch.setattr(merge_module, "place", real)
    assert merge(raw, capsys, "--seed", "5")[0] == 0               # the partial files are its own: no refusal


# ----------------------------------------------------------------------------------------- bad input datasets
def test_case_id_with_path_traversal_is_refused(raw, capsys, tmp_path):
    secret = tmp_path / "outside" / "SECRET_0000.nii.gz"
    secret.parent.mkdir()
    secret.write_bytes(b"secret")
    js = raw / "Dataset011_BTCV" / "dataset.json"
    ds = json.loads(js.read_text())
    ds["dsm_manifest"]["cases"]["../../../outside/SECRET"] = ds["dsm_manifest"]["cases"]["BTCV_0001"]
    js.write_text(json.dumps(ds))
    before = checksums(tmp_path)
    code, err, _ = merge(raw, capsys)
    assert_error(code, err, 2, "../../../outside/SECRET", "path separator")
    assert checksums(tmp_path) == before and not (raw / OUT).exists()


@pytest.mark.parametrize("content, fragment", [('{"labels": {', "not valid JSON"), ("[1, 2]", "JSON list")],
                         ids=["truncated", "list"])
def test_unusable_input_dataset_json_is_one_line(raw, capsys, content, fragment):
    js = raw / "Dataset012_LiTS" / "dataset.json"
    js.write_text(content)
    before = checksums(raw)
    code, err, _ = merge(raw, capsys)
    assert_error(code, err, 2, str(js), fragment)
    assert checksums(raw) == before


def test_truncated_merged_dataset_json_is_one_line(raw, capsys):
    assert merge(raw, capsys)[0] == 0
    js = raw / OUT / "dataset.json"
    js.write_text(js.read_text()[:100])
    refused_without_change(raw, capsys, str(js), "not valid JSON")


def test_sources_skips_a_dataset_json_that_is_not_an_object(raw, capsys):
    (raw / "Dataset013_Broken").mkdir()
    (raw / "Dataset013_Broken" / "dataset.json").write_text("[]")
    code, err, _ = run(merge_main, ["-d", "100", "--sources", "btcv", "lits", "-o", raw], capsys)
    assert code == 0 and "Traceback" not in err


# -------------------------------------------------------------------------------------- output path, lock, name
def test_output_path_that_is_a_file(raw, capsys, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    code, err, _ = run(merge_main, ["-d", "100", "-i", raw / "Dataset011_BTCV", "-o", target], capsys)
    assert_error(code, err, 2, str(target), "is a file")
    assert target.read_text() == "x"


def test_second_merge_into_the_same_output_is_refused_by_the_lock(raw, capsys):
    with output_lock(raw / OUT, "test"):
        code, err, _ = merge(raw, capsys)
        assert_error(code, err, 2, "another", str(raw / OUT))
        assert not (raw / OUT / "imagesTr").exists()
    assert merge(raw, capsys)[0] == 0


def test_name_dot_dot_is_refused(raw, capsys):
    before = checksums(raw.parent)
    code, err, _ = merge(raw, capsys, "--name", "..")
    assert_error(code, err, 2, "dataset name '..'")
    assert checksums(raw.parent) == before and not list(raw.glob("Dataset100_*"))


def test_merge_written_before_the_record_existed_can_change_its_split(raw, capsys):
    assert merge(raw, capsys)[0] == 0
    first = sorted(p.name for p in (raw / OUT / "imagesTr").iterdir())
    (raw / OUT / ".dsm_merge" / "written.json").unlink()          # as left by a version without the record
    assert merge(raw, capsys, "--seed", "7")[0] == 0              # its links to the inputs are recognised
    ds = json.loads((raw / OUT / "dataset.json").read_text())
    train = sorted(f"{c}_0000.nii.gz" for c, e in ds["dsm_manifest"]["cases"].items() if e["subset"] == "train")
    assert sorted(p.name for p in (raw / OUT / "imagesTr").iterdir()) == train != first   # old split removed
    (raw / OUT / ".dsm_merge" / "written.json").unlink()
    (raw / OUT / "imagesTr" / "Mine_0000.nii.gz").write_bytes(b"own")  # but not the user's own files
    refused_without_change(raw, capsys, "Mine_0000.nii.gz", "did not write")
