"""AbdomenCT-1K: ``AbdomenCT-1K-ImagePart{1,2,3}/Case_00001_0000.nii.gz`` (images already carry ``_0000``) and
``Mask/Case_00001.nii.gz``. Cases are paired by mask; images without a mask are skipped with one note. The kidney
label (2) covers both sides and is split by position. Case ids ``AbdomenCT1K_00001``.
"""
from pathlib import Path
from typing import List

from ..spec import CaseFiles, Notes, Source, any_file, match_files, walk_files

LABELS = {1: "Liver", 2: "Kidney", 3: "Spleen", 4: "Pancreas"}
IMAGE = r"Case_(\d{5})_0000\.nii\.gz"
MASK = r"Case_(\d{5})\.nii\.gz"


def find_cases(root: Path, notes: Notes) -> List[CaseFiles]:
    """The cases below ``root`` (see the module docstring); unusable files go to ``notes``."""
    files = list(walk_files(root))
    images = match_files(root, IMAGE, files)
    masks = match_files(root, MASK, files)
    cases = [CaseFiles(f"AbdomenCT1K_{k}", images[k], masks[k]) for k in sorted(masks) if k in images]
    for k in sorted(set(masks) - set(images)):
        notes.skip(masks[k], "mask without image: not converted (look for the image in ImagePart1-3)")
    unlabelled = len(set(images) - set(masks))
    if unlabelled and cases:
        notes.skip(f"{unlabelled} images without a mask", "not annotated in this release; DSM converts labelled "
                                                          "cases only")
    return cases


SOURCE = Source(
    name="abdomenct1k", title="AbdomenCT1K", labels=LABELS, find_cases=find_cases,
    looks_like=lambda root: any_file(root, IMAGE),
    expected_layout="AbdomenCT-1K-ImagePart1/Case_NNNNN_0000.nii.gz (Part1-3) + Mask/Case_NNNNN.nii.gz",
    reference="Ma et al., AbdomenCT-1K: is abdominal organ segmentation a solved problem? TPAMI 2021",
    licence="see github.com/JunMa11/AbdomenCT-1K",
)
