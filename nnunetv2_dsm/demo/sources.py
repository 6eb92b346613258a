"""Phantom "source datasets" in their distributed layouts, for the demo.

Each demo source is one public dataset's folder layout in miniature (the same file names, folders, dtypes and
array orientations as :mod:`nnunetv2_dsm.dataset_conversion.fixtures`, whose grids and NIfTI writer are reused),
filled with :mod:`nnunetv2_dsm.phantom` cases instead of boxes, and labelled the way that dataset labels them:
only its own classes, with its own label ids. Every image shows the whole phantom anatomy; what a source does not
annotate stays unlabelled (partial labels), as in the real datasets.

=========  ======================================  ==================================  =========================
source     layout (as unpacked)                    labels (source ids)                 tumors drawn
=========  ======================================  ==================================  =========================
btcv       RawData/Training/{img,label}, LPS       13 organs, BTCV ids                 none
amos       amos22/imagesTr|labelsTr, RAS           15 organs, AMOS ids                 none
lits       .../Training Batch 1/volume-N.nii, LAS  1 liver, 2 liver tumor             Liver Tumor
kits       kits23/dataset/case_N/, I,P,L float32   1 kidney, 2 tumor, 3 cyst          Kidney Tumor (+ Cyst)
msd        Task07_Pancreas/imagesTr|labelsTr, LPS  1 pancreas, 2 cancer                Pancreas Tumor (held out)
=========  ======================================  ==================================  =========================

Pancreas Tumor is only ever drawn in the MSD cases, which the merge puts in the zero-shot inference set: the model
never sees that class in training and is asked for it by a text prompt.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from nnunetv2_dsm.dataset_conversion.fixtures import IPL, LAS, LPS, RAS, Grid, write_nifti
from nnunetv2_dsm.dataset_conversion.fixtures_more import MSD_JSON, MSD_TASKS
from nnunetv2_dsm.dataset_conversion.fixtures_organs import AMOS, AMOS_JSON, BTCV
from nnunetv2_dsm.labels import TUMOR_NAMES, class_index
from nnunetv2_dsm.phantom import make_case

HELD_OUT_CLASS = "Pancreas Tumor"
HELD_OUT_PROMPT = "pancreas tumor"

# raw label tables: (source label id, DSM classes whose voxels get it); later entries overwrite earlier ones
RawTable = Sequence[Tuple[int, Tuple[str, ...]]]
_LITS: RawTable = ((1, ("Liver",)), (2, ("Liver Tumor",)))
_KITS: RawTable = ((1, ("Right Kidney", "Left Kidney")), (2, ("Kidney Tumor",)), (3, ("Kidney Cyst",)))
_MSD07: RawTable = ((1, ("Pancreas",)), (2, ("Pancreas Tumor",)))


def _organ_table(table: Dict[int, str]) -> RawTable:
    return tuple((raw, (name,)) for raw, name in table.items())


@dataclass(frozen=True)
class DemoSource:
    """One phantom source: converter SOURCE name, nnU-Net dataset id, tumors drawn per case, its raw labels."""
    name: str
    dataset_id: int
    raw_table: RawTable
    tumors: Tuple[Tuple[str, ...], ...]   # per case (cycled): tumor types drawn into that case
    seed: int

    def tumors_of(self, i: int) -> Tuple[str, ...]:
        return self.tumors[i % len(self.tumors)] if self.tumors else ()


SOURCES: Dict[str, DemoSource] = {s.name: s for s in (
    DemoSource("btcv", 501, _organ_table(BTCV), (), 1000),
    DemoSource("amos", 502, _organ_table(AMOS), (), 2000),
    DemoSource("lits", 503, _LITS, (("Liver Tumor",),), 3000),
    DemoSource("kits", 504, _KITS, (("Kidney Tumor",), ("Kidney Tumor", "Kidney Cyst")), 4000),
    DemoSource("msd", 505, _MSD07, ((HELD_OUT_CLASS,),), 5000),
)}


def absent_tumors(source: str) -> Tuple[str, ...]:
    """The tumor classes no case of ``source`` has (the phantom never draws them there), in class order."""
    drawn = {t for case in SOURCES[source].tumors for t in case}
    return tuple(t for t in TUMOR_NAMES if t not in drawn)


# --------------------------------------------------------------------------------------------------------- grids
def phantom_grid(shape_zyx: Sequence[int], spacing_zyx: Sequence[float], like: Grid) -> Grid:
    """A grid with ``like``'s axis order and signs (LPS, RAS, LAS, IPL, ...) covering the phantom's field of view."""
    spacing = tuple(float(s) for s in spacing_zyx[::-1])             # per physical axis x, y, z
    extent = tuple((0.0, n * s) for n, s in zip(shape_zyx[::-1], spacing))
    return Grid(axes=like.axes, extent=extent, spacing=spacing)


def to_grid(arr_lps_zyx: np.ndarray, grid: Grid) -> np.ndarray:
    """The phantom array (z, y, x in LPS) re-indexed for ``grid`` (the array :func:`fixtures.write_nifti` takes):
    its axis k runs along physical axis ``grid.axes[2 - k]`` -- an exact permutation/flip, no resampling."""
    axes = [grid.axes[2 - k] for k in range(3)]
    out = np.transpose(arr_lps_zyx, [2 - a for a, _ in axes])
    flips = tuple(k for k, (_, s) in enumerate(axes) if s < 0)
    return np.ascontiguousarray(np.flip(out, flips) if flips else out)


def raw_label(multi_hot: np.ndarray, table: RawTable) -> np.ndarray:
    """The label as the source stores it: each entry's id where any of its classes is set (later entries win)."""
    out = np.zeros(multi_hot.shape[1:], np.uint8)
    for raw, classes in table:
        out[multi_hot[[class_index(c) - 1 for c in classes]].any(0)] = raw
    return out


