"""Folder-level DSM evaluation: per case and class DSC, and per tumor class voxel-level AUROC / FPR95.

Inputs (see docs/evaluation.md for the full conventions):

* reference folder: ``<case>.nii.gz`` integer label maps in the DSM encoding (:mod:`nnunetv2_dsm.labels`);
* prediction folder: ``<case>.nii.gz`` nnU-Net label maps, optionally ``<case>.npz`` with ``probabilities``
  (45, z, y, x) -- nnU-Net's ``--save_probabilities`` output, in the axis order of ``sitk.GetArrayFromImage``
  (``export_prediction`` reverts nnU-Net's transpose before saving), channel ``i`` = class ``i + 1``;
* optional anomaly-map folder: float ``<case>.nii.gz`` (Eq. 14, higher = more anomalous), image geometry.

Classes evaluated for a case: the manifest's ``annotated`` classes when a dataset.json with ``dsm_manifest`` is
given (an annotated class absent from the reference is a true empty), else the classes present in the reference;
``classes`` narrows either. Everything is computed from integer-label histograms and one boolean mask at a time,
so a 512 x 512 x 300 case needs a few hundred MB per worker (plus one score volume).
"""
from __future__ import annotations

import json
import math
import multiprocessing
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_dsm.labels import (CLASS_NAMES, MAX_LABEL, NUM_CLASSES, NUM_ORGANS, TUMOR_HOSTS, class_index,
                                 class_name, decode, names_to_indices)
from nnunetv2_dsm.manifest import load_manifest
from nnunetv2_dsm.evaluation.metrics import SortedScores, dice_from_counts
from nnunetv2_dsm.evaluation.report import (DSM_SUMMARY, METRICS, format_table, metrics_rows,  # noqa: F401
                                            write_outputs)

SUFFIX = ".nii.gz"
REGIONS = ("host", "volume")
SCORE_SOURCES = ("auto", "anomaly", "probabilities")
DSC_SOURCES = ("labels", "probabilities")
GEOMETRY_TOL = 1e-3
PROBABILITY_THRESHOLD = 0.5
FALLBACK_REGION = "volume (no host annotation)"
CONVENTIONS = {
    "DSC": "2|P&R|/(|P|+|R|); null (NaN) when reference and prediction are both empty, excluded from means",
    "AUROC": "voxel-level Mann-Whitney (ties 1/2) of the scores vs the reference tumor mask in the region; "
             "null when the region has no tumor or no non-tumor voxel",
    "FPR95": "FPR at the first threshold (high to low) with TPR >= 0.95, ties included",
    "region": "host = reference host organ(s) of the tumor (labels.TUMOR_HOSTS, annotated ones) united "
              "with the tumor; volume = all voxels; no annotated host -> " + FALLBACK_REGION}
_V = MAX_LABEL + 1
_LUT = decode(np.arange(_V))  # (45, V) bool: integer label v belongs to class c + 1
_CHUNK = 1 << 24


class EvaluationError(RuntimeError):
    """A problem with the inputs (missing / unreadable file, geometry mismatch, bad labels); names the files."""


@dataclass(frozen=True)
class CaseJob:
    """Everything one worker needs to evaluate one case (picklable)."""
    case: str
    ref: str
    pred: Optional[str]            # label map; None when DSC comes from probabilities
    npz: Optional[str]             # probabilities, when DSC or scores need them
    anomaly: Optional[str]
    annotated: Optional[Tuple[int, ...]]  # manifest classes (1-based); None: classes present in the reference
    class_filter: Optional[Tuple[int, ...]]
    region: str = "host"
    scores: str = "none"           # "anomaly" | "probabilities" | "none"
    dsc_from: str = "labels"
    tolerance: float = GEOMETRY_TOL


# ----------------------------------------------------------------------------------------------------------- io
def _read_image(path: str):
    import SimpleITK as sitk

    from nnunetv2_dsm.dataset_conversion.readers import check_complete_and_finite
    from nnunetv2_dsm.dataset_conversion.spec import ConversionError
    try:  # SimpleITK zero-fills a truncated file and reads NaN/Inf as 0: both would be scored silently
        check_complete_and_finite(Path(path))
    except ConversionError as e:
        raise EvaluationError(str(e)) from None
    try:
        img = sitk.ReadImage(str(path))
    except Exception as e:  # SimpleITK raises RuntimeError with a long ITK trace
        raise EvaluationError(f"cannot read {path}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}") \
            from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise EvaluationError(f"{path} has {img.GetNumberOfComponentsPerPixel()} components per voxel; expected a "
                              f"scalar image")
    return img


