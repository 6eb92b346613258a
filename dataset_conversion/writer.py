"""The one shared writer: source cases -> ``$nnUNet_raw/DatasetID_Name`` in the DSM label space.

Per case: read the image (and label) with the source's quirks, put the label on the image grid, map it to the DSM
encoding (:mod:`.labelmap`), reorient both to LPS (exact axis permutation/flip, so every case of a merged dataset
has the same array orientation; ``keep_orientation`` turns this off), and write them atomically.

Atomic, resumable, idempotent:

* every file is written under ``<dataset>/.dsm_convert/tmp/`` and moved into place with ``os.replace``
  (:mod:`nnunetv2_dsm.io_utils`), so imagesTr/labelsTr never hold a partial file;
* before a case's files are written its record ``.dsm_convert/done/<case>.json`` (:mod:`.case_records`) claims
  them; after they are in place the record is completed (also atomically) with a fingerprint of its input files
  (relative path, size, mtime, ctime: an edit that keeps size and mtime still changes ctime) and the conversion
  options. A re-run skips every case whose record matches and whose outputs are present: an interrupted run
  resumes where it stopped, and a finished one rewrites only an identical dataset.json;
* convert never deletes or overwrites a file it did not write: an output file without a record, any other file in
  imagesTr/labelsTr/imagesTs, or a dataset.json it did not write makes it refuse, naming the file;
* one run at a time per output folder (:func:`.outputs.output_lock`);
* source files are only ever opened for reading.

Input checks besides the readers' (:mod:`.readers`): case ids must be usable file names
(:func:`nnunetv2_dsm.manifest.case_id_problem`); an image that looks like a label map (8-bit, few values, none
negative) is refused; NaN/Inf voxels in a CT fail the case with their count unless ``allow_nonfinite`` (then they
are written as the image's lowest finite value, with a warning); NaN/Inf in a label always fail the case.

A case that cannot be converted is reported in the summary with the file and the fix; by default dataset.json is
then not written (``skip_failed=True`` writes it without those cases).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Optional

import SimpleITK as sitk
from tqdm import tqdm

from nnunetv2_dsm.errors import writable_dir
from nnunetv2_dsm.io_utils import atomic_save_json, atomic_target
from nnunetv2_dsm.labels import dataset_json_labels, regions_class_order
from nnunetv2_dsm.manifest import MANIFEST_KEY, case_id_problem, make_entry, make_manifest

from . import readers
from .case_records import (CONVERTER_VERSION, FILE_ENDING, STATE_DIR, case_outputs, claim_outputs, complete_record,
                           load_done, options_key, record_path)
from .labelmap import apply_label_map, classes_present, targets_by_id
from .outputs import foreign_entries, output_lock, refuse_foreign
from .sources import get_source, guess_sources
from .summary import CaseResult, Summary
from .spec import CaseError, CaseFiles, ConversionError, InputError, Notes, Source, annotated_classes, walk_files

PROG = "nnUNetv2_dsm_convert"
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
WORKER_DIED = ("a worker process died before finishing this case (killed for lack of memory?); run again with "
               "fewer processes (-np 1 needs the least memory); finished cases are not redone")


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
    if not isinstance(name, str) or not DATASET_NAME.fullmatch(name):
        raise InputError(f"dataset name {name!r} is not usable: use letters, digits, '_' and '-' (starting with a "
                         f"letter or digit), e.g. --name BTCV")
    out = root / f"Dataset{int(dataset_id):03d}_{name}"
    if root.is_dir():
        clash = [p.name for p in root.glob(f"Dataset{int(dataset_id):03d}_*") if p.name != out.name]
        if clash:
            raise InputError(f"{root} already holds {clash[0]} with id {dataset_id}; nnU-Net needs unique ids. "
                             f"Choose another -d or remove that folder.")
    return out


def _write_image(img: sitk.Image, dst: Path, tmp_dir: Path, level: int) -> None:
    """Write ``img`` compressed at ``level`` to ``dst`` atomically (temporary file in ``tmp_dir``)."""
    with atomic_target(dst, tmp_dir) as tmp:
        sitk.WriteImage(img, tmp, True, level)


def convert_case(source_name: str, case: CaseFiles, out: Path, input_dir: Path, opts: dict) -> CaseResult:
    """Convert one case (in a worker process or inline). Never raises for bad input: returns a failed result."""
    source = get_source(source_name)
    try:
        return _convert_case(source, case, out, input_dir, opts)
    except ConversionError as e:
        return CaseResult(case.case_id, "failed", case.test, error=str(e))
    except MemoryError:
        return CaseResult(case.case_id, "failed", case.test, error="out of memory; run with fewer processes (-np)")


def _convert_case(source: Source, case: CaseFiles, out: Path, input_dir: Path, opts: dict) -> CaseResult:
    tmp_dir = out / STATE_DIR / "tmp"
    options = options_key(source, case, opts)                # before a reader sets a per-case map
    read_image = source.read_image or readers.read_nifti
    image = read_image(case)
    readers.check_not_label_map(image, case.input_files()[0])
    image, nonfinite = _finite_image(image, case, opts)
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
    outputs = claim_outputs(out, case, tmp_dir)                # ours before they exist
    src = Path(case.image) if not isinstance(case.image, (list, tuple)) else None
    if (source.read_image is None and not reorient and src is not None and src.name.endswith(FILE_ENDING)
            and not nonfinite):
        with atomic_target(outputs[0], tmp_dir) as tmp:
            shutil.copyfile(src, tmp)        # already nnU-Net-ready: copy the bytes, do not re-encode
    else:
        _write_image(image, outputs[0], tmp_dir, opts["compression_level"])
    if label is not None:
        _write_image(label, outputs[1], tmp_dir, 6)
    complete_record(out, case, input_dir, options, annotated, present, tmp_dir)
    warnings = ctx.notes.warnings + ([case.info["nonfinite_warning"]] if nonfinite else [])
    return CaseResult(case.case_id, "written", case.test, annotated, present, warnings=warnings)


def _finite_image(image: sitk.Image, case: CaseFiles, opts: dict):
    """(image, number of NaN/Inf voxels) with NaN/Inf handled: an error naming the count, or with
    ``allow_nonfinite`` those voxels set to the lowest finite value. SimpleITK's NIfTI reader turns them into 0
    silently, so the stored values are checked (:func:`.readers.nonfinite_mask`)."""
    path = case.input_files()[0]
    mask = readers.nonfinite_mask(path) if not isinstance(case.image, (list, tuple)) else None
    if mask is None:
        return image, 0
    n = int(mask.sum())
    if not opts.get("allow_nonfinite"):
        raise CaseError(f"{path} holds {n} NaN or infinite voxels of {mask.size}; a CT must hold finite HU values. "
                        f"Re-export the image, or pass --allow-nonfinite to write them as the image's lowest finite "
                        f"value.")
    arr = sitk.GetArrayFromImage(image)
    if arr.shape != mask.shape:      # a reader that reshaped the image: cannot map the voxels back
        raise CaseError(f"{path} holds {n} NaN or infinite voxels; re-export the image with finite values.")
    fill = arr[~mask].min() if n < mask.size else 0
    arr[mask] = fill
    fixed = sitk.GetImageFromArray(arr)
    fixed.CopyInformation(image)
    case.info["nonfinite_warning"] = f"{n} NaN/infinite voxels of {path} written as {fill} (--allow-nonfinite)"
    return fixed, n


def find_source_cases(source: Source, input_dir: Path, notes: Notes) -> List[CaseFiles]:
    """The source's cases under ``input_dir``, with the folder-level checks (empty, wrong source, duplicates)."""
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
        problem = case_id_problem(c.case_id)
        if problem:
            raise InputError(f"the case id {c.case_id!r} made from {c.input_files()[0]} is not usable as a file name "
                             f"({problem}). Rename the file or folder it comes from to letters, digits, '_' or '-'.")
        if c.case_id in seen:
            raise InputError(f"duplicate case id {c.case_id}: {seen[c.case_id].input_files()[0]} and "
                             f"{c.input_files()[0]}. Remove the duplicate copy and run again.")
        seen[c.case_id] = c
    return cases


