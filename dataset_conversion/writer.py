"""The one shared writer: source cases -> ``$nnUNet_raw/DatasetID_Name`` in the DSM label space.

Per case: read the image (and label) with the source's quirks, put the label on the image grid, map it to the DSM
encoding (:mod:`.labelmap`), reorient both to LPS (exact axis permutation/flip, so every case of a merged dataset
has the same array orientation; ``keep_orientation`` turns this off), and write them atomically.

Atomic, resumable, idempotent:

* every file is written under ``<dataset>/.dsm_convert/tmp/`` and moved into place with ``os.replace``, so
  imagesTr/labelsTr never hold a partial file;
* after a case's files are in place a record ``.dsm_convert/done/<case>.json`` is written (also atomically) with a
  fingerprint of its input files (relative path, size, mtime) and the conversion options. A re-run skips every case
  whose record matches and whose outputs are present: an interrupted run resumes where it stopped, and a finished
  one rewrites only an identical dataset.json;
* source files are only ever opened for reading.

A case that cannot be converted is reported in the summary with the file and the fix; by default dataset.json is
then not written (``skip_failed=True`` writes it without those cases).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Optional

import SimpleITK as sitk

from nnunetv2_dsm.labels import CLASS_NAMES, dataset_json_labels, regions_class_order
from nnunetv2_dsm.manifest import MANIFEST_KEY, make_entry, make_manifest

from . import readers
from .labelmap import apply_label_map, classes_present, targets_by_id
from .spec import CaseError, CaseFiles, ConversionError, InputError, Notes, Source, annotated_classes, walk_files

CONVERTER_VERSION = 1
FILE_ENDING = ".nii.gz"
STATE_DIR = ".dsm_convert"


@dataclass
class CaseResult:
    """Outcome of one case: status, annotated and present classes, the error or warnings."""
    case_id: str
    status: str                       # written | done (resumed) | failed
    test: bool = False
    annotated: List[str] = field(default_factory=list)
    present: List[str] = field(default_factory=list)
    error: str = ""
    warnings: List[str] = field(default_factory=list)


@dataclass
class Summary:
    """What a conversion did; ``table()`` is the text printed at the end."""
    source: str
    dataset_dir: Path
    results: List[CaseResult]
    notes: Notes
    dataset_json_written: bool = False

    def by_status(self, status: str, test: Optional[bool] = None) -> List[CaseResult]:
        return [r for r in self.results if r.status == status and (test is None or r.test == test)]

    @property
    def failed(self) -> List[CaseResult]:
        return self.by_status("failed")

    @property
    def ok(self) -> bool:
        return not self.failed

    def table(self) -> str:
        tr = [r for r in self.results if r.status != "failed" and not r.test]
        ts = [r for r in self.results if r.status != "failed" and r.test]
        lines = [f"nnUNetv2_dsm_convert {self.source} -> {self.dataset_dir}",
                 f"  labelled cases (imagesTr): {len(tr)} ({len(self.by_status('written', False))} written, "
                 f"{len(self.by_status('done', False))} already done)",
                 f"  test images (imagesTs):    {len(ts)} ({len(self.by_status('written', True))} written, "
                 f"{len(self.by_status('done', True))} already done)",
                 f"  skipped: {len(self.notes.skipped)}    failed: {len(self.failed)}"]
        annotated = {n: sum(n in r.annotated for r in tr) for n in CLASS_NAMES}
        present = {n: sum(n in r.present for r in tr) for n in CLASS_NAMES}
        rows = [n for n in CLASS_NAMES if annotated[n] or present[n]]
        if rows:
            w = max(len(n) for n in rows)
            lines.append(f"  {'class':<{w}}  annotated  present")
            lines += [f"  {n:<{w}}  {annotated[n]:>9}  {present[n]:>7}" for n in rows]
        for what, why in self.notes.skipped:
            lines.append(f"  SKIPPED {what}: {why}")
        for r in self.results:
            lines += [f"  WARNING {r.case_id}: {w}" for w in r.warnings]
        lines += [f"  WARNING {w}" for w in self.notes.warnings]
        for r in self.failed:
            lines.append(f"  FAILED {r.case_id}: {r.error}")
        if self.failed:
            lines.append("  dataset.json " + ("written without the failed cases (--skip-failed)." if
                                             self.dataset_json_written else
                                             "NOT written: fix the files above and run the same command again "
                                             "(finished cases are not redone), or pass --skip-failed."))
        return "\n".join(lines)


class _Ctx:
    """What a source's read_label needs besides the case and image."""

    def __init__(self, label_grid: str, image_name: str, unknown: str):
        self.label_grid, self.image_name, self.unknown = label_grid, image_name, unknown
        self.notes = Notes()