# ------------------------------------------------------------------------------------------------------- writers
@dataclass
class PhantomCaseFiles:
    """What was written for one case: its expected converted case id, the image and label files."""
    case_id: str
    image: Path
    label: Path


def _write(image: np.ndarray, label: np.ndarray, spacing, grid: Grid, img_path: Path, lab_path: Path,
           img_dtype=np.int16, lab_dtype=np.uint8) -> None:
    g = phantom_grid(image.shape, spacing, grid)
    write_nifti(img_path, to_grid(image, g), g, img_dtype)
    write_nifti(lab_path, to_grid(label, g), g, lab_dtype)


def _btcv(root: Path, i: int) -> Tuple[str, Path, Path, Grid, dict]:
    cid = 1 + i if i < 10 else 11 + i                                 # ids 0001-0010, 0021-0040 as in BTCV
    base = root / "RawData" / "Training"
    return f"BTCV_{cid:04d}", base / "img" / f"img{cid:04d}.nii.gz", base / "label" / f"label{cid:04d}.nii.gz", \
        LPS, {}


def _amos(root: Path, i: int):
    base = root / "amos22"
    return f"AMOS_{i + 1:04d}", base / "imagesTr" / f"amos_{i + 1:04d}.nii.gz", \
        base / "labelsTr" / f"amos_{i + 1:04d}.nii.gz", RAS, {}


def _lits(root: Path, i: int):
    base = root / "media/nas/01_Datasets/CT/LITS" / "Training Batch 1"
    return f"LiTS_{i:04d}", base / f"volume-{i}.nii", base / f"segmentation-{i}.nii", LAS, {}


def _kits(root: Path, i: int):
    folder = root / "kits23" / "dataset" / f"case_{i:05d}"
    return f"KiTS_{i:05d}", folder / "imaging.nii.gz", folder / "segmentation.nii.gz", IPL, \
        {"img_dtype": np.float32}


def _msd(root: Path, i: int):
    folder, stem = MSD_TASKS["07"][:2]
    base = root / folder
    n = f"{i + 1:03d}"
    return f"MSD07_{stem}_{n}", base / "imagesTr" / f"{stem}_{n}.nii.gz", base / "labelsTr" / f"{stem}_{n}.nii.gz", \
        LPS, {}