def check_geometry(ref_img, ref_path: str, other_img, other_path: str, tol: float = GEOMETRY_TOL) -> None:
    """Raise :class:`EvaluationError` naming both files unless size match and spacing/origin/direction agree
    within ``tol`` (absolute: mm for spacing and origin, direction cosines unitless)."""
    diffs = []
    if tuple(ref_img.GetSize()) != tuple(other_img.GetSize()):
        diffs.append(f"size {tuple(other_img.GetSize())} vs {tuple(ref_img.GetSize())}")
    else:
        for what in ("Spacing", "Origin", "Direction"):
            a, b = (np.asarray(getattr(im, "Get" + what)(), float) for im in (other_img, ref_img))
            if a.shape != b.shape or not np.allclose(a, b, rtol=0, atol=tol):
                diffs.append(f"{what.lower()} {tuple(np.round(a, 6))} vs {tuple(np.round(b, 6))}")
    if diffs:
        raise EvaluationError(f"geometry of {other_path} does not match the reference {ref_path}: "
                              f"{'; '.join(diffs)} (tolerance {tol}). Resample the prediction to the reference grid.")


def _label_array(img, path: str) -> np.ndarray:
    import SimpleITK as sitk
    a = sitk.GetArrayFromImage(img)
    if a.dtype.kind == "f":
        ai = a.astype(np.int32)
        if not np.array_equal(ai, a):
            raise EvaluationError(f"{path} is not an integer label map (non-integer values)")
        a = ai
    elif a.dtype.kind not in "iu":
        raise EvaluationError(f"{path} has voxel type {a.dtype}; expected an integer label map")
    if a.size and (a.min() < 0 or a.max() > MAX_LABEL):
        bad = np.unique(a[(a < 0) | (a > MAX_LABEL)])[:5].tolist()
        raise EvaluationError(f"{path} holds label values {bad} outside the DSM encoding 0..{MAX_LABEL}; is it a "
                              f"DSM label map (nnunetv2_dsm.labels.encode)?")
    return a


def _value_counts(a: np.ndarray) -> np.ndarray:
    flat, out = a.reshape(-1), np.zeros(_V, np.int64)
    for s in range(0, flat.size, _CHUNK):
        out += np.bincount(flat[s:s + _CHUNK], minlength=_V)
    return out


