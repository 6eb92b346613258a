"""KiTS19 / KiTS21 / KiTS23: ``case_00000/imaging.nii.gz`` plus

* KiTS19 (``kits19/data/``): ``segmentation.nii.gz``, labels 1 kidney, 2 tumor;
* KiTS21 (``kits21/data/``): ``aggregated_MAJ_seg.nii.gz`` (the official reference), 1 kidney, 2 tumor, 3 cyst;
  ``segmentations/`` and ``raw/`` (per-rater files) are ignored;
* KiTS23 (``kits23/dataset/``): ``segmentation.nii.gz``, 1 kidney, 2 tumor, 3 cyst; ``instances/`` is ignored.

The version is detected from the layout: aggregated_MAJ_seg -> 21; ``kits23.json``, an ``instances/`` folder,
case ids >= 300 or a ``kits23`` folder name -> 23; a ``kits21`` folder name -> 21; otherwise 19. A label holding
3 (cyst) in a folder taken for KiTS19 fails with the reason and how to mark the folder as KiTS21/23. Arrays are stored slice-first (I,P,L affine); image and label share that
grid and are reoriented together. The kidney label covers both kidneys: tumor and cyst voxels count as kidney
too, and each connected kidney (with its masses) is assigned right/left by position. KiTS19 does not annotate
cysts. Imaging is downloaded separately (``kits23_download_data``); a case without ``imaging.nii.gz`` is a
documented skip, a case without a label goes to imagesTs. Case ids ``KiTS_00000``.
"""
from pathlib import Path
from typing import List

from .. import readers
from ..spec import CaseError, CaseFiles, Notes, Source, any_file, natural_key, walk_files

LABELS_19 = {1: "Kidney", 2: ("Kidney", "Kidney Tumor")}
LABELS = {1: "Kidney", 2: ("Kidney", "Kidney Tumor"), 3: ("Kidney", "Kidney Cyst")}
LABEL_FILES = ("segmentation.nii.gz", "aggregated_MAJ_seg.nii.gz")


def detect_version(root: Path, folders: List[Path]) -> str:
    """'19', '21' or '23' from the layout (see module docstring)."""
    if any((f / "aggregated_MAJ_seg.nii.gz").is_file() for f in folders):
        return "21"
    named = next((p.lower()[4:] for p in reversed(folders[0].parts) if p.lower() in ("kits19", "kits21", "kits23")),
                 None)                                   # the nearest kitsNN folder above the cases
    if (any_file(root, r"kits23\.json") or any((f / "instances").is_dir() for f in folders)
            or any(int(f.name[5:]) >= 300 for f in folders)):
        return "23"
    return named or "19"


def read_label(case: CaseFiles, image, ctx):
    """The default label reader; a cyst (3) in a case taken for KiTS19 names the detection and its fix."""
    arr = readers.read_nifti_label(case, image, ctx)
    if case.info.get("kits_version") == "19" and arr.size and arr.max() == 3:
        raise CaseError(f"{case.label} holds label 3, a kidney cyst in KiTS21/23, but its folder was taken for "
                        f"KiTS19 (no kits23.json, instances/ folder, case id >= 300 or kits21/kits23 folder name). "
                        f"Keep the case folders under a folder named kits23 (or kits21), or put kits23.json back, "
                        f"and run again.")
    return arr


def find_cases(root: Path, notes: Notes) -> List[CaseFiles]:
    """The cases below ``root`` (see the module docstring); unusable files go to ``notes``."""
    folders = sorted({f.parent for f in walk_files(root)
                      if f.name in ("imaging.nii.gz",) + LABEL_FILES and f.parent.name.startswith("case_")
                      and f.parent.name[5:].isdigit()}, key=lambda p: natural_key(p.name))
    if not folders:
        return []
    version = detect_version(root, folders)
    label_map = LABELS_19 if version == "19" else LABELS
    cases = []
    for folder in folders:
        image = folder / "imaging.nii.gz"
        label = next((folder / n for n in LABEL_FILES if (folder / n).is_file()), None)
        if not image.is_file():
            notes.skip(label, "label without image: imaging.nii.gz is not downloaded (run the KiTS starter code's "
                              "download script, e.g. kits23_download_data)")
            continue
        cases.append(CaseFiles(f"KiTS_{folder.name[5:]}", image, label, label_map=label_map if label else None,
                               info={"kits_version": version}))
    return cases


SOURCE = Source(
    name="kits", title="KiTS", labels=LABELS, find_cases=find_cases, read_label=read_label,
    looks_like=lambda root: any_file(root, r"imaging\.nii\.gz") or any_file(root, r"aggregated_MAJ_seg\.nii\.gz"),
    expected_layout="case_NNNNN/imaging.nii.gz + case_NNNNN/segmentation.nii.gz (KiTS19/23) or "
                    "aggregated_MAJ_seg.nii.gz (KiTS21)",
    reference="Heller et al., The KiTS19/21/23 challenges (github.com/neheller/kits19, kits21, kits23)",
    licence="CC BY-NC-SA 4.0",
)
