"""The demo report: ``report.md`` with the metrics tables, the run's settings and timings, and one PNG overlay row
per case (image, reference, prediction, anomaly map, and the held-out prompt's mask where there is one).

:func:`write_report` renders from plain inputs (evaluation ``summary.json`` dicts, NIfTI files per case), so it
can be tested without a training; :func:`collect_and_write` gathers those inputs from a finished
:class:`~nnunetv2_dsm.demo.pipeline.Demo`. Matplotlib runs with the Agg backend (no display needed).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from nnunetv2_dsm.demo.sources import HELD_OUT_CLASS, HELD_OUT_PROMPT
from nnunetv2_dsm.io_utils import atomic_target, atomic_write_text
from nnunetv2_dsm.labels import CLASS_NAMES, NUM_ORGANS, decode, tumor_label

TUMOR_COLOURS = {"Liver Tumor": (1.0, 0.1, 0.1), "Kidney Tumor": (1.0, 0.0, 1.0), "Kidney Cyst": (0.0, 1.0, 1.0),
                  "Pancreas Tumor": (1.0, 1.0, 0.0)}
ORGAN_COLOURS = {"Liver": (0.3, 0.75, 0.3), "Spleen": (0.25, 0.45, 0.95), "Right Kidney": (0.65, 0.45, 0.9),
                 "Left Kidney": (0.45, 0.3, 0.75), "Stomach": (0.6, 0.4, 0.2), "Pancreas": (0.65, 0.65, 0.15),
                 "Aorta": (1.0, 0.6, 0.8), "Bladder": (0.45, 0.7, 1.0), "Right Lung": (0.55, 0.6, 0.7),
                 "Left Lung": (0.4, 0.45, 0.55)}
MAX_LEGEND = 14
SETS = (("test", "Test set: seen classes (the 60 % test split of the BTCV-, LiTS- and KiTS-like sources)"),
        ("inference", "Zero-shot inference set (MSD Task07-like): Pancreas Tumor never appears in training"))


@dataclass
class ReportCase:
    """One case's files for its overlay row (``anomaly`` and ``prompt`` optional)."""
    case_id: str
    subset: str
    source: str
    image: Path
    reference: Path
    prediction: Optional[Path] = None
    anomaly: Optional[Path] = None
    prompt: Optional[Path] = None


def _read(path) -> Optional[np.ndarray]:
    """The voxel array of an image file, or None when ``path`` is not given or not a file."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))) if path and os.path.isfile(path) else None


def write_prompt_labels(prompt_dir, out_dir, cases: Sequence[str], class_name: str) -> None:
    """Binary prompt masks ``prompt_dir/<case>.nii.gz`` → DSM label maps in ``out_dir`` (mask voxels = ``class_name``
    with its host not encoded), so nnUNetv2_dsm_evaluate can score the prompt like any prediction."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for case in cases:
        mask_image = sitk.ReadImage(str(Path(prompt_dir) / f"{case}.nii.gz"))
        label = (sitk.GetArrayFromImage(mask_image) > 0).astype(np.uint8) * np.uint8(tumor_label(class_name))
        label_image = sitk.GetImageFromArray(label)
        label_image.CopyInformation(mask_image)
        with atomic_target(out_dir / f"{case}.nii.gz") as tmp:
            sitk.WriteImage(label_image, tmp, useCompression=True)


def select_slice(reference: np.ndarray) -> int:
    """Axial slice (axis 0) with the most reference tumor voxels; without tumors, the most organ voxels."""
    tumor = reference > NUM_ORGANS
    mask = tumor if tumor.any() else reference > 0
    return int(np.argmax(mask.reshape(mask.shape[0], -1).sum(1))) if mask.any() else reference.shape[0] // 2


