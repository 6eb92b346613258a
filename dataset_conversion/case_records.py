"""The converter's per-case records: which files a case produces, and the record that says they are convert's own
and up to date.

Before a case's files are written, ``<dataset>/.dsm_convert/done/<case>.json`` claims them (:func:`claim_outputs`);
once they are in place it is completed (:func:`complete_record`) with a fingerprint of the input files (relative
path, size, mtime, ctime; SHA-1 for a file whose ctime changed) and a key of the conversion options. A re-run
reuses a case whose record matches and whose outputs are present (:func:`load_done`). Records are written
atomically (:mod:`nnunetv2_dsm.io_utils`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import List, Optional

from nnunetv2_dsm.io_utils import atomic_write_text

from .spec import CaseFiles, Source
from .summary import CaseResult

CONVERTER_VERSION = 1
FILE_ENDING = ".nii.gz"
STATE_DIR = ".dsm_convert"


def case_outputs(out: Path, case: CaseFiles) -> List[Path]:
    """The files a case produces in ``out``: image (and label, for a training case)."""
    if case.test:
        return [out / "imagesTs" / f"{case.case_id}_0000{FILE_ENDING}"]
    return [out / "imagesTr" / f"{case.case_id}_0000{FILE_ENDING}", out / "labelsTr" / f"{case.case_id}{FILE_ENDING}"]


def record_path(out: Path, case_id: str) -> Path:
    """``<dataset>/.dsm_convert/done/<case>.json``."""
    return out / STATE_DIR / "done" / f"{case_id}.json"


def fingerprint(case: CaseFiles, input_dir: Path) -> List[list]:
    """[relative path, size, mtime_ns, ctime_ns] of each input file of the case."""
    rows = []
    for path in case.input_files():
        stat = path.stat()
        try:
            rel = str(path.relative_to(input_dir))
        except ValueError:
            rel = str(path)
        rows.append([rel, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns])
    return rows


def sha1_of(path: Path) -> str:
    """The SHA-1 of a file's content, read in 4 MiB chunks."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def same_inputs(case: CaseFiles, input_dir: Path, record: dict) -> bool:
    """True if the case's input files are those of the record: same names, sizes and mtimes, and, for a file whose
    ctime changed (an edit that restored size and mtime, but also a chmod or a copy), the same SHA-1."""
    now, then = fingerprint(case, input_dir), record["fingerprint"]
    if [f[:3] for f in now] != [f[:3] for f in then]:
        return False
    files = case.input_files()
    return all(a[3:] == b[3:] or record["sha1"][i] == sha1_of(files[i]) for i, (a, b) in enumerate(zip(now, then)))


def options_key(source: Source, case: CaseFiles, opts: dict) -> str:
    """A hash of the converter version, the options and the case's label map: a change redoes the case."""
    label_map = sorted(map(repr, (case.label_map or source.labels).items()))
    payload = json.dumps([CONVERTER_VERSION, sorted(opts.items()), label_map], default=str)
    return hashlib.sha1(payload.encode()).hexdigest()


def load_done(source: Source, case: CaseFiles, out: Path, input_dir: Path, opts: dict) -> Optional[CaseResult]:
    """The recorded result if this case was already converted from the same inputs with the same options."""
    try:
        record = json.loads(record_path(out, case.case_id).read_text())
        if record["options"] != options_key(source, case, opts) or not same_inputs(case, input_dir, record):
            return None
        if any(not p.is_file() or p.stat().st_size != record["outputs"].get(p.name) for p in case_outputs(out, case)):
            return None
        return CaseResult(case.case_id, "done", case.test, record["annotated"], record["present"])
    except (OSError, ValueError, KeyError):
        return None


def claim_outputs(out: Path, case: CaseFiles, tmp_dir: Path) -> List[Path]:
    """Record the case's output files as convert's own before any is written; returns them (folders created)."""
    outputs = case_outputs(out, case)
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
    claim = {"case_id": case.case_id, "claimed": [p.name for p in outputs], "outputs": {}}
    atomic_write_text(record_path(out, case.case_id), json.dumps(claim), tmp_dir, skip_unchanged=True)
    return outputs


def complete_record(out: Path, case: CaseFiles, input_dir: Path, options: str, annotated: list, present: list,
                    tmp_dir: Path) -> None:
    """Complete the case's record once its outputs are in place: input fingerprint and SHA-1s, options key,
    output sizes, annotated and present classes."""
    record = {"case_id": case.case_id, "fingerprint": fingerprint(case, input_dir),
              "sha1": [sha1_of(f) for f in case.input_files()],
              "options": options, "outputs": {p.name: p.stat().st_size for p in case_outputs(out, case)},
              "annotated": annotated, "present": present, "test": case.test}
    atomic_write_text(record_path(out, case.case_id), json.dumps(record, indent=1), tmp_dir, skip_unchanged=True)
