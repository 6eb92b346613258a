"""accuracy.json and accuracy.md of the accuracy benchmark (structure in docs/accuracy.md)."""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from nnunetv2_dsm.io_utils import atomic_save_json
from nnunetv2_dsm.labels import class_index

MODELS = ("nnunet", "dsm_stage1", "dsm_stage2")
MODEL_TITLES = {"nnunet": "nnU-Net (per dataset)", "dsm_stage1": "DSM Stage 1", "dsm_stage2": "DSM Stage 2"}


def jsonable(x):
    """NaN / inf -> None, tuples -> lists, dataclasses -> dicts, recursively."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "__dataclass_fields__"):
        return jsonable(asdict(x))
    return x


def build_json(seed: int, budget: float, iterations: Dict[str, int], scores: dict, sweep: Sequence = (),
               wall_time: Optional[Dict[str, float]] = None, extra: Optional[dict] = None) -> dict:
    """The accuracy.json document: the issue's keys first (``seed``, ``budget``, ``iterations``, ``dsc`` per model,
    ``anomaly``, ``prompt``, ``left_right_swaps`` -- DSM Stage 2's swapped test cases), then the details."""
    swapped = scores.get("swapped_cases", {})
    doc = {"seed": seed, "budget": budget, "iterations": dict(iterations),
           "dsc": {m: scores.get("dsc", {}).get(m, {}) for m in MODELS},
           "anomaly": scores.get("anomaly", {}), "prompt": scores.get("prompt", {}),
           "left_right_swaps": len(swapped.get("dsm_stage2", [])),
           "left_right_swaps_by_model": {m: len(swapped.get(m, [])) for m in MODELS if m in swapped},
           "swapped_cases": swapped, "lr_sweep": list(sweep), "wall_time_s": dict(wall_time or {}),
           "per_case_dsc": scores.get("per_case", {}), "false_tumors": scores.get("false_tumors", {})}
    doc.update(extra or {})
    return jsonable(doc)


def write_json(doc: dict, path: Path) -> Path:
    """Write ``doc`` as JSON (NaN refused) to ``path`` atomically; returns the path."""
    path = Path(path)
    atomic_save_json(path, doc, indent=1, allow_nan=False)
    return path