def convert(source: Source, input_dir, dataset_id: int, name: Optional[str] = None, raw_dir=None,
            num_processes: int = 1, unknown_labels: str = "error", skip_failed: bool = False,
            keep_orientation: bool = False, compression_level: int = 1, progress: bool = True,
            allow_nonfinite: bool = False) -> Summary:
    """Convert the source dataset in ``input_dir`` to ``$nnUNet_raw/Dataset{id}_{name}``; returns the summary."""
    if int(num_processes) < 1:
        raise InputError(f"-np {num_processes}: the number of processes must be 1 or more")
    input_dir = Path(input_dir).resolve()
    notes = Notes()
    cases = find_source_cases(source, input_dir, notes)
    out = dataset_folder(writable_dir(raw_root(raw_dir), "-o"), dataset_id, name or source.title)
    opts = {"unknown_labels": unknown_labels, "keep_orientation": keep_orientation,
            "compression_level": compression_level, "allow_nonfinite": allow_nonfinite}
    with output_lock(out, PROG):
        _check_ours(out, cases)
        tmp_dir = out / STATE_DIR / "tmp"
        shutil.rmtree(tmp_dir, ignore_errors=True)        # leftovers of an interrupted run (the lock is ours)
        tmp_dir.mkdir(parents=True)
        results = _run_cases(source, cases, out, input_dir, opts, num_processes, progress)
        summary = Summary(source.name, out, [results[c.case_id] for c in cases], notes)
        ds_json = out / "dataset.json"
        if summary.failed and not skip_failed:
            ds_json.unlink(missing_ok=True)      # never leave a dataset.json that disagrees with the folder
        else:
            for r in summary.failed:             # outputs of an earlier successful run of a now-failing case
                for p in case_outputs(out, next(c for c in cases if c.case_id == r.case_id)):
                    p.unlink(missing_ok=True)
                record_path(out, r.case_id).unlink(missing_ok=True)
            _write_dataset_json(source, out, summary, input_dir, opts)
            summary.dataset_json_written = True
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return summary