def _colour(label_slice: np.ndarray):
    """RGBA overlay of a DSM label slice (organs translucent, tumors on top) and the classes shown."""
    import matplotlib  # lazy: matplotlib is an optional dependency, needed only for the demo's overlays
    multi_hot = decode(label_slice)                            # (45, y, x)
    rgba, shown = np.zeros((*label_slice.shape, 4)), []
    tab = matplotlib.colormaps["tab20b"]
    for c in range(len(CLASS_NAMES)):                          # organs first, tumors drawn over them
        if not multi_hot[c].any():
            continue
        name = CLASS_NAMES[c]
        rgb = TUMOR_COLOURS.get(name, (1.0, 0.55, 0.0)) if c >= NUM_ORGANS else \
            ORGAN_COLOURS.get(name, tab(c % 20)[:3])
        rgba[multi_hot[c]] = (*rgb, 0.9 if c >= NUM_ORGANS else 0.45)
        shown.append((name, rgb, int(multi_hot[c].sum())))
    return rgba, sorted(shown, key=lambda t: -t[2])


def overlay_png(case: ReportCase, out_path, held_out: str = "Pancreas Tumor") -> Path:
    """One row of panels for ``case`` at :func:`select_slice`: image, reference, prediction, anomaly map (and the
    prompt mask when given), with a legend of the classes shown."""
    import matplotlib  # lazy: optional dependency, and the Agg backend must be chosen before pyplot is imported
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    image, ref = _read(case.image), _read(case.reference)
    pred, amap, prompt = _read(case.prediction), _read(case.anomaly), _read(case.prompt)
    k = select_slice(ref)
    panels = [("image", None), ("reference", ref), ("prediction", pred)] + \
        ([("anomaly map", amap)] if amap is not None else []) + \
        ([(f"prompt mask ('{held_out.lower()}')", prompt)] if prompt is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.6), squeeze=False)
    window = np.clip((image[k].astype(np.float32) + 160) / 400, 0, 1)      # abdomen window W400 / L40
    legend: Dict[str, tuple] = {}
    for ax, (title, vol) in zip(axes[0], panels):
        ax.imshow(window, cmap="gray", interpolation="nearest")
        if title in ("reference", "prediction") and vol is not None:
            rgba, shown = _colour(vol[k])
            ax.imshow(rgba, interpolation="nearest")
            for name, rgb, _ in shown:          # every reference class, then the largest predicted ones
                if len(legend) < MAX_LEGEND or title == "reference":
                    legend.setdefault(name, rgb)
        elif title == "anomaly map":
            im = ax.imshow(vol[k], cmap="inferno", interpolation="nearest")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        elif title.startswith("prompt"):
            ax.imshow(np.ma.masked_where(vol[k] == 0, vol[k]), alpha=0.85, interpolation="nearest",
                      cmap=ListedColormap([TUMOR_COLOURS.get(held_out, (1.0, 1.0, 0.0))]))
        if title in ("anomaly map",) or title.startswith("prompt"):
            tumor = ref[k] > NUM_ORGANS
            if tumor.any():
                ax.contour(tumor, levels=[0.5], colors="cyan", linewidths=0.8)
        if title == "prediction" and vol is None:
            ax.text(0.5, 0.5, "no prediction", color="w", ha="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{case.case_id} ({case.subset}, {case.source}), axial slice {k}; cyan: reference tumor",
                 fontsize=9)
    if legend:
        fig.legend([Patch(color=c) for c in legend.values()], list(legend), loc="lower center", fontsize=7,
                   ncol=min(len(legend), 7), frameon=False)
    fig.tight_layout(rect=(0, 0.16 if legend else 0, 1, 0.95))
    with atomic_target(out_path) as tmp:          # matplotlib picks PNG from the temporary name's ending
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return Path(out_path)


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def metrics_tables(summaries: Dict[str, Optional[dict]], held_out: str, prompt: str) -> str:
    """Markdown tables from the evaluation summaries ``test``, ``inference`` and ``prompt`` (any may be None)."""
    out = []
    for key, title in SETS:
        out.append(f"### {title}\n")
        summary = summaries.get(key)
        if not summary:
            out.append("_not evaluated (see the failed step above)_\n")
            continue
        out.append("| class | prediction | n cases | DSC | AUROC | FPR95 |\n|---|---|---:|---:|---:|---:|")
        for name, e in summary["mean"].items():
            how = "label map" + (" (class query never trained)" if name == held_out else "")
            out.append(f"| {name} | {how} | {e['n_cases']} | {_fmt(e.get('DSC'))} | {_fmt(e.get('AUROC'))} | "
                       f"{_fmt(e.get('FPR95'))} |")
        if key == "inference":
            e = (summaries.get("prompt") or {}).get("mean", {}).get(held_out)
            if e:
                out.append(f"| **{held_out}** | **prompt \"{prompt}\" (zero-shot)** | {e['n_cases']} | "
                           f"**{_fmt(e.get('DSC'))}** | {_fmt(e.get('AUROC'))} | {_fmt(e.get('FPR95'))} |")
        out.append("")
    out.append("DSC per class, mean over the cases that annotate it (both masks empty: not counted). AUROC and FPR95 "
               "(false-positive rate at 95 % sensitivity; lower is better) score the class-agnostic anomaly map "
               "(Eq. 14) voxel by voxel inside the tumor's host organ, so they are the same for every row of a "
               "tumor class. Definitions: docs/evaluation.md.\n")
    return "\n".join(out)