def raw_root(raw_dir=None) -> Path:
    """``raw_dir`` or ``$nnUNet_raw`` (an ``_EnvPath`` in nnunetv2 2.8.1, hence ``os.fspath``)."""
    if raw_dir is None:
        raw_dir = os.environ.get("nnUNet_raw")
        if not raw_dir:
            raise InputError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (see nnU-Net's "
                             "documentation/set_environment_variables.md) or pass -o.")
    return Path(os.fspath(raw_dir))


def dataset_folder(root: Path, dataset_id: int, name: str) -> Path:
    """``root/Dataset{id:03d}_{name}``; another folder with the same id is an error (nnU-Net needs unique ids)."""
    if not 1 <= int(dataset_id) <= 999:
        raise InputError(f"dataset id {dataset_id} must be within 1..999")
    if not name or any(c in name for c in "/\\ "):
        raise InputError(f"dataset name {name!r} must be non-empty without spaces or slashes")
    out = root / f"Dataset{int(dataset_id):03d}_{name}"
    if root.is_dir():
        clash = [p.name for p in root.glob(f"Dataset{int(dataset_id):03d}_*") if p.name != out.name]
        if clash:
            raise InputError(f"{root} already holds {clash[0]} with id {dataset_id}; nnU-Net needs unique ids. "
                             f"Choose another -d or remove that folder.")
    return out


def atomic_write_text(path: Path, text: str, tmp_dir: Path) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (nothing if ``path`` already holds it)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text() == text:
        return                                    # unchanged: keep the file (and its mtime) as it is
    tmp = tmp_dir / f"{path.name}.{os.getpid()}.part"
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_image(img: sitk.Image, dst: Path, tmp_dir: Path, level: int) -> None:
    tmp = tmp_dir / f"{os.getpid()}_{dst.name}"
    sitk.WriteImage(img, str(tmp), True, level)
    os.replace(tmp, dst)


def _fingerprint(case: CaseFiles, input_dir: Path) -> List[list]:
    out = []
    for f in case.input_files():
        st = f.stat()
        try:
            rel = str(f.relative_to(input_dir))
        except ValueError:
            rel = str(f)
        out.append([rel, st.st_size, st.st_mtime_ns])
    return out


def _options_key(source: Source, case: CaseFiles, opts: dict) -> str:
    payload = json.dumps([CONVERTER_VERSION, sorted(opts.items()), sorted(map(repr, (case.label_map or source.labels)
                                                                                .items()))], default=str)
    return hashlib.sha1(payload.encode()).hexdigest()


def _outputs(out: Path, case: CaseFiles) -> List[Path]:
    if case.test:
        return [out / "imagesTs" / f"{case.case_id}_0000{FILE_ENDING}"]
    return [out / "imagesTr" / f"{case.case_id}_0000{FILE_ENDING}", out / "labelsTr" / f"{case.case_id}{FILE_ENDING}"]


def _record_path(out: Path, case_id: str) -> Path:
    return out / STATE_DIR / "done" / f"{case_id}.json"


def _load_done(source: Source, case: CaseFiles, out: Path, input_dir: Path, opts: dict) -> Optional[CaseResult]:
    """The recorded result if this case was already converted from the same inputs with the same options."""
    try:
        rec = json.loads(_record_path(out, case.case_id).read_text())
        if rec["fingerprint"] != _fingerprint(case, input_dir) or rec["options"] != _options_key(source, case, opts):
            return None
        if any(not p.is_file() or p.stat().st_size != rec["outputs"].get(p.name) for p in _outputs(out, case)):
            return None
        return CaseResult(case.case_id, "done", case.test, rec["annotated"], rec["present"])
    except (OSError, ValueError, KeyError):
        return None


def convert_case(source_name: str, case: CaseFiles, out: Path, input_dir: Path, opts: dict) -> CaseResult:
    """Convert one case (in a worker process or inline). Never raises for bad input: returns a failed result."""
    from .sources import get_source
    source = get_source(source_name)
    try:
        return _convert_case(source, case, out, input_dir, opts)
    except ConversionError as e:
        return CaseResult(case.case_id, "failed", case.test, error=str(e))
    except MemoryError:
        return CaseResult(case.case_id, "failed", case.test, error="out of memory; run with fewer processes (-np)")


