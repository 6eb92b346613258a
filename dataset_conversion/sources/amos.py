"""AMOS 2022: ``amos22/imagesTr|imagesVa|imagesTs/amos_0001.nii.gz`` + ``labelsTr|labelsVa[/labelsTs]``. Only CT
(id < 500) is converted; MRI ids (>= 500) are skipped with one note. ``__MACOSX`` is ignored. Label 15 is
prostate/uterus; it is mapped to Prostate as in the official DSM/CLIP-Driven tables (so female cases label the
uterus as Prostate). Validation images without labelsVa (original release) and test images go to imagesTs.
Case ids ``AMOS_0001``.
"""
from pathlib import Path
from typing import List

from ..spec import CaseFiles, Notes, Source, any_file, in_folder, match_files, pair_cases, walk_files

LABELS = {
    1: "Spleen", 2: "Right Kidney", 3: "Left Kidney", 4: "Gall Bladder", 5: "Esophagus", 6: "Liver",
    7: "Stomach", 8: "Aorta", 9: "Postcava", 10: "Pancreas", 11: "Right Adrenal Gland", 12: "Left Adrenal Gland",
    13: "Duodenum", 14: "Bladder", 15: "Prostate",
}
NAME = r"amos_(\d{4})\.nii\.gz"
MRI_FROM = 500


def find_cases(root: Path, notes: Notes) -> List[CaseFiles]:
    """The cases below ``root`` (see the module docstring); unusable files go to ``notes``."""
    files = list(walk_files(root))
    cases, mri = [], 0
    for split in ("Tr", "Va", "Ts"):
        images = match_files(root, NAME, in_folder(files, f"images{split}"))
        labels = match_files(root, NAME, in_folder(files, f"labels{split}"))
        mri += sum(int(k) >= MRI_FROM for k in images)
        images = {k: v for k, v in images.items() if int(k) < MRI_FROM}
        labels = {k: v for k, v in labels.items() if int(k) < MRI_FROM}
        cases += pair_cases(images, labels, notes, lambda k: f"AMOS_{k}", label_required=bool(labels))
    if mri:
        notes.skip(f"{mri} MRI images (amos_0500 and above)", "DSM is a CT model; AMOS ids >= 500 are MRI")
    return cases


SOURCE = Source(
    name="amos", title="AMOS", labels=LABELS, find_cases=find_cases,
    looks_like=lambda root: any_file(root, NAME),
    expected_layout="amos22/imagesTr/amos_NNNN.nii.gz + amos22/labelsTr/amos_NNNN.nii.gz (also imagesVa/labelsVa, "
                    "imagesTs)",
    reference="Ji et al., AMOS: a large-scale abdominal multi-organ benchmark, NeurIPS 2022 (Zenodo 7155725)",
    licence="CC BY 4.0 (Zenodo) / CC BY-SA 4.0 (dataset.json)",
)
