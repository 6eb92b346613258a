"""LiTS 2017 (CodaLab): ``Training Batch 1/volume-0.nii`` + ``segmentation-0.nii`` ... (131 labelled, uncompressed
``.nii``), test ``test-volume-0.nii`` ... (70 unlabelled). The archives may unpack under deep prefixes such as
``media/nas/01_Datasets/CT/LITS/``: files are found recursively. Case ids ``LiTS_0000`` and, for test volumes (their
numbers overlap the training ones), ``LiTS_test_0000``.
"""
from pathlib import Path
from typing import List

from ..spec import CaseFiles, Notes, Source, any_file, match_files, pair_cases, walk_files

LABELS = {1: "Liver", 2: ("Liver", "Liver Tumor")}
VOLUME = r"volume-(\d+)\.nii(?:\.gz)?"
SEG = r"segmentation-(\d+)\.nii(?:\.gz)?"
TEST = r"test-volume-(\d+)\.nii(?:\.gz)?"


def find_cases(root: Path, notes: Notes) -> List[CaseFiles]:
    """The cases below ``root`` (see the module docstring); unusable files go to ``notes``."""
    files = list(walk_files(root))
    images = match_files(root, VOLUME, files)
    labels = match_files(root, SEG, files)
    cases = pair_cases(images, labels, notes, lambda k: f"LiTS_{int(k):04d}")
    test = match_files(root, TEST, files)
    cases += [CaseFiles(f"LiTS_test_{int(k):04d}", test[k]) for k in sorted(test, key=int)]
    return cases


SOURCE = Source(
    name="lits", title="LiTS", labels=LABELS, find_cases=find_cases,
    looks_like=lambda root: any_file(root, SEG),
    expected_layout="'Training Batch 1/volume-N.nii' + 'Training Batch 1/segmentation-N.nii' (any depth; "
                    "test-volume-N.nii for the test set)",
    reference="Bilic et al., The Liver Tumor Segmentation Benchmark (LiTS), MedIA 2023",
    licence="CC BY-NC-ND 4.0",
)
