"""CT-ORG (TCIA): ``OrganSegmentations/volume-N.nii.gz`` + ``labels-N.nii.gz``, N = 0..139. Images and labels are
32-bit float; labels must hold whole numbers. Lungs (3) and kidneys (4) have one label for both sides: they are
split into right/left by position. Bone (5) and brain (6) have no DSM class and become background.
Case ids ``CTORG_N``.
"""
from pathlib import Path
from typing import List

from ..spec import CaseFiles, Notes, Source, any_file, match_files, pair_cases, walk_files

LABELS = {1: "Liver", 2: "Bladder", 3: "Lung", 4: "Kidney", 5: None, 6: None}
VOLUME = r"volume-(\d+)\.nii(?:\.gz)?"
LABEL = r"labels-(\d+)\.nii(?:\.gz)?"


def find_cases(root: Path, notes: Notes) -> List[CaseFiles]:
    """The cases below ``root`` (see the module docstring); unusable files go to ``notes``."""
    files = list(walk_files(root))
    labels = match_files(root, LABEL, files)
    if not labels:
        return []
    images = match_files(root, VOLUME, files)
    return pair_cases(images, labels, notes, lambda k: f"CTORG_{int(k)}")


SOURCE = Source(
    name="ct_org", title="CTORG", labels=LABELS, find_cases=find_cases,
    looks_like=lambda root: any_file(root, LABEL),
    expected_layout="OrganSegmentations/volume-N.nii.gz + OrganSegmentations/labels-N.nii.gz",
    reference="Rister et al., CT-ORG, Scientific Data 2020 (TCIA doi:10.7937/tcia.2019.tt7f4v7o)",
    licence="CC BY 3.0",
)
