"""WORD V0.1.0: ``imagesTr|imagesVal|imagesTs/word_0001.nii.gz`` + ``labelsTr|labelsVal|labelsTs/...`` (labelsTs
comes in a separate zip; without it the test images go to imagesTs). Labels may be uint8 or uint16. The adrenal
label (12) covers both sides and is split by position. Case ids ``WORD_0001``.
"""
from pathlib import Path
from typing import List

from ..spec import CaseFiles, Notes, Source, any_file, in_folder, match_files, pair_cases, walk_files

LABELS = {
    1: "Liver", 2: "Spleen", 3: "Left Kidney", 4: "Right Kidney", 5: "Stomach", 6: "Gall Bladder",
    7: "Esophagus", 8: "Pancreas", 9: "Duodenum", 10: "Colon", 11: "Intestine", 12: "Adrenal Gland",
    13: "Rectum", 14: "Bladder", 15: "Left Head of Femur", 16: "Right Head of Femur",
}
NAME = r"word_(\d{4})\.nii\.gz"


def find_cases(root: Path, notes: Notes) -> List[CaseFiles]:
    """The cases below ``root`` (see the module docstring); unusable files go to ``notes``."""
    files = list(walk_files(root))
    cases = []
    for split in ("Tr", "Val", "Ts"):
        images = match_files(root, NAME, in_folder(files, f"images{split}"))
        labels = match_files(root, NAME, in_folder(files, f"labels{split}"))
        cases += pair_cases(images, labels, notes, lambda k: f"WORD_{k}", label_required=split != "Ts"
                            or bool(labels))
    return cases


SOURCE = Source(
    name="word", title="WORD", labels=LABELS, find_cases=find_cases,
    looks_like=lambda root: any_file(root, NAME),
    expected_layout="WORD-V0.1.0/imagesTr/word_NNNN.nii.gz + labelsTr/word_NNNN.nii.gz (also imagesVal/labelsVal, "
                    "imagesTs[/labelsTs])",
    reference="Luo et al., WORD: a large scale dataset ... for abdominal organ segmentation, MedIA 2022",
    licence="GPL-3.0 (academic use)",
)
