"""Scores of the accuracy benchmark, computed from label maps with :mod:`nnunetv2_dsm.evaluation.metrics`.

* DSC per class and case on the classes the case annotates (DSM encoding decoded with
  :func:`nnunetv2_dsm.labels.decode`); a class's score is the mean over the cases where it is defined (a case whose
  reference and prediction are both empty has none), the same convention as ``nnUNetv2_dsm_evaluate``. Reported
  are the classes with reference voxels in at least one scored case.
* Anomaly maps (Eq. 14, higher = more anomalous): voxel AUROC and FPR at 95 % TPR of each tumor class inside its
  host organ(s) annotated in the case (plus the tumor itself), mean over the cases containing that tumor.
* The prompt mask of the held-out class: DSC against its reference, mean over the cases.
* Left/right swaps: a case counts when, for any lateral organ, the prediction overlaps the opposite side's
  reference more than its own.
* False tumors: voxels each model labels as a tumor class in test cases where the phantom draws no tumor of that
  class (its source never draws it: no BTCV case has a tumor, no LiTS case a kidney tumor). The references cannot
  show these (a source annotates only its own classes), but the generator's truth does: every such voxel is wrong.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunetv2_dsm.evaluation.metrics import auroc_and_fpr95, dice
from nnunetv2_dsm.labels import CLASS_NAMES, TUMOR_HOSTS, class_index, decode

LATERAL_PAIRS = (("Right Kidney", "Left Kidney"), ("Right Adrenal Gland", "Left Adrenal Gland"),
                 ("Right Lung", "Left Lung"), ("Right Head of Femur", "Left Head of Femur"))
OPPOSITE: Dict[str, str] = {**{a: b for a, b in LATERAL_PAIRS}, **{b: a for a, b in LATERAL_PAIRS}}


def read_array(path) -> np.ndarray:
    """A NIfTI image as a numpy array (SimpleITK axis order)."""
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def channel(multi_hot: np.ndarray, name: str) -> np.ndarray:
    return multi_hot[class_index(name) - 1]


def mean_defined(values: Sequence[float]) -> float:
    """Mean of the non-NaN values; NaN when there are none."""
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


# ------------------------------------------------------------------------------------------------------ per case
def case_dsc(ref_mh: np.ndarray, pred_mh: np.ndarray, classes: Sequence[str]) -> Dict[str, float]:
    """DSC of each class in ``classes`` (NaN when reference and prediction are both empty)."""
    return {c: dice(channel(pred_mh, c), channel(ref_mh, c)) for c in classes}


def lateral_swaps(ref_mh: np.ndarray, pred_mh: np.ndarray) -> List[str]:
    """Lateral organs whose prediction overlaps the opposite side's reference more than its own."""
    out = []
    for organ, other in OPPOSITE.items():
        pred = channel(pred_mh, organ)
        own = int(np.count_nonzero(pred & channel(ref_mh, organ)))
        opposite = int(np.count_nonzero(pred & channel(ref_mh, other)))
        if opposite > own:
            out.append(organ)
    return sorted(out, key=class_index)


def host_region(ref_mh: np.ndarray, tumor: str, annotated: Sequence[str]) -> Optional[np.ndarray]:
    """The tumor's annotated host organ(s) plus the tumor; None when the case annotates none of its hosts."""
    hosts = [h for h in TUMOR_HOSTS[tumor] if h in annotated]
    if not hosts:
        return None
    return np.any([channel(ref_mh, h) for h in hosts] + [channel(ref_mh, tumor)], axis=0)


def case_anomaly(scores: np.ndarray, ref_mh: np.ndarray, tumor: str, annotated: Sequence[str]) -> Dict[str, float]:
    """AUROC and FPR95 of ``scores`` for ``tumor`` inside its host region (the whole volume without a host)."""
    region = host_region(ref_mh, tumor, annotated)
    auroc, fpr95 = auroc_and_fpr95(scores, channel(ref_mh, tumor), region)
    return {"auroc": auroc, "fpr95": fpr95, "region": "host" if region is not None else "volume"}


# ---------------------------------------------------------------------------------------------------- the sets
@dataclass
class ScoringInputs:
    """Where everything is: references (DSM label maps) with the classes each case annotates, the test and the
    zero-shot (inference) cases, each model's label maps, Stage 2's anomaly maps and the held-out prompt's masks."""
    reference: Dict[str, Path]
    annotated: Dict[str, Sequence[str]]
    test_cases: Sequence[str]
    inference_cases: Sequence[str]
    predictions: Dict[str, Dict[str, Path]]          # model -> case -> label map
    anomaly_maps: Dict[str, Path] = field(default_factory=dict)
    prompt_masks: Dict[str, Path] = field(default_factory=dict)
    held_out_class: str = "Pancreas Tumor"
    anomaly_model: str = "dsm_stage2"
    absent_tumors: Dict[str, Sequence[str]] = field(default_factory=dict)   # case -> tumor classes not drawn in it