_LAYOUTS: Dict[str, Callable] = {"btcv": _btcv, "amos": _amos, "lits": _lits, "kits": _kits, "msd": _msd}


def _dataset_files(source: str, root: Path, case_ids: List[str]) -> None:
    """The small metadata files the distributions carry (dataset.json of AMOS and MSD, kits23.json)."""
    if source == "amos":
        (root / "amos22" / "dataset.json").write_text(json.dumps({
            "name": "AMOS", "labels": {str(i): n for i, n in enumerate(AMOS_JSON)}, "numTraining": len(case_ids)}))
    elif source == "kits":
        (root / "kits23" / "dataset" / "kits23.json").write_text("[]")
    elif source == "msd":
        folder, stem = MSD_TASKS["07"][:2]
        (root / folder / "dataset.json").write_text(json.dumps({
            "name": "Pancreas", "modality": {"0": "CT"},
            "labels": {"0": "background", **{str(i + 1): n for i, n in enumerate(MSD_JSON["07"])}},
            "numTraining": len(case_ids), "numTest": 0,
            "training": [{"image": f"./imagesTr/{c.split('_', 1)[1]}.nii.gz",
                          "label": f"./labelsTr/{c.split('_', 1)[1]}.nii.gz"} for c in case_ids], "test": []}))


def case_seed(source: str, i: int, seed: int = 0) -> int:
    """The phantom seed of case ``i`` of ``source`` in the phantom drawn with ``seed`` (0: the demo's phantom)."""
    if seed < 0:
        raise ValueError(f"the phantom seed must be >= 0, got {seed}")
    return SOURCES[source].seed + i + 100_000 * seed


def write_source(source: str, root, n_cases: int, shape: Sequence[int] = (48, 48, 48),
                 spacing: Sequence[float] = (3.0, 3.0, 3.0), seed: int = 0,
                 variation: float = 0.0) -> List[PhantomCaseFiles]:
    """Write ``n_cases`` phantom cases of ``source`` (a key of :data:`SOURCES`) in its distributed layout under
    ``root`` (the converter's INPUT_DIR). Returns the files per expected case id. Deterministic (seeded): ``seed``
    draws another phantom (tumor positions and sizes, organ shapes; with ``variation`` > 0 also organ sizes and
    positions, see :func:`~nnunetv2_dsm.phantom.make_case`); the defaults give the demo's phantom."""
    spec, root = SOURCES[source], Path(root)
    out = []
    for i in range(n_cases):
        case_id, img_path, lab_path, grid, kw = _LAYOUTS[source](root, i)
        case = make_case(shape, spacing, seed=case_seed(source, i, seed), tumors=spec.tumors_of(i),
                         variation=variation)
        _write(case.image, raw_label(case.multi_hot, spec.raw_table), case.spacing, grid, img_path, lab_path, **kw)
        out.append(PhantomCaseFiles(case_id, img_path, lab_path))
    _dataset_files(source, root, [c.case_id for c in out])
    return out


def expected_multi_hot(source: str, i: int, shape: Sequence[int] = (48, 48, 48),
                       spacing: Sequence[float] = (3.0, 3.0, 3.0), seed: int = 0,
                       variation: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
    """(image, multi-hot restricted to the source's classes) that case ``i`` of ``source`` must convert to (LPS)."""
    from nnunetv2_dsm.phantom import restrict_to_annotated
    spec = SOURCES[source]
    case = make_case(shape, spacing, seed=case_seed(source, i, seed), tumors=spec.tumors_of(i),
                     variation=variation)
    annotated = sorted({c for _, classes in spec.raw_table for c in classes})
    mh = restrict_to_annotated(case.multi_hot, annotated)
    tumors = [class_index(c) - 1 for _, classes in spec.raw_table for c in classes if class_index(c) > 25]
    for k, t in enumerate(tumors):                 # one tumor per voxel: a later label id overwrites an earlier
        for earlier in tumors[:k]:
            mh[earlier] &= ~mh[t]
    return case.image, mh