def _f(v, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def dsc_table(doc: dict) -> List[str]:
    """Markdown rows: one per class, nnU-Net / Stage 1 / Stage 2, then the organ and tumor means."""
    dsc = doc["dsc"]
    classes = sorted({c for m in MODELS for c in dsc.get(m, {})}, key=class_index)
    rows = ["| class | " + " | ".join(MODEL_TITLES[m] for m in MODELS) + " |", "|---|" + "---:|" * len(MODELS)]
    rows += [f"| {c} | " + " | ".join(_f(dsc.get(m, {}).get(c)) for m in MODELS) + " |" for c in classes]
    for title, part in (("mean, organs", [c for c in classes if class_index(c) <= 25]),
                        ("mean, tumors", [c for c in classes if class_index(c) > 25])):
        if part:
            means = []
            for m in MODELS:
                vals = [dsc.get(m, {}).get(c) for c in part]
                vals = [v for v in vals if v is not None]
                means.append(_f(sum(vals) / len(vals)) if vals else "–")
            rows.append(f"| **{title}** | " + " | ".join(means) + " |")
    return rows


def false_tumor_lines(doc: dict) -> List[str]:
    """Markdown: per model, the tumor classes it labels in test cases whose phantom has none of them."""
    ft = doc.get("false_tumors", {})
    rows = ["| model | tumor | false voxels | cases with any / cases without that tumor |", "|---|---|---:|---:|"]
    rows += [f"| {MODEL_TITLES[m]} | {t} | {r['voxels']} | {r['cases']} / {r['n_cases']} |"
             for m in MODELS for t, r in ft.get(m, {}).items()]
    return rows if len(rows) > 2 else ["None: no model labels a tumor where the phantom draws none."]


def sweep_table(doc: dict) -> List[str]:
    rows = ["| source | learning rate | iterations | final train loss | pseudo Dice (training cases) | chosen |",
            "|---|---:|---:|---:|---:|:-:|"]
    for r in doc.get("lr_sweep", []):
        rows.append(f"| {r['source']} | {r['lr']:g} | {r['iterations']} | {_f(r['final_train_loss'], 4)} | "
                    f"{_f(r['final_pseudo_dice'])} | {'✓' if r.get('chosen') else ''} |")
    return rows


def machine_lines(machine: Optional[dict]) -> List[str]:
    """The machine a run was measured on, one line (none for a document without the record)."""
    if not machine:
        return []
    libs = ", ".join(f"{k} {v}" for k, v in machine.get("libraries", {}).items() if v)
    return [f"Machine: {machine.get('cpu')} (SIMD: {' '.join(machine.get('cpu_flags') or []) or 'unknown'}), "
            f"{machine.get('affinity')} CPUs, {machine.get('memory_gib')} GiB; torch {machine.get('torch')}, "
            f"nnunetv2 {machine.get('nnunetv2')}" + (f", {libs}" if libs else "") + ". A seeded run repeats on the "
            f"same machine; on another CPU or other library versions it can drift apart."]


def write_markdown(doc: dict, path: Path, notes: Sequence[str] = ()) -> Path:
    """accuracy.md: the DSC table, anomaly AUROCs, prompt DSC, swaps, the learning-rate sweep, wall times."""
    it = doc["iterations"]
    lines = [f"# Accuracy benchmark (phantom seed {doc['seed']}, budget {doc['budget']:g})", "",
             f"Training iterations: nnU-Net {it['nnunet']} per dataset, DSM Stage 1 {it['dsm_stage1']}, "
             f"DSM Stage 2 {it['dsm_stage2']}.", *notes, "",
             "## Test-set DSC (each test case by the nnU-Net of its own source, and by DSM)", "", *dsc_table(doc), "",
             "## Anomaly maps of DSM Stage 2 (Eq. 14), inside the host organ", "",
             "| tumor | AUROC | FPR95 | cases |", "|---|---:|---:|---:|"]
    lines += [f"| {t} | {_f(v.get('auroc'))} | {_f(v.get('fpr95'))} | {v.get('n_cases', '')} |"
              for t, v in doc["anomaly"].items()]
    lines += ["", "## Held-out class by text prompt (DSM Stage 2)", "", "| class | DSC | cases |", "|---|---:|---:|"]
    lines += [f"| {t} | {_f(v.get('dsc'))} | {v.get('n_cases', '')} |" for t, v in doc["prompt"].items()]
    swaps = doc.get("left_right_swaps_by_model", {})
    lines += ["", "## Left/right swaps (test cases)", "",
              " · ".join(f"{MODEL_TITLES[m]}: {n}" for m, n in swaps.items()) or "–", "",
              "## Tumors where the phantom draws none (test cases)", "",
              "Every voxel counted is wrong: the case's source never has that tumor (no BTCV case has a tumor, no "
              "LiTS case a kidney tumor), though its reference, which annotates only the source's classes, cannot "
              "show it.", "", *false_tumor_lines(doc), "",
              "## nnU-Net learning-rate sweep", "",
              "Chosen on each swept source: the lowest mean training loss over the last fifth of the epochs (the "
              "test set is not used to choose). Learning rate of each baseline: " + (", ".join(
                  f"{s} {lr:g}" + ("" if doc.get("lr_chosen_by_sweep_on", {}).get(s, s) == s else
                                   f" (swept on {doc['lr_chosen_by_sweep_on'][s]})")
                  for s, lr in doc.get("chosen_lr", {}).items() if lr is not None) or "–") + ".",
              "", *sweep_table(doc), "", "## Wall time", "",
              "CPU time: user + system seconds of every process of the part, all cores together; on a shared "
              "machine it depends much less on the others' load than the wall time does.", "",
              "| part | wall time | CPU time |", "|---|---:|---:|"]
    cpu = doc.get("cpu_time_s", {})
    lines += [f"| {k} | {v / 60:.1f} min | " + (f"{cpu[k] / 60:.1f} min" if cpu.get(k) else "–") + " |"
              for k, v in doc.get("wall_time_s", {}).items()]
    lines += ["", *machine_lines(doc.get("machine"))]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