def _convert_case(source: Source, case: CaseFiles, out: Path, input_dir: Path, opts: dict) -> CaseResult:
    tmp_dir = out / STATE_DIR / "tmp"
    options_key = _options_key(source, case, opts)           # before a reader sets a per-case map
    read_image = source.read_image or readers.read_nifti
    image = read_image(case)
    image_name = str(case.image if not isinstance(case.image, (list, tuple)) else Path(case.image[0]).parent)
    ctx = _Ctx(source.label_grid, image_name, opts["unknown_labels"])
    annotated, present, label = [], [], None
    if not case.test:
        raw = (source.read_label or readers.read_nifti_label)(case, image, ctx)
        label_map = case.label_map or source.labels          # a reader may set a per-case map (TotalSegmentator)
        annotated = annotated_classes(label_map)
        label_file = Path(case.label) if not isinstance(case.label, (list, tuple, dict)) else Path(image_name)
        enc = apply_label_map(raw, targets_by_id(label_map, source.name), image, label_file,
                              opts["unknown_labels"], ctx.notes)
        del raw
        present = classes_present(enc)
        label = sitk.GetImageFromArray(enc)
        label.CopyInformation(image)
        del enc
    reorient = not opts["keep_orientation"] and not readers.is_canonical(image)
    if reorient:
        image = readers.canonical(image)
        label = readers.canonical(label) if label is not None else None
    outputs = _outputs(out, case)
    for p in outputs:
        p.parent.mkdir(parents=True, exist_ok=True)
    src = Path(case.image) if not isinstance(case.image, (list, tuple)) else None
    if (source.read_image is None and not reorient and src is not None and src.name.endswith(FILE_ENDING)):
        tmp = tmp_dir / f"{os.getpid()}_{outputs[0].name}"
        shutil.copyfile(src, tmp)            # already nnU-Net-ready: copy the bytes, do not re-encode
        os.replace(tmp, outputs[0])
    else:
        _write_image(image, outputs[0], tmp_dir, opts["compression_level"])
    if label is not None:
        _write_image(label, outputs[1], tmp_dir, 6)
    record = {"case_id": case.case_id, "fingerprint": _fingerprint(case, input_dir),
              "options": options_key, "outputs": {p.name: p.stat().st_size for p in outputs},
              "annotated": annotated, "present": present, "test": case.test}
    atomic_write_text(_record_path(out, case.case_id), json.dumps(record, indent=1), tmp_dir)
    return CaseResult(case.case_id, "written", case.test, annotated, present, warnings=ctx.notes.warnings)


def find_source_cases(source: Source, input_dir: Path, notes: Notes) -> List[CaseFiles]:
    """The source's cases under ``input_dir``, with the folder-level checks (empty, wrong source, duplicates)."""
    from .sources import guess_sources
    if not input_dir.is_dir():
        raise InputError(f"INPUT_DIR {input_dir} does not exist or is not a folder.")
    if next(iter(walk_files(input_dir)), None) is None:
        raise InputError(f"INPUT_DIR {input_dir} is empty (or holds only hidden/__MACOSX files). Point it at the "
                         f"unpacked {source.name} dataset.")
    cases = source.find_cases(input_dir, notes)
    if not cases:
        guess = [s for s in guess_sources(input_dir) if s != source.name]
        hint = (f" It looks like a {' or '.join(guess)} dataset: run nnUNetv2_dsm_convert {guess[0]} {input_dir} "
                f"...") if guess else ""
        raise InputError(f"no {source.name} case found under {input_dir}. Expected layout: {source.expected_layout}."
                         f"{hint}")
    seen: Dict[str, CaseFiles] = {}
    for c in cases:
        if c.case_id in seen:
            raise InputError(f"duplicate case id {c.case_id}: {seen[c.case_id].input_files()[0]} and "
                             f"{c.input_files()[0]}. Remove the duplicate copy and run again.")
        seen[c.case_id] = c
    return cases


