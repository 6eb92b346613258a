"""Pancreas-CT (TCIA, NIH): DICOM ``Pancreas-CT/PANCREAS_0001/<study>/<series>/1-001.dcm`` (or ``000000.dcm``; the
study/series folder names are unpredictable) + labels ``TCIA_pancreas_labels-02-05-2017/label0001.nii.gz``
(``.nii`` accepted). Put both folders under one INPUT_DIR. Cases 25 and 70 have labels but no image in the 2020
release: documented skips.

The label NIfTI does not share the DICOM stack's array order (it is stored flipped in y), so it is resampled
into the image's physical space (nearest neighbour; an exact flip/permutation when the grids coincide), never
paired by index. Case ids ``PancreasCT_0001``.
"""
import re
from pathlib import Path
from typing import Dict, List

from .. import readers
from ..spec import CaseFiles, Notes, Source, any_file, match_files, natural_key, pair_cases, walk_files

LABELS = {1: "Pancreas"}
PATIENT = re.compile(r"PANCREAS_(\d{4})")
LABEL = r"label(\d{4})\.nii(?:\.gz)?"


def find_cases(root: Path, notes: Notes) -> List[CaseFiles]:
    """The cases below ``root`` (see the module docstring); unusable files go to ``notes``."""
    files = list(walk_files(root))
    series: Dict[str, List[Path]] = {}
    for f in files:
        if f.suffix.lower() != ".dcm":
            continue
        pid = next((match.group(1) for match in map(PATIENT.fullmatch, f.parts) if match), None)
        if pid is not None:
            series.setdefault(pid, []).append(f)
    labels = match_files(root, LABEL, files)
    images = {k: sorted(v, key=lambda p: natural_key(p.name)) for k, v in series.items()}
    cases = pair_cases(images, labels, notes, lambda k: f"PancreasCT_{k}")
    for c in cases:
        c.image = list(c.image)
    return cases


def read_image(case: CaseFiles):
    """The patient's DICOM series, sorted by position along the slice normal."""
    return readers.read_dicom_series(case.image)[0]


SOURCE = Source(
    name="pancreas_ct", title="PancreasCT", labels=LABELS, find_cases=find_cases, read_image=read_image,
    label_grid="physical",
    looks_like=lambda root: any_file(root, LABEL) and any(PATIENT.fullmatch(p.name) for p in Path(root).rglob("PANCREAS_*")),
    expected_layout="Pancreas-CT/PANCREAS_NNNN/<study>/<series>/*.dcm + "
                    "TCIA_pancreas_labels-02-05-2017/labelNNNN.nii.gz under one folder",
    reference="Roth et al., DeepOrgan, MICCAI 2015; TCIA Pancreas-CT (doi:10.7937/K9/TCIA.2016.tNB1kqBU)",
    licence="CC BY 3.0",
)
