"""The nnU-Net baselines: one plain nnU-Net dataset per labelled source whose test cases are scored, and the
learning-rate sweep.

A baseline dataset holds the source's *training* cases of the merged split (the same cases DSM trains on; image and
label files linked from the merged dataset, which links them from the source's ``nnUNetv2_dsm_convert`` output) and
declares only the classes that source annotates, as nnU-Net regions of the DSM integer encoding
(:func:`nnunetv2_dsm.labels.region_values`): nnU-Net trains its own network with its own region loss (sigmoid,
Dice + BCE) on exactly the source's labels, and writes its predictions in the DSM encoding
(``regions_class_order`` as in the merged dataset), so baseline and DSM label maps are scored the same way.

The sweep trains a baseline briefly at every learning rate and keeps the one with the lowest mean training loss over
the last fifth of its epochs (the baselines see no validation cases besides their training cases; the test set is
never used to choose). By default it sweeps the BTCV baseline and uses its rate for all three (``--sweep-sources``).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunetv2_dsm.labels import TUMOR_HOSTS, class_index, region_values, tumor_label

BASELINE_SOURCES = ("btcv", "lits", "kits")          # the sources whose test cases are scored (merge.SPLIT_SOURCES)
BASELINE_TRAINER = "nnUNetTrainerBaselineNoDA"
DEFAULT_LRS = (1e-2, 3e-2, 1e-1)
# the sweep runs on BTCV only by default (its 13 organs are most of the scored classes) and the chosen rate serves
# all three baselines: a sweep per source triples its cost, which the one-hour default run cannot afford on 2 cores
DEFAULT_SWEEP_SOURCES = ("btcv",)


def baseline_dataset_id(source_dataset_id: int) -> int:
    """nnU-Net dataset id of a source's baseline: 601 for the source converted as 501, and so on."""
    return source_dataset_id + 100


def dataset_name(dataset_id: int, source: str) -> str:
    return f"Dataset{dataset_id:03d}_Baseline{source.upper()}"


def class_order(names: Sequence[str]) -> List[str]:
    """``names`` in CLASS_NAMES order."""
    return sorted(set(names), key=class_index)


def region_labels(classes: Sequence[str]) -> Dict[str, object]:
    """dataset.json ``labels`` and ``regions_class_order`` restricted to ``classes`` (organs first)."""
    classes = class_order(classes)
    labels: Dict[str, object] = {"background": 0}
    order = []
    for name in classes:
        labels[name] = list(region_values(class_index(name)))
        if class_index(name) <= 25:
            order.append(class_index(name))
        else:
            hosts = TUMOR_HOSTS[name]
            order.append(tumor_label(name, hosts[0] if len(hosts) == 1 else None))
    return {"labels": labels, "regions_class_order": order}


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def manifest_cases(merged_dataset_json: Path, source: str, subset: str) -> Dict[str, List[str]]:
    """case id -> annotated classes, for the cases of ``source`` in ``subset`` of the merged manifest."""
    cases = json.loads(Path(merged_dataset_json).read_text())["dsm_manifest"]["cases"]
    return {c: list(e["annotated"]) for c, e in sorted(cases.items())
            if e["source"] == source and e["subset"] == subset}