def prompt_answers(prompts: dict, cases: Sequence[str]) -> List[str]:
    """Markdown table from nnUNetv2_dsm_predict's ``dsm_prompts.json``: which query answered each prompt."""
    rows = [(case, r) for case in cases for r in prompts.get(case, [])]
    if not rows:
        return []
    out = ["How the prompt was answered (`predictions/dsm_prompts.json`): the query that claimed it most, its mean "
           "mixing weight and cosine similarity to the prompt embedding, and the voxels of the mask.", "",
           "| case | prompt | answered by query | weight | similarity | voxels |", "|---|---|---|---:|---:|---:|"]
    out += [f"| {c} | {r.get('prompt')} | {r.get('query')} | {r.get('weight', '')} | {r.get('similarity', '')} | "
            f"{r.get('voxels', '')} |" for c, r in rows]
    return out + [""]


def write_report(output_dir, *, header: Sequence[str], settings: Sequence[tuple], steps: Sequence[tuple],
                 summaries: Dict[str, Optional[dict]], cases: Sequence[ReportCase], warning: str = "",
                 held_out: str = "Pancreas Tumor", prompt: str = "pancreas tumor", notes: Sequence[str] = ()) -> Path:
    """Write ``output_dir/report.md`` and ``output_dir/overlays/<case>.png``; returns the report's path.

    ``header``: lines under the title; ``settings``: (name, value) rows; ``steps``: (step, status, seconds, log)
    rows; ``summaries``: nnUNetv2_dsm_evaluate summaries by set (``test``, ``inference``, ``prompt``); ``warning``:
    shown as a block quote at the top (untrained text embeddings).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    md = ["# DSM demo report", "", *header, ""]
    if warning:
        md += ["> **" + " ".join(warning.split()).replace("WARNING:", "Warning:**", 1), ""]
    md += ["## Metrics", "", metrics_tables(summaries, held_out, prompt), *notes, "", "## Run", "",
           "| step | status | wall time | log |", "|---|---|---:|---|"]
    total = 0.0
    for name, status, seconds, log in steps:
        total += seconds or 0
        md.append(f"| {name} | {status} | {'' if seconds is None else f'{seconds:.0f} s'} | {log or ''} |")
    md += [f"| **total** | | **{total:.0f} s** | |", "", "| setting | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in settings] + ["", "## Cases", "",
                                                      "Axial slice with the most reference tumor voxels (else organ "
                                                      "voxels); abdomen window. Reference and prediction colours: "
                                                      "organs translucent, tumors opaque.", ""]
    for case in cases:
        png = overlay_png(case, output_dir / "overlays" / f"{case.case_id}.png", held_out)
        md += [f"### {case.case_id} ({case.subset}, {case.source})", "",
               f"![{case.case_id}]({png.relative_to(output_dir).as_posix()})", ""]
    path = output_dir / "report.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return path


def load_summaries(eval_dir) -> Dict[str, Optional[dict]]:
    """The evaluation summaries ``test``, ``inference``, ``prompt`` under ``eval_dir`` (None where missing)."""
    paths = {k: Path(eval_dir) / k / "dsm_summary.json" for k in ("test", "inference", "prompt")}
    return {k: json.loads(p.read_text()) if p.is_file() else None for k, p in paths.items()}


def collect_and_write(demo) -> Path:
    """Gather a :class:`~nnunetv2_dsm.demo.pipeline.Demo`'s results and call :func:`write_report`."""
    from nnunetv2_dsm.demo.pipeline import CONFIG, DATASET, FOLD, PROMPT_SLUG  # lazy: the pipeline imports us
    from nnunetv2_dsm.nnunet_ext import nnunetv2_dsm_trainers as registered  # lazy: pulls nnU-Net's trainers in
    preset, state = demo.preset, demo.state
    summaries = load_summaries(demo.eval_dir)
    steps = [(step.name, state["steps"].get(step.name, {}).get("status", "not run"),
              state["steps"].get(step.name, {}).get("seconds"),
              os.path.relpath(demo.log_path(step.name), demo.output) if demo.log_path(step.name).is_file() else "")
             for step in demo.steps() if step.name != "report"]

    def trainer_row(name):
        cls = getattr(registered, name, None)
        return name if cls is None else (f"{name}: {cls.short_epochs} epochs × {cls.short_iterations} iterations, "
                                         f"lr {cls.short_lr:g} (AdamW, poly), fold '{FOLD}'")
    cases, counts = [], {}
    manifest = json.loads((demo.dataset_dir / "dataset.json").read_text())["dsm_manifest"]["cases"] \
        if (demo.dataset_dir / "dataset.json").is_file() else {}
    for cid, entry in sorted(manifest.items(), key=lambda kv: (kv[1]["subset"] == "inference", kv[0])):
        counts.setdefault(entry["source"], {}).setdefault(entry["subset"], 0)
        counts[entry["source"]][entry["subset"]] += 1
        if entry["subset"] != "train":
            cases.append(ReportCase(cid, entry["subset"], entry["source"],
                                    demo.dataset_dir / "imagesTs" / f"{cid}_0000.nii.gz",
                                    demo.dataset_dir / "labelsTs" / f"{cid}.nii.gz", demo.pred / f"{cid}.nii.gz",
                                    demo.pred / "anomaly_maps" / f"{cid}.nii.gz",
                                    demo.pred / "prompts" / PROMPT_SLUG / f"{cid}.nii.gz"))
    settings = [("phantom", f"{'×'.join(map(str, preset.shape))} voxels at {preset.spacing[0]:g} mm "
                            f"(nnunetv2_dsm.phantom)"),
                ("cases (train / test / inference)", "; ".join(
                    f"{s} {c.get('train', 0)}/{c.get('test', 0)}/{c.get('inference', 0)}" for s, c in counts.items())),
                ("dataset", f"{DATASET}, configuration {CONFIG}"),
                ("Stage 1", trainer_row(preset.stage1_trainer)), ("Stage 2", trainer_row(preset.stage2_trainer)),
                ("held-out class", f"{HELD_OUT_CLASS}, asked for with --prompts \"{HELD_OUT_PROMPT}\""),
                ("CLIP weights", demo.clip.describe if demo.clip else "?"), ("device", demo.device)]
    prompts_json = demo.pred / "dsm_prompts.json"
    notes = prompt_answers(json.loads(prompts_json.read_text()), [c.case_id for c in cases if c.subset ==
                                                                    "inference"]) if prompts_json.is_file() else []
    header = [f"Run started {state.get('started', '?')} in `{demo.output}`; `{preset.name}` settings. Re-run "
              f"`nnUNetv2_dsm_demo --output {demo.output}` to resume or refresh."]
    return write_report(demo.output, header=header, settings=settings, steps=steps, summaries=summaries,
                        cases=cases, warning=demo.clip.warning() if demo.clip else "", held_out=HELD_OUT_CLASS,
                        prompt=HELD_OUT_PROMPT, notes=notes)
