"""Medical Segmentation Decathlon, CT tasks 03 Liver, 06 Lung, 07 Pancreas, 08 HepaticVessel, 09 Spleen, 10 Colon.

INPUT_DIR is one ``TaskXX_Name`` folder or a folder holding several: ``TaskXX_Name/imagesTr/<name>_<n>.nii.gz`` +
``labelsTr/`` + ``imagesTs/`` (+ a v1 ``dataset.json``, whose label names are checked). The tars carry macOS
``._*`` files (ignored). Ids are sparse and padded differently per task; labels may be float32 (Task10).

Tumours whose host organ the task does not annotate (lung, colon, and hepatic-vessel tumours, whose DSM host is the
liver) are written as "tumour, host not annotated". Case ids ``MSD03_liver_0``; imagesTs go to imagesTs.
"""
import json
import re
from pathlib import Path
from typing import Dict, List

from ..spec import CaseFiles, InputError, Notes, Source, in_folder, match_files, pair_cases, walk_files

TASK_LABELS: Dict[str, dict] = {
    "03": {1: "Liver", 2: ("Liver", "Liver Tumor")},
    "06": {1: "Lung Tumor"},
    "07": {1: "Pancreas", 2: ("Pancreas", "Pancreas Tumor")},
    "08": {1: "Hepatic Vessel", 2: "Hepatic Vessel Tumor"},
    "09": {1: "Spleen"},
    "10": {1: "Colon Tumor"},
}
# label names in each task's dataset.json, lower-case (a mismatch means the folder is not that task)
TASK_JSON_LABELS = {"03": ["liver", "cancer"], "06": ["cancer"], "07": ["pancreas", "cancer"],
                    "08": ["vessel", "tumour"], "09": ["spleen"], "10": ["colon cancer primaries"]}
TASK = re.compile(r"Task(\d\d)_\w+")
LABELS: dict = {}     # per task, see TASK_LABELS


def task_folders(root: Path) -> List[Path]:
    """``TaskXX_*`` folders: root itself, or below it (two levels at most)."""
    if TASK.fullmatch(root.name):
        return [root]
    return sorted(p for pattern in ("Task*", "*/Task*") for p in root.glob(pattern)
                  if p.is_dir() and TASK.fullmatch(p.name) and "__MACOSX" not in p.parts)


def _check_json(folder: Path, task: str) -> None:
    """Refuse a task folder whose own dataset.json lists the labels of another MSD task (a missing or
    unreadable one is not checked)."""
    js = folder / "dataset.json"
    if not js.is_file():
        return
    try:
        labels = json.loads(js.read_text()).get("labels", {})
        names = [str(v).strip().lower() for k, v in sorted(labels.items(), key=lambda kv: int(kv[0])) if int(k) > 0]
    except (ValueError, AttributeError):
        return
    if names and names != TASK_JSON_LABELS[task]:
        raise InputError(f"{js} lists labels {names}, but MSD Task{task} has {TASK_JSON_LABELS[task]}; is "
                         f"{folder.name} really that task?")


def find_cases(root: Path, notes: Notes) -> List[CaseFiles]:
    """The cases below ``root`` (see the module docstring); unusable files go to ``notes``."""
    cases = []
    for folder in task_folders(root):
        task = TASK.fullmatch(folder.name).group(1)
        if task not in TASK_LABELS:
            notes.skip(folder, f"MSD Task{task} is not one of the CT tasks DSM uses (03, 06, 07, 08, 09, 10)")
            continue
        _check_json(folder, task)
        files = list(walk_files(folder))
        pattern = r"([a-z]+_\d+)\.nii\.gz"
        images = match_files(folder, pattern, in_folder(files, "imagesTr"))
        labels = match_files(folder, pattern, in_folder(files, "labelsTr"))
        found = pair_cases(images, labels, notes, lambda k: f"MSD{task}_{k}")
        test = match_files(folder, pattern, in_folder(files, "imagesTs"))
        found += [CaseFiles(f"MSD{task}_{k}", test[k]) for k in sorted(test)]
        for c in found:
            c.label_map = TASK_LABELS[task] if c.label is not None else None
        cases += found
    return cases


SOURCE = Source(
    name="msd", title="MSD", labels=LABELS, find_cases=find_cases,
    looks_like=lambda root: bool(task_folders(Path(root))),
    expected_layout="TaskXX_Name/imagesTr/<name>_N.nii.gz + TaskXX_Name/labelsTr/<name>_N.nii.gz, XX in "
                    "03, 06, 07, 08, 09, 10 (INPUT_DIR = one task folder or a folder of them)",
    reference="Antonelli et al., The Medical Segmentation Decathlon, Nat. Commun. 2022",
    licence="CC BY-SA 4.0",
)
