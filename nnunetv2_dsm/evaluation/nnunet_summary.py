"""nnU-Net's ``summary.json`` from a DSM evaluation, so that nnU-Net's tools read DSM figures.

``nnUNetv2_evaluate_folder`` (and nnU-Net's final validation, which ``nnUNetv2_find_best_configuration`` ranks by
``foreground_mean['Dice']``) counts every class of every case; with partial labels an unannotated class predicted in
a case counts as false positives. This writes the same structure — ``metric_per_case`` (``reference_file``,
``prediction_file``, ``metrics`` {region key: Dice, IoU, FP, TP, FN, TN, n_pred, n_ref}), ``mean`` {region key:
metric means, NaN for a region no case annotates}, ``foreground_mean`` over the annotated regions
(NaN-aware) — from the DSM
evaluation, in which each case holds only the classes it annotates. Region keys are nnU-Net's (``label_or_region_to_key`` of the dataset.json region, e.g. ``"(6, 36, 37)"``
for Liver). The DSM-only figures (AUROC, FPR95, per source) stay in ``dsm_summary.json``.
"""
from __future__ import annotations

import contextlib
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
    means, annotated = {}, []
    for r in regions:  # every region, as nnU-Net's tools index them; NaN where no case annotates it
        vals = [c["metrics"][r] for c in per_case if r in c["metrics"]]
        means[r] = {metric: _nanmean([v[metric] for v in vals]) for metric in NNUNET_METRICS}
        annotated += [r] if vals else []
    # NaN-aware: a class annotated but empty in reference and prediction of every case has no Dice (nnU-Net's plain
    # mean would turn the whole figure into NaN, and find_best_configuration could not rank it)
    foreground = {metric: _nanmean([means[r][metric] for r in annotated]) if annotated else float("nan")
                  for metric in NNUNET_METRICS}
    return {"metric_per_case": per_case, "mean": means, "foreground_mean": foreground}


def _nanmean(values) -> float:
    a = np.asarray(values, dtype=np.float64)
    return float("nan") if np.isnan(a).all() else float(np.nanmean(a))


def write_nnunet_summary(summary: dict, output_file: str) -> dict:
    """Write :func:`nnunet_summary` with nnU-Net's own ``save_summary_json`` (tuple keys → strings, sorted keys,
    NaN as nnU-Net writes it) atomically; returns it. ``nnUNetv2_find_best_configuration`` and
    ``load_summary_json`` read the file as one of nnU-Net's."""
    from nnunetv2.evaluation.evaluate_predictions import save_summary_json
    from nnunetv2_dsm.io_utils import atomic_target
    result = nnunet_summary(summary)
    with atomic_target(output_file) as tmp:
        save_summary_json(result, tmp)
    return result


def compute_metrics_on_folder_annotated(folder_ref: str, folder_pred: str, output_file: Optional[str],
                                        image_reader_writer=None, file_ending: str = ".nii.gz",
                                        regions_or_labels=None, ignore_label=None, num_processes: int = 2,
                                        chill: bool = True) -> dict:
    """Drop-in for nnU-Net's ``compute_metrics_on_folder`` (same arguments; reader, regions and ignore label are
    DSM's own): the predictions in ``folder_pred`` scored on each case's annotated classes (the ``dsm_manifest`` of the
    dataset.json beside ``folder_ref``, else in ``folder_pred``); writes ``output_file`` and returns the result."""
    from nnunetv2_dsm.evaluation.evaluate import evaluate_folder
    candidates = [os.path.join(os.path.dirname(os.path.normpath(folder_ref)), "dataset.json"),
                  os.path.join(folder_pred, "dataset.json")]
    dataset_json = next((c for c in candidates if os.path.isfile(c)), None)
    summary = evaluate_folder(folder_ref, folder_pred, dataset_json=dataset_json, skip_missing=True,
                              num_processes=num_processes, write=False)
    return write_nnunet_summary(summary, output_file) if output_file else nnunet_summary(summary)


@contextlib.contextmanager
def annotated_classes_in_nnunet_evaluation():
    """Within the block, nnU-Net's cross-validation accumulation, ``find_best_configuration`` and its postprocessing
    search score predictions
    with :func:`compute_metrics_on_folder_annotated` (nnU-Net has no hook for the metric; its modules bind the function
    at import, so it is swapped there and restored afterwards)."""
    import nnunetv2.evaluation.accumulate_cv_results as acc
    import nnunetv2.evaluation.find_best_configuration as fbc
    import nnunetv2.postprocessing.remove_connected_components as pp
    saved = [(module, module.compute_metrics_on_folder) for module in (acc, fbc, pp)]
    try:
        for module, _ in saved:
            module.compute_metrics_on_folder = compute_metrics_on_folder_annotated
        yield
    finally:
        for module, original in saved:
            module.compute_metrics_on_folder = original


def find_best_configuration_main() -> None:
    """``nnUNetv2_dsm_find_best_configuration``: nnU-Net's ``nnUNetv2_find_best_configuration`` (same flags) ranking on
    the annotated classes of each case."""
    from nnunetv2.evaluation.find_best_configuration import find_best_configuration_entry_point
    with annotated_classes_in_nnunet_evaluation():
        find_best_configuration_entry_point()


def write_validation_summary(validation_folder: str, dataset_json: Optional[str], summary: Optional[dict] = None,
                             **evaluate_kwargs) -> dict:
    """For the trainers' final validation: overwrite nnU-Net's ``validation/summary.json`` with the figures on each
    case's annotated classes. ``summary``: an evaluation already made (e.g. the one written to ``validation/dsm``);
    else ``evaluate_kwargs`` (``ref_dir``, ``classes``, ...) go to ``evaluate_folder``."""
    if summary is None:
        from nnunetv2_dsm.evaluation.evaluate import evaluate_folder
        summary = evaluate_folder(pred_dir=validation_folder, dataset_json=dataset_json, write=False,
                                  **{"skip_missing": True, **evaluate_kwargs})
    return write_nnunet_summary(summary, os.path.join(validation_folder, "summary.json"))
