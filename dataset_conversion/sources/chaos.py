"""CHAOS, CT part (Zenodo 3431873): ``Train_Sets/CT/<pid>/DICOM_anon/i0000,0000b.dcm ...`` (one DICOM per slice, a
comma in the name) + ``Train_Sets/CT/<pid>/Ground/liver_GT_000.png ...`` (one mask per slice, 1-bit or 8-bit;
liver = nonzero). ``Test_Sets/CT/<pid>`` has no Ground and goes to imagesTs. MR folders are ignored.

Slice order comes from the file names, not from the DICOM positions (the official evaluation code says so, and
in the real data z *decreases* with the file index): PNG k is paired with DICOM k, then the pairs are sorted by
position together. Case ids ``CHAOS_<pid>``.
"""
import re
from pathlib import Path
from typing import Dict, List

import numpy as np

from .. import readers
from ..spec import CaseError, CaseFiles, InputError, Notes, Source, natural_key, walk_files

LABELS = {1: "Liver"}
DICOM_NAMES = (r"i(\d+),0000b\.dcm", r"IMG-\d+-(\d+)\.dcm")
MASK = r"liver_GT_(\d+)\.png"


def _indexed(files: List[Path], patterns) -> Dict[int, Path]:
    """``{slice index: file}`` for files whose name matches one of ``patterns`` (first group = index); a
    duplicate index is an :class:`InputError`."""
    out: Dict[int, Path] = {}
    for f in files:
        for p in patterns:
            match = re.fullmatch(p, f.name)
            if match:
                k = int(match.group(1))
                if k in out:
                    raise InputError(f"two slices with index {k}: {out[k]} and {f}; remove the duplicate.")
                out[k] = f
                break
    return out


def find_cases(root: Path, notes: Notes) -> List[CaseFiles]:
    """The cases below ``root`` (see the module docstring); unusable files go to ``notes``."""
    folders: Dict[Path, List[Path]] = {}
    for f in walk_files(root):
        if f.parent.name == "DICOM_anon" and f.parent.parent.parent.name == "CT":
            folders.setdefault(f.parent, []).append(f)
    cases = []
    for folder in sorted(folders, key=lambda p: natural_key(p.parent.name)):
        pid = folder.parent.name
        dicoms = _indexed(folders[folder], DICOM_NAMES)
        if not dicoms:
            notes.skip(folder, "no DICOM file named i<k>,0000b.dcm or IMG-<n>-<k>.dcm")
            continue
        ground = folder.parent / "Ground"
        image = [dicoms[k] for k in sorted(dicoms)]          # name order; positions are sorted when reading
        if not ground.is_dir():
            cases.append(CaseFiles(f"CHAOS_{pid}", image))
            continue
        masks = _indexed([p for p in sorted(ground.iterdir()) if not p.name.startswith(".")], (MASK,))
        if not masks:
            notes.skip(ground, "no liver_GT_<k>.png mask: case not converted")
            continue
        cases.append(CaseFiles(f"CHAOS_{pid}", image, [masks[k] for k in sorted(masks)],
                               info={"dicom_index": sorted(dicoms), "mask_index": sorted(masks)}))
    return cases


def read_image(case: CaseFiles):
    """The DICOM slices sorted by position; remembers the order for :func:`read_label`."""
    img, order = readers.read_dicom_series(case.image)
    n = len(order)
    if list(order) not in (list(range(n)), list(range(n - 1, -1, -1))):
        raise CaseError(f"{Path(case.image[0]).parent}: the DICOM slice positions do not follow the file-name order "
                        f"(i0000, i0001, ...), which defines the slice order in CHAOS. Check that the folder holds "
                        f"one series with its original file names.")
    case.info["order"] = order
    return img


def read_label(case: CaseFiles, image, ctx) -> np.ndarray:
    """PNG k belongs to DICOM k (file-name index); stacked in the image's slice order."""
    d_idx, m_idx = case.info["dicom_index"], case.info["mask_index"]
    if d_idx != m_idx:
        missing = sorted(set(d_idx) - set(m_idx))
        extra = sorted(set(m_idx) - set(d_idx))
        what = (f"DICOM slices {missing[:5]} have no liver_GT mask" if missing else "") + \
               (f"; masks {extra[:5]} have no DICOM slice" if extra else "")
        raise CaseError(f"{Path(case.label[0]).parent}: {what.strip('; ')}. Each slice i<k>,0000b.dcm needs "
                        f"liver_GT_<k>.png; restore the missing files from the archive.")
    rows, cols = image.GetSize()[1], image.GetSize()[0]
    stack = np.zeros((len(case.label), rows, cols), dtype=np.uint8)
    for z, i in enumerate(case.info["order"]):           # the DICOM file at volume slice z is files[i]
        mask = readers.read_png_mask(case.label[i])
        if mask.shape != (rows, cols):
            raise CaseError(f"{case.label[i]} is {mask.shape[1]}x{mask.shape[0]} pixels but its DICOM slice "
                            f"{case.image[i]} is {cols}x{rows}; the mask does not belong to this series.")
        stack[z] = mask
    return stack


SOURCE = Source(
    name="chaos", title="CHAOS", labels=LABELS, find_cases=find_cases, read_image=read_image, read_label=read_label,
    looks_like=lambda root: any(re.fullmatch(MASK, f.name) for _, f in zip(range(20000), walk_files(root))),
    expected_layout="Train_Sets/CT/<pid>/DICOM_anon/i<kkkk>,0000b.dcm + Train_Sets/CT/<pid>/Ground/liver_GT_<kkk>.png",
    reference="Kavur et al., CHAOS Challenge, MedIA 69 (2021) 101950 (Zenodo 3431873)",
    licence="CC BY-NC-SA 4.0",
)