def _joint_counts(ref: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(V, V) int64 histogram of (reference value, predicted value) pairs, in chunks."""
    r, p, out = ref.reshape(-1), pred.reshape(-1), np.zeros(_V * _V, np.int64)
    for s in range(0, r.size, _CHUNK):
        idx = r[s:s + _CHUNK].astype(np.intp) * _V
        idx += p[s:s + _CHUNK]
        out += np.bincount(idx, minlength=_V * _V)
    return out.reshape(_V, _V)


def iter_probability_channels(path: str, channels: Sequence[int], spatial_shape: Sequence[int],
                              key: str = "probabilities") -> Iterator[Tuple[int, np.ndarray]]:
    """Yield ``(channel, array)`` for the given 0-based channels (ascending) of ``key`` in an nnU-Net ``.npz``.

    The (C, *S) array is C-ordered, so channel c is one contiguous block: it is decompressed as a stream and only
    one channel is held in memory at a time (a 45-channel float32 CT would need > 10 GB at once).
    """
    want = (NUM_CLASSES, *map(int, spatial_shape))
    try:
        with zipfile.ZipFile(path) as zf:
            if key + ".npy" not in zf.namelist():
                raise EvaluationError(f"{path} has no array {key!r} (it holds "
                                      f"{[n[:-4] for n in zf.namelist()]}); save it with --save_probabilities")
            with zf.open(key + ".npy") as f:
                version = np.lib.format.read_magic(f)
                reader = {(1, 0): np.lib.format.read_array_header_1_0,
                          (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                shape, fortran, dtype = reader(f) if reader else (None, True, None)
                if shape is not None and tuple(shape) != want:
                    hint = " -- this is the (C, x, y, z) layout of NibabelIO; only nnU-Net's default SimpleITKIO " \
                        "layout (C, z, y, x) is supported" if tuple(shape[1:]) == want[:0:-1] else ""
                    raise EvaluationError(f"{path}: {key} has shape {tuple(shape)}, expected {want} (45 class "
                                          f"channels, then the reference's SimpleITK array shape){hint}")
                if fortran or dtype.hasobject:  # unusual layout: load it whole
                    arr = np.load(path)[key]
                    if arr.shape != want:
                        raise EvaluationError(f"{path}: {key} has shape {arr.shape}, expected {want}")
                    for c in channels:
                        yield c, arr[c]
                    return
                per, at = int(np.prod(want[1:])) * dtype.itemsize, 0
                for c in sorted(channels):
                    if c * per > at:
                        f.seek(c * per - at, 1)  # forward seek: decompress and discard
                    buf = f.read(per)
                    if len(buf) != per:
                        raise EvaluationError(f"{path} is truncated (channel {c} incomplete)")
                    at = (c + 1) * per
                    yield c, np.frombuffer(buf, dtype).reshape(want[1:])
    except (OSError, zipfile.BadZipFile, zlib.error, ValueError, EOFError) as e:
        raise EvaluationError(f"cannot read {path}: {e}") from None


# ----------------------------------------------------------------------------------------------------- per case
def _select_classes(job: CaseJob, present: np.ndarray) -> Tuple[List[int], set]:
    """(classes to evaluate, classes whose reference masks count as annotated -- for the host region)."""
    available = set(job.annotated) if job.annotated is not None else \
        {i + 1 for i in np.flatnonzero(present)}
    chosen = sorted(available if job.class_filter is None else available & set(job.class_filter))
    return chosen, available


def _detection(scores: np.ndarray, ref: np.ndarray, c: int, available: set, region: str, where: str) -> dict:
    tumor = _LUT[c - 1][ref]
    mask, used = None, "volume"
    if region == "host":
        hosts = [class_index(h) for h in TUMOR_HOSTS[class_name(c)] if class_index(h) in available]
        if hosts:
            mask, used = _LUT[[h - 1 for h in hosts] + [c - 1]].any(0)[ref], "host"
        else:
            used = FALLBACK_REGION
    try:
        s = SortedScores.from_arrays(scores, tumor, mask)
    except ValueError as e:
        raise EvaluationError(f"{where}: {e}") from None
    return {"AUROC": s.auroc(), "FPR95": s.fpr_at_tpr(0.95), "region": used,
            "n_region_voxels": s.n_pos + s.n_neg, "n_tumor_voxels": s.n_pos}


def evaluate_case(job: CaseJob) -> dict:
    """Metrics of one case: ``{class name: {"DSC", "n_ref", "n_pred"[, "AUROC", "FPR95", "region", ...]}}``."""
    import SimpleITK as sitk
    ref_img = _read_image(job.ref)
    ref = _label_array(ref_img, job.ref)
    ref_counts = _value_counts(ref)
    classes, available = _select_classes(job, _LUT[:, ref_counts > 0].any(1))
    out: Dict[str, dict] = {class_name(c): {} for c in classes}
    lut = _LUT.astype(np.int64)
    if job.dsc_from == "labels":
        pred_img = _read_image(job.pred)
        check_geometry(ref_img, job.ref, pred_img, job.pred, job.tolerance)
        joint = _joint_counts(ref, _label_array(pred_img, job.pred))
        tp, n_ref, n_pred = ((lut @ joint) * lut).sum(1), lut @ joint.sum(1), lut @ joint.sum(0)
        for c in classes:
            out[class_name(c)].update(DSC=dice_from_counts(int(tp[c - 1]), int(n_pred[c - 1]), int(n_ref[c - 1])),
                                      n_ref=int(n_ref[c - 1]), n_pred=int(n_pred[c - 1]))
    tumors = [c for c in classes if c > NUM_ORGANS]
    channels = set(classes) if job.dsc_from == "probabilities" else set()
    if job.scores == "probabilities":
        channels |= set(tumors)
    for ch, prob in (iter_probability_channels(job.npz, sorted(c - 1 for c in channels), ref.shape)
                     if channels else ()):
        c, rec = ch + 1, out[class_name(ch + 1)]
        if job.dsc_from == "probabilities":
            pred_mask, ref_mask = prob > PROBABILITY_THRESHOLD, _LUT[ch][ref]
            tp_c, n_p, n_r = (int(np.count_nonzero(m)) for m in (pred_mask & ref_mask, pred_mask, ref_mask))
            rec.update(DSC=dice_from_counts(tp_c, n_p, n_r), n_ref=n_r, n_pred=n_p)
        if job.scores == "probabilities" and c in tumors:
            rec.update(_detection(prob, ref, c, available, job.region, job.npz), scores="probabilities")
    if job.scores == "anomaly" and tumors:
        amap_img = _read_image(job.anomaly)
        check_geometry(ref_img, job.ref, amap_img, job.anomaly, job.tolerance)
        amap = sitk.GetArrayFromImage(amap_img)
        for c in tumors:
            out[class_name(c)].update(_detection(amap, ref, c, available, job.region, job.anomaly), scores="anomaly")
    return out


# --------------------------------------------------------------------------------------------------- the folder
def parse_classes(names: Optional[Iterable[str]]) -> Optional[Tuple[int, ...]]:
    """Class names (``CLASS_NAMES`` spelling) or the words ``organs`` / ``tumors`` -> 1-based indices."""
    if not names:
        return None
    out = set()
    for n in names:
        key = n.strip().lower()
        if key in ("organs", "organ"):
            out |= set(range(1, NUM_ORGANS + 1))
        elif key in ("tumours", "tumors", "tumour", "tumor"):
            out |= set(range(NUM_ORGANS + 1, NUM_CLASSES + 1))
        else:
            out |= set(names_to_indices([n]))
    return tuple(sorted(out))


def _cases_in(folder: Path) -> List[str]:
    return sorted(p.name[:-len(SUFFIX)] for p in folder.iterdir() if p.name.endswith(SUFFIX) and p.is_file())


def aggregate(cases: Dict[str, Dict[str, dict]]) -> Dict[str, dict]:
    """Per class, in class order: ``n_cases`` and, per metric, the mean over cases where it is defined (NaN
    values -- empty/empty DSC, undefined AUROC -- are left out) with its count ``n_<metric>``."""
    means: Dict[str, dict] = {}
    for name in CLASS_NAMES:
        recs = [(case, r[name]) for case, r in cases.items() if name in r]
        if not recs:
            continue
        entry: dict = {"n_cases": len(recs)}
        for m in METRICS:
            vals = [r[m] for _, r in recs if m in r and not math.isnan(r[m])]
            if any(m in r for _, r in recs):
                entry[m], entry["n_" + m] = (sum(vals) / len(vals) if vals else float("nan")), len(vals)
        fallback = [case for case, r in recs if r.get("region") == FALLBACK_REGION]
        if fallback:
            entry["volume_fallback_cases"] = fallback
        means[name] = entry
    return means


def evaluate_folder(ref_dir, pred_dir, anomaly_dir=None, dataset_json=None, region: str = "host",
                    classes: Optional[Iterable[str]] = None, scores: str = "auto", dsc_from: str = "labels",
                    skip_missing: bool = False, num_processes: int = 2, output_dir=None,
                    tolerance: float = GEOMETRY_TOL, write: bool = True) -> dict:
    """Evaluate every reference case; return the summary dict and (``write``) save summary.json + metrics.csv.

    ``output_dir`` defaults to ``pred_dir``. ``scores``: ``auto`` uses the anomaly maps when ``anomaly_dir`` is
    given, else a case's ``.npz`` probabilities when present, else no AUROC/FPR95 for it. Missing predictions
    (or anomaly maps / required npz) raise :class:`EvaluationError` listing the cases unless ``skip_missing``.
    """
    if region not in REGIONS or scores not in SCORE_SOURCES or dsc_from not in DSC_SOURCES:
        raise ValueError(f"region must be one of {REGIONS}, scores one of {SCORE_SOURCES}, dsc_from one of "
                         f"{DSC_SOURCES}; got {region!r}, {scores!r}, {dsc_from!r}")
    ref_dir, pred_dir = Path(ref_dir), Path(pred_dir)
    anomaly_dir = Path(anomaly_dir) if anomaly_dir else None
    for what, d in (("reference", ref_dir), ("prediction", pred_dir), ("anomaly-map", anomaly_dir)):
        if d is not None and not d.is_dir():
            raise EvaluationError(f"{what} folder {d} does not exist")
    if scores == "anomaly" and anomaly_dir is None:
        raise EvaluationError("scores='anomaly' needs an anomaly-map folder (--anomaly_maps)")
    case_ids = _cases_in(ref_dir)
    if not case_ids:
        raise EvaluationError(f"no {SUFFIX} files in the reference folder {ref_dir}")
    manifest = _read_manifest(dataset_json) if dataset_json else None
    class_filter = parse_classes(classes)
    jobs, missing, notes = _case_jobs(case_ids, ref_dir, pred_dir, anomaly_dir, manifest, class_filter, region,
                                      scores, dsc_from, tolerance)
    if missing and not skip_missing:
        listing = "; ".join(f"{c}: {', '.join(f)}" for c, f in list(missing.items())[:20])
        more = f" (and {len(missing) - 20} more)" if len(missing) > 20 else ""
        raise EvaluationError(f"{len(missing)} of {len(case_ids)} reference cases lack files: {listing}{more}. "
                              f"Pass --skip_missing to evaluate only the complete cases.")
    if not jobs:
        raise EvaluationError("no case left to evaluate (every case lacks a prediction)")
    if num_processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            results = pool.map(evaluate_case, jobs, chunksize=1)
    else:
        results = [evaluate_case(j) for j in jobs]
    per_case = {j.case: r for j, r in zip(jobs, results)}
    summary = {
        "format": 1,
        "reference_folder": str(ref_dir), "prediction_folder": str(pred_dir),
        "anomaly_map_folder": str(anomaly_dir) if anomaly_dir else None,
        "region": region, "scores": scores, "dsc_from": dsc_from,
        "class_selection": f"manifest of {dataset_json}" if manifest else "classes present in the reference",
        "class_filter": [class_name(c) for c in class_filter] if class_filter else None,
        "conventions": CONVENTIONS,
        "skipped_cases": {c: f for c, f in missing.items()},
        "notes": notes,
        "mean": aggregate(per_case),
        "per_source": {src: aggregate({c: r for c, r in per_case.items() if manifest[c].source == src})
                       for src in sorted({manifest[c].source for c in per_case})} if manifest else {},
        "cases": per_case,
    }
    if write:
        write_outputs(summary, output_dir if output_dir is not None else pred_dir)
    return summary


def _read_manifest(dataset_json):
    try:
        with open(dataset_json, encoding="utf-8") as f:
            return load_manifest(json.load(f), where=str(dataset_json))
    except (OSError, json.JSONDecodeError) as e:
        raise EvaluationError(f"cannot read {dataset_json}: {e}") from None


def _case_jobs(case_ids, ref_dir: Path, pred_dir: Path, anomaly_dir: Optional[Path], manifest, class_filter,
               region: str, scores: str, dsc_from: str, tolerance: float):
    """(jobs, {case: missing files}, notes): one :class:`CaseJob` per reference case whose files are all there; the
    score source per case (anomaly map, probabilities or none) follows ``scores``."""
    jobs, missing, notes = [], {}, []
    for case in case_ids:
        pred = pred_dir / (case + SUFFIX)
        npz = pred_dir / (case + ".npz")
        amap = anomaly_dir / (case + SUFFIX) if anomaly_dir else None
        src = "anomaly" if amap is not None and scores in ("auto", "anomaly") else \
            "probabilities" if scores == "probabilities" or (scores == "auto" and npz.is_file()) else "none"
        need = ([] if dsc_from == "probabilities" else [pred]) + ([amap] if src == "anomaly" else []) + \
            ([npz] if src == "probabilities" or dsc_from == "probabilities" else [])
        lacking = [str(p) for p in need if not p.is_file()]
        if lacking:
            missing[case] = lacking
            continue
        if src == "none":
            notes.append(f"{case}: no anomaly map or probabilities, AUROC/FPR95 not computed")
        jobs.append(CaseJob(case, str(ref_dir / (case + SUFFIX)), str(pred), str(npz) if npz.is_file() else None,
                            str(amap) if amap else None, manifest[case].annotated if manifest else None,
                            class_filter, region, src, dsc_from, tolerance))
    return jobs, missing, notes