def write_baseline_dataset(merged_dir: Path, raw: Path, source: str, dataset_id: int) -> Path:
    """Write ``raw/DatasetXXX_Baseline<SOURCE>`` from the merged dataset's training cases of ``source``."""
    merged_dir = Path(merged_dir)
    train = manifest_cases(merged_dir / "dataset.json", source, "train")
    if not train:
        raise RuntimeError(f"the merged dataset {merged_dir} has no training case of source {source!r}")
    out = Path(raw) / dataset_name(dataset_id, source)
    shutil.rmtree(out, ignore_errors=True)
    for case in train:
        _link(merged_dir / "imagesTr" / f"{case}_0000.nii.gz", out / "imagesTr" / f"{case}_0000.nii.gz")
        _link(merged_dir / "labelsTr" / f"{case}.nii.gz", out / "labelsTr" / f"{case}.nii.gz")
    classes = sorted({c for names in train.values() for c in names}, key=class_index)
    check_labels(out / "labelsTr", classes)
    ds = {"channel_names": {"0": "CT"}, **region_labels(classes), "numTraining": len(train),
          "file_ending": ".nii.gz", "name": out.name.split("_", 1)[1],
          "description": f"nnU-Net baseline of the accuracy benchmark: the {source} training cases of the merged "
                         f"split, with the classes {source} annotates only (regions of the DSM encoding)",
          "dsm_baseline": {"source": source, "cases": list(train), "classes": classes}}
    (out / "dataset.json").write_text(json.dumps(ds, indent=1))
    return out


def check_labels(labels_dir: Path, classes: Sequence[str]) -> None:
    """Every label value in ``labels_dir`` must belong to one of ``classes`` (the check nnU-Net's
    ``--verify_dataset_integrity`` cannot do here: it wants consecutive label values, and a source's regions of the
    DSM encoding are not; the merged dataset's plan step verified the files otherwise)."""
    from nnunetv2_dsm.accuracy.scoring import read_array
    allowed = {0} | {v for c in classes for v in region_values(class_index(c))}
    for path in sorted(Path(labels_dir).glob("*.nii.gz")):
        bad = sorted(set(np.unique(read_array(path)).tolist()) - allowed)
        if bad:
            raise RuntimeError(f"{path} holds label values {bad[:5]} outside the classes {list(classes)}")


def link_test_images(merged_dir: Path, cases: Sequence[str], folder: Path) -> Path:
    """A prediction input folder holding (links to) the merged imagesTs of ``cases``."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    for case in cases:
        _link(Path(merged_dir) / "imagesTs" / f"{case}_0000.nii.gz", folder / f"{case}_0000.nii.gz")
    return folder


# ----------------------------------------------------------------------------------------------------------- sweep
@dataclass
class SweepRun:
    """One baseline training of the sweep: its learning rate, iterations, and how well it fitted."""
    source: str
    lr: float
    iterations: int
    final_train_loss: float        # mean over the last fifth of the epochs (nan if it failed)
    final_pseudo_dice: float       # nnU-Net's EMA pseudo Dice at the end (its validation = the training cases)
    seconds: Optional[float] = None
    chosen: bool = False


def training_summary(fold_dir: Path) -> Dict[str, float]:
    """(final_train_loss, final_pseudo_dice) from a finished run's ``checkpoint_final.pth`` (nan if absent)."""
    path = Path(fold_dir) / "checkpoint_final.pth"
    if not path.is_file():
        return {"final_train_loss": math.nan, "final_pseudo_dice": math.nan}
    import torch
    log = torch.load(path, map_location="cpu", weights_only=False).get("logging", {})
    losses = [float(v) for v in log.get("train_losses", [])]
    tail = losses[-max(1, len(losses) // 5):] if losses else []
    loss = sum(tail) / len(tail) if tail else math.nan
    dice = [float(v) for v in log.get("ema_fg_dice", [])]
    return {"final_train_loss": loss, "final_pseudo_dice": dice[-1] if dice else math.nan}


def choose_lr(runs: Sequence[SweepRun]) -> float:
    """The learning rate of the run with the lowest final training loss (NaN losses -- diverged -- never win;
    ties: the smaller learning rate). Raises if no run finished."""
    ok = [r for r in runs if not math.isnan(r.final_train_loss)]
    if not ok:
        raise RuntimeError(f"no sweep run of {runs[0].source if runs else '?'} finished with a finite loss")
    best = min(ok, key=lambda r: (r.final_train_loss, r.lr))
    for r in runs:
        r.chosen = r is best
    return best.lr


def lr_tag(lr: float) -> str:
    """A folder-safe spelling of a learning rate: 0.03 -> 'lr0.03'."""
    return f"lr{lr:g}"
