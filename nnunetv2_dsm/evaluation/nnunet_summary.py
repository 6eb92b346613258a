"""nnU-Net's ``summary.json`` from a DSM evaluation, so that nnU-Net's tools read DSM figures.

``nnUNetv2_evaluate_folder`` (and nnU-Net's final validation, which ``nnUNetv2_find_best_configuration`` ranks by
``foreground_mean['Dice']``) counts every class of every case; with partial labels an unannotated class predicted in
a case counts as false positives. This writes the same structure — ``metric_per_case`` (``reference_file``,
``prediction_file``, ``metrics`` {region key: Dice, IoU, FP, TP, FN, TN, n_pred, n_ref}), ``mean`` {region key:
metric means}, ``foreground_mean`` — from the DSM evaluation, in which each case holds only the classes it
annotates. Region keys are nnU-Net's (``label_or_region_to_key`` of the dataset.json region, e.g. ``"(6, 36, 37)"``
for Liver). The DSM-only figures (AUROC, FPR95, per source) stay in ``dsm_summary.json``.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

import numpy as np

from nnunetv2_dsm.labels import dataset_json_labels

NNUNET_METRICS = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")


def _region(name: str):
    """nnU-Net's label-or-region of a class: a tuple of its codes (an int when it has one code)."""
    v = dataset_json_labels()[name]
    return tuple(v) if isinstance(v, (list, tuple)) and len(v) > 1 else (v[0] if isinstance(v, list) else v)


def _n_voxels(path: str) -> int:
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return int(np.prod(reader.GetSize()))


def case_metrics(rec: Dict[str, dict], n_voxels: int) -> Dict:
    """nnU-Net's per-region counts from a DSM case record {class name: {DSC, n_ref, n_pred}} (classes without a
    DSC — e.g. AUROC-only — are left out). TP is recovered exactly from DSC = 2 TP / (n_ref + n_pred)."""
    out = {}
    for name, r in rec.items():
        if "n_ref" not in r or "n_pred" not in r:
            continue
        dsc, n_ref, n_pred = r.get("DSC"), int(r["n_ref"]), int(r["n_pred"])
        tp = 0 if dsc is None or (isinstance(dsc, float) and math.isnan(dsc)) else int(round(dsc * (n_ref + n_pred) / 2))
        fp, fn = n_pred - tp, n_ref - tp
        empty = tp + fp + fn == 0
        out[_region(name)] = {"Dice": float("nan") if empty else 2 * tp / (2 * tp + fp + fn),
                              "IoU": float("nan") if empty else tp / (tp + fp + fn),
                              "FP": fp, "TP": tp, "FN": fn, "TN": n_voxels - tp - fp - fn,
                              "n_pred": n_pred, "n_ref": n_ref}
    return out


def nnunet_summary(summary: dict) -> dict:
    """{'metric_per_case', 'mean', 'foreground_mean'} (region keys as tuples/ints, as nnU-Net holds them before
    ``save_summary_json``) from :func:`nnunetv2_dsm.evaluation.evaluate.evaluate_folder`'s summary. A region's mean
    is over the cases that annotate it (NaN-aware, as nnU-Net's); foreground_mean is the mean of the region means."""
    ref_dir, pred_dir = summary["reference_folder"], summary["prediction_folder"]
    per_case: List[dict] = []
    for case, rec in summary["cases"].items():
        ref = os.path.join(ref_dir, case + ".nii.gz")
        per_case.append({"reference_file": ref, "prediction_file": os.path.join(pred_dir, case + ".nii.gz"),
                         "metrics": case_metrics(rec, _n_voxels(ref))})
    regions = [_region(n) for n in dataset_json_labels() if n != "background"]
    means = {}
    for r in regions:
        vals = [c["metrics"][r] for c in per_case if r in c["metrics"]]
        if vals:
            means[r] = {m: _nanmean([v[m] for v in vals]) for m in NNUNET_METRICS}
    foreground = {m: float(np.mean([means[r][m] for r in means])) if means else float("nan") for m in NNUNET_METRICS}
    return {"metric_per_case": per_case, "mean": means, "foreground_mean": foreground}


def _nanmean(values) -> float:
    a = np.asarray(values, dtype=np.float64)
    return float("nan") if np.isnan(a).all() else float(np.nanmean(a))


def write_nnunet_summary(summary: dict, output_file: str) -> dict:
    """Write :func:`nnunet_summary` with nnU-Net's own ``save_summary_json`` (tuple keys → strings, sorted keys,
    NaN as nnU-Net writes it) atomically; returns it. ``nnUNetv2_find_best_configuration`` and
    ``load_summary_json`` read the file as one of nnU-Net's."""
    from nnunetv2.evaluation.evaluate_predictions import save_summary_json
    from nnunetv2_dsm.inference.export import atomic_target
    result = nnunet_summary(summary)
    with atomic_target(output_file) as tmp:
        save_summary_json(result, tmp)
    return result


def write_validation_summary(validation_folder: str, dataset_json: Optional[str], summary: Optional[dict] = None,
                             **evaluate_kwargs) -> dict:
    """For the trainers' final validation: evaluate ``validation_folder`` against the fold's ground truth on the
    annotated classes and overwrite nnU-Net's ``validation/summary.json`` with it, so that
    ``nnUNetv2_find_best_configuration`` ranks on annotated classes only. ``summary``: an evaluation already made
    (e.g. the one written to ``validation/dsm``); else ``evaluate_kwargs`` go to ``evaluate_folder`` (ref_dir ...)."""
    if summary is None:
        from nnunetv2_dsm.evaluation.evaluate import evaluate_folder
        summary = evaluate_folder(pred_dir=validation_folder, dataset_json=dataset_json, write=False,
                                  **evaluate_kwargs)
    return write_nnunet_summary(summary, os.path.join(validation_folder, "summary.json"))