def convert(source: Source, input_dir, dataset_id: int, name: Optional[str] = None, raw_dir=None,
            num_processes: int = 1, unknown_labels: str = "error", skip_failed: bool = False,
            keep_orientation: bool = False, compression_level: int = 1, progress: bool = True) -> Summary:
    """Convert the source dataset in ``input_dir`` to ``$nnUNet_raw/Dataset{id}_{name}``; returns the summary."""
    from tqdm import tqdm
    input_dir = Path(input_dir).resolve()
    notes = Notes()
    cases = find_source_cases(source, input_dir, notes)
    out = dataset_folder(raw_root(raw_dir), dataset_id, name or source.title)
    expected = {p for c in cases for p in _outputs(out, c)}
    stale = sorted(p for sub in ("imagesTr", "labelsTr", "imagesTs") if (out / sub).is_dir()
                   for p in (out / sub).iterdir() if p not in expected)
    if stale:
        raise InputError(f"{out} holds {len(stale)} files that this conversion does not produce (e.g. {stale[0]}). "
                         f"They belong to another dataset or an earlier input folder: remove them, or choose another "
                         f"dataset id with -d.")
    tmp_dir = out / STATE_DIR / "tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)        # leftovers of an interrupted run
    tmp_dir.mkdir(parents=True)
    opts = {"unknown_labels": unknown_labels, "keep_orientation": keep_orientation,
            "compression_level": compression_level}
    results: Dict[str, CaseResult] = {}
    todo = []
    for c in cases:
        done = _load_done(source, c, out, input_dir, opts)
        if done is not None:
            results[c.case_id] = done
        else:
            todo.append(c)
    bar = tqdm(total=len(cases), initial=len(results), desc=f"{source.name}", unit="case", disable=not progress,
               file=sys.stderr)
    if num_processes > 1 and len(todo) > 1:
        with ProcessPoolExecutor(num_processes, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(convert_case, source.name, c, out, input_dir, opts) for c in todo]
            for f in as_completed(futures):
                r = f.result()
                results[r.case_id] = r
                bar.update()
    else:
        for c in todo:
            results[c.case_id] = convert_case(source.name, c, out, input_dir, opts)
            bar.update()
    bar.close()
    summary = Summary(source.name, out, [results[c.case_id] for c in cases], notes)
    ds_json = out / "dataset.json"
    if summary.failed and not skip_failed:
        ds_json.unlink(missing_ok=True)      # never leave a dataset.json that disagrees with the folder
    else:
        for r in summary.failed:             # outputs of an earlier successful run of a now-failing case
            for p in _outputs(out, next(c for c in cases if c.case_id == r.case_id)):
                p.unlink(missing_ok=True)
            _record_path(out, r.case_id).unlink(missing_ok=True)
        _write_dataset_json(source, out, summary, input_dir, opts)
        summary.dataset_json_written = True
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return summary


def _write_dataset_json(source: Source, out: Path, summary: Summary, input_dir: Path, opts: dict) -> None:
    ok = [r for r in summary.results if r.status != "failed"]
    entries = {r.case_id: make_entry(source.name, r.annotated, subset="train") for r in ok if not r.test}
    ds = {
        "channel_names": {"0": "CT"},
        "labels": dataset_json_labels(),
        "regions_class_order": regions_class_order(),
        "numTraining": len(entries),
        "file_ending": FILE_ENDING,
        "name": out.name.split("_", 1)[1],
        "description": f"{source.title} converted to the DSM 45-class label space by nnUNetv2_dsm_convert",
        "reference": source.reference,
        "licence": source.licence,
        MANIFEST_KEY: make_manifest(entries),
        "dsm_conversion": {"source": source.name, "converter_version": CONVERTER_VERSION,
                           "input_dir": str(input_dir), "reoriented_to_LPS": not opts["keep_orientation"],
                           "unknown_labels": opts["unknown_labels"],
                           "imagesTs": sorted(r.case_id for r in ok if r.test)},
    }
    atomic_write_text(out / "dataset.json", json.dumps(ds, indent=2, sort_keys=False) + "\n", out / STATE_DIR / "tmp")


def convert_by_name(source_name: str, *args, **kwargs) -> Summary:
    """:func:`convert` with the source given by its SOURCE name (``btcv``, ``kits``, ...)."""
    from .sources import get_source
    return convert(get_source(source_name), *args, **kwargs)


__all__ = ["convert", "convert_by_name", "Summary", "CaseResult", "CaseError", "InputError", "raw_root",
           "dataset_folder", "atomic_write_text", "FILE_ENDING", "STATE_DIR"]
