"""BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, abdomen; Synapse ``RawData.zip``).

Layout: ``RawData/Training/img/img0001.nii.gz`` + ``RawData/Training/label/label0001.nii.gz`` (30 labelled cases,
ids 0001-0010, 0021-0040) and ``RawData/Testing/img/img0061.nii.gz`` (20 unlabelled; ``Test/img`` also accepted).
Case ids ``BTCV_0001``; test images go to imagesTs.
"""
from pathlib import Path
from typing import List

from ..spec import CaseFiles, Notes, Source, any_file, in_folder, match_files, pair_cases, walk_files

LABELS = {
    1: "Spleen", 2: "Right Kidney", 3: "Left Kidney", 4: "Gall Bladder", 5: "Esophagus", 6: "Liver",
    7: "Stomach", 8: "Aorta", 9: "Postcava", 10: "Portal Vein and Splenic Vein", 11: "Pancreas",
    12: "Right Adrenal Gland", 13: "Left Adrenal Gland",
}
IMAGE = r"img(\d{4})\.nii\.gz"
LABEL = r"label(\d{4})\.nii\.gz"


def find_cases(root: Path, notes: Notes) -> List[CaseFiles]:
    """The cases below ``root`` (see the module docstring); unusable files go to ``notes``."""
    files = list(walk_files(root))
    images = match_files(root, IMAGE, in_folder(files, "Training", "img"))
    labels = match_files(root, LABEL, in_folder(files, "Training", "label"))
    cases = pair_cases(images, labels, notes, lambda k: f"BTCV_{k}")
    test = match_files(root, IMAGE, in_folder(files, "Testing", "img") + in_folder(files, "Test", "img"))
    cases += [CaseFiles(f"BTCV_{k}", test[k]) for k in sorted(test)]
    return cases


SOURCE = Source(
    name="btcv", title="BTCV", labels=LABELS, find_cases=find_cases,
    looks_like=lambda root: any_file(root, LABEL),
    expected_layout="RawData/Training/img/imgNNNN.nii.gz + RawData/Training/label/labelNNNN.nii.gz "
                    "(+ RawData/Testing/img/imgNNNN.nii.gz)",
    reference="Landman et al., MICCAI 2015 Multi-Atlas Labeling Beyond the Cranial Vault (Synapse syn3193805)",
    licence="see Synapse syn3193805 terms",
)