def score_dsc(inputs: ScoringInputs, refs: Dict[str, np.ndarray]) -> Dict[str, dict]:
    """``{"dsc": {model: {class: mean}}, "per_case": {model: {case: {class: dsc}}}, "swaps": {model: {case:
    [organs]}}, "false_tumor_voxels": {model: {case: {tumor: voxels}}}}`` over the test cases each model has a
    prediction for (each label map is read once; the last is summed by :func:`score_false_tumors`)."""
    present = {c for case in inputs.test_cases for c in inputs.annotated[case] if channel(refs[case], c).any()}
    dsc, per_case, swaps, false = {}, {}, {}, {}
    for model, preds in inputs.predictions.items():
        cases = [c for c in inputs.test_cases if c in preds]
        per_case[model], swaps[model], false[model] = {}, {}, {}
        for case in cases:
            pred_mh = decode(read_array(preds[case]))
            per_case[model][case] = case_dsc(refs[case], pred_mh, inputs.annotated[case])
            swaps[model][case] = lateral_swaps(refs[case], pred_mh)
            false[model][case] = {t: int(channel(pred_mh, t).sum()) for t in inputs.absent_tumors.get(case, ())}
        dsc[model] = {c: mean_defined([per_case[model][case][c] for case in cases if c in per_case[model][case]])
                      for c in CLASS_NAMES if c in present and any(c in per_case[model][k] for k in cases)}
    return {"dsc": dsc, "per_case": per_case, "swaps": swaps, "false_tumor_voxels": false}


def score_anomaly(inputs: ScoringInputs, refs: Dict[str, np.ndarray]) -> Dict[str, dict]:
    """Per tumor class (seen ones on the test cases, the held-out one on the zero-shot cases): mean AUROC, FPR95
    and the number of cases, from the anomaly maps."""
    per_class: Dict[str, List[dict]] = {}
    for case in list(inputs.test_cases) + list(inputs.inference_cases):
        if case not in inputs.anomaly_maps:
            continue
        tumors = [c for c in inputs.annotated[case] if class_index(c) > 25 and channel(refs[case], c).any()]
        if not tumors:
            continue
        scores = read_array(inputs.anomaly_maps[case]).astype(np.float32)
        for t in tumors:
            per_class.setdefault(t, []).append(case_anomaly(scores, refs[case], t, inputs.annotated[case]))
    out = {}
    for t in sorted(per_class, key=class_index):
        recs = per_class[t]
        out[t] = {"auroc": mean_defined([r["auroc"] for r in recs]), "fpr95": mean_defined([r["fpr95"] for r in recs]),
                  "n_cases": len(recs), "region": "host" if all(r["region"] == "host" for r in recs) else "mixed"}
    return out


def score_prompt(inputs: ScoringInputs, refs: Dict[str, np.ndarray]) -> Dict[str, dict]:
    """DSC of the held-out class's prompt masks on the zero-shot cases."""
    t = inputs.held_out_class
    vals = [dice(read_array(inputs.prompt_masks[c]) > 0, channel(refs[c], t)) for c in inputs.inference_cases
            if c in inputs.prompt_masks and t in inputs.annotated[c]]
    return {t: {"dsc": mean_defined(vals), "n_cases": len(vals)}} if vals else {}


def score_false_tumors(false_tumor_voxels: Dict[str, Dict[str, Dict[str, int]]]) -> Dict[str, Dict[str, dict]]:
    """``{model: {case: {tumor: voxels}}}`` (from :func:`score_dsc`, over the test cases in which the phantom draws
    no such tumor, ``ScoringInputs.absent_tumors``) → ``{model: {tumor: {"voxels": V, "cases": n, "n_cases": N}}}``:
    the voxels summed over the N cases without that tumor and in how many (n) there are any. Listed per model are
    the classes with at least one false voxel."""
    out: Dict[str, Dict[str, dict]] = {}
    for model, per_case in false_tumor_voxels.items():
        per_class: Dict[str, dict] = {}
        for counts in per_case.values():
            for t, v in counts.items():
                rec = per_class.setdefault(t, {"voxels": 0, "cases": 0, "n_cases": 0})
                rec["voxels"] += v
                rec["cases"] += int(v > 0)
                rec["n_cases"] += 1
        out[model] = {t: r for t, r in sorted(per_class.items(), key=lambda kv: class_index(kv[0])) if r["voxels"]}
    return out


def score(inputs: ScoringInputs) -> dict:
    """Everything accuracy.json reports about the predictions (see :func:`score_dsc` and the module docstring)."""
    refs = {c: decode(read_array(inputs.reference[c])) for c in list(inputs.test_cases) + list(inputs.inference_cases)}
    out = score_dsc(inputs, refs)
    out["anomaly"] = score_anomaly(inputs, refs)
    out["prompt"] = score_prompt(inputs, refs)
    out["false_tumors"] = score_false_tumors(out.pop("false_tumor_voxels"))
    out["swapped_cases"] = {m: {c: organs for c, organs in sorted(swaps.items()) if organs}
                            for m, swaps in out["swaps"].items()}
    return out
