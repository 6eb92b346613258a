"""The one atomic write helper (nnunetv2_dsm.io_utils): replace or keep, never a partial file."""
import json
import os

import pytest

from nnunetv2_dsm.io_utils import atomic_open, atomic_save_json, atomic_target, atomic_write_bytes, atomic_write_text


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_save_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and path.read_text().endswith("\n")
    atomic_write_bytes(path, b"xyz")
    assert path.read_bytes() == b"xyz"
    assert os.listdir(path.parent) == ["a.json"]


def test_an_error_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(path, "w", encoding="utf-8") as handle:
            handle.write("partial")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_temporary_keeps_the_ending_in_tmp_dir(tmp_path):
    path, tmp_dir = tmp_path / "out" / "case.nii.gz", tmp_path / "tmp"
    with atomic_target(path, tmp_dir) as tmp:
        assert tmp.endswith(".nii.gz") and os.path.dirname(tmp) == str(tmp_dir)
        with open(tmp, "wb") as f:
            f.write(b"img")
    assert path.read_bytes() == b"img" and os.listdir(tmp_dir) == []


def test_skip_unchanged_keeps_the_mtime(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "same")
    os.utime(path, ns=(1, 1))
    atomic_write_text(path, "same", skip_unchanged=True)
    assert path.stat().st_mtime_ns == 1
    atomic_write_text(path, "other", skip_unchanged=True)
    assert path.read_text() == "other"