def _check_ours(out: Path, cases: List[CaseFiles]) -> None:
    """Refuse, naming it, any file convert would delete or overwrite without having written it: files of
    imagesTr/labelsTr/imagesTs it does not produce, an output without its case record, a foreign dataset.json."""
    expected = {p: c for c in cases for p in case_outputs(out, c)}

    def ours(p: Path) -> bool:
        return p in expected and record_path(out, expected[p].case_id).is_file()
    foreign = foreign_entries([out / sub for sub in ("imagesTr", "labelsTr", "imagesTs")], ours)
    stale = [p for p in foreign if p not in expected]
    if stale:
        raise InputError(f"{out} holds {len(stale)} files that this conversion does not produce (e.g. {stale[0]}). "
                         f"They belong to another dataset or an earlier input folder: remove them, or choose another "
                         f"dataset id with -d.")
    refuse_foreign(foreign, out, PROG)                  # outputs of this conversion that it did not write
    js = out / "dataset.json"
    if js.is_file():
        try:
            data = json.loads(js.read_text())
        except (ValueError, UnicodeDecodeError):
            data = None
        if not (isinstance(data, dict) and "dsm_conversion" in data):
            refuse_foreign([js], out, PROG)


def _run_cases(source: Source, cases: List[CaseFiles], out: Path, input_dir: Path, opts: dict, num_processes: int,
               progress: bool) -> Dict[str, CaseResult]:
    """Every case's result: resumed from its record, or converted (in ``num_processes`` worker processes). A
    worker that dies (OOM killer) fails the cases not finished, with advice, instead of a traceback."""
    results: Dict[str, CaseResult] = {}
    todo = []
    for c in cases:
        done = load_done(source, c, out, input_dir, opts)
        if done is not None:
            results[c.case_id] = done
        else:
            todo.append(c)
    bar = tqdm(total=len(cases), initial=len(results), desc=f"{source.name}", unit="case", disable=not progress,
               file=sys.stderr)
    if num_processes > 1 and len(todo) > 1:
        try:
            with ProcessPoolExecutor(num_processes, mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(convert_case, source.name, c, out, input_dir, opts) for c in todo]
                for f in as_completed(futures):
                    r = f.result()
                    results[r.case_id] = r
                    bar.update()
        except BrokenProcessPool:
            for c in todo:
                results.setdefault(c.case_id, CaseResult(c.case_id, "failed", c.test, error=WORKER_DIED))
    else:
        for c in todo:
            results[c.case_id] = convert_case(source.name, c, out, input_dir, opts)
            bar.update()
    bar.close()
    return results


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
    atomic_save_json(out / "dataset.json", ds, out / STATE_DIR / "tmp", indent=2, skip_unchanged=True)


def convert_by_name(source_name: str, *args, **kwargs) -> Summary:
    """:func:`convert` with the source given by its SOURCE name (``btcv``, ``kits``, ...)."""
    return convert(get_source(source_name), *args, **kwargs)


__all__ = ["convert", "convert_by_name", "Summary", "CaseResult", "CaseError", "InputError", "raw_root",
           "dataset_folder", "FILE_ENDING", "STATE_DIR"]
