"""Miniature layouts of BTCV, CHAOS, Pancreas-CT, CT-ORG, WORD and AMOS for :func:`.fixtures.write_fixture`
(names, folders, dtypes, orientations, quirks as in ``docs/datasets.md``). The expected DSM classes are written out
here from each dataset's documentation, independently of the converter's maps."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from .fixtures import (LAS, LPS, RAS, Box, Fixture, FixtureCase, Grid, raw_label, voxel_centres, write_dicom_series,
                       write_junk, write_png, write_scene)

X_RIGHT, X_LEFT = (-44, -32, -20), (12, 24, 36)     # box x-starts on the patient's right (LPS x < 0) / left
Y_SLOTS, Z_SLOTS = (-32, -20, -8, 4, 16), (0, 15, 30, 45)


class Scene:
    """Places 8x8x10 mm boxes in free slots on the requested side; ``shift`` varies the layout between cases."""

    def __init__(self, shift: int = 0):
        self.boxes: List[Box] = []
        self.free = {s: [(x, y, z) for z in Z_SLOTS for y in Y_SLOTS for x in xs]
                     for s, xs in (("right", X_RIGHT), ("left", X_LEFT))}
        for s in self.free:
            self.free[s] = self.free[s][shift:] + self.free[s][:shift]

    def put(self, raw, expect, side: str = "right", hu: float = 80.0) -> Box:
        x, y, z = self.free[side].pop(0)
        b = Box(raw, (x, y, z), (x + 8, y + 8, z + 10), tuple(expect), hu)
        self.boxes.append(b)
        return b

    def inner(self, host: Box, raw, expect, hu: float = 20.0) -> Box:
        """A one-voxel box in the corner of ``host`` (a tumor inside its organ)."""
        b = Box(raw, host.lo, (host.lo[0] + 4, host.lo[1] + 4, host.lo[2] + 5), tuple(expect), hu)
        self.boxes.append(b)
        return b

    def add(self, raw, lo, hi, expect, hu: float = 80.0) -> Box:
        b = Box(raw, tuple(lo), tuple(hi), tuple(expect), hu)
        self.boxes.append(b)
        return b


def _side(name: str) -> str:
    return "left" if name.startswith("Left") or name in ("Spleen", "Stomach") else "right"


def _plain(table: Dict[int, str], shift: int, skip=()) -> Scene:
    """A scene holding one box per source id, each expected as its single named class."""
    sc = Scene(shift)
    for raw, name in table.items():
        if raw not in skip:
            sc.put(raw, (name,), _side(name))
    return sc


def _annot(*names) -> Tuple[str, ...]:
    return tuple(names)


# --------------------------------------------------------------------------------------------------------------- BTCV
BTCV = {1: "Spleen", 2: "Right Kidney", 3: "Left Kidney", 4: "Gall Bladder", 5: "Esophagus", 6: "Liver",
        7: "Stomach", 8: "Aorta", 9: "Postcava", 10: "Portal Vein and Splenic Vein", 11: "Pancreas",
        12: "Right Adrenal Gland", 13: "Left Adrenal Gland"}
BTCV_TRAIN_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] + list(range(21, 41))


def btcv(root: Path, n_cases: int = 2) -> Fixture:
    """RawData/Training/{img,label} (LPS, uint8 labels; case 2 lacks right kidney and gall bladder) + Testing/img."""
    base, cases = root / "RawData", {}
    for i, cid in enumerate(BTCV_TRAIN_IDS[:n_cases]):
        sc = _plain(BTCV, i, skip=(2, 4) if i == 1 else ())          # "some patients lack (2) and (4)"
        write_scene(base / "Training/img" / f"img{cid:04d}.nii.gz", base / "Training/label" / f"label{cid:04d}.nii.gz",
                    sc.boxes, LPS)
        cases[f"BTCV_{cid:04d}"] = FixtureCase(f"BTCV_{cid:04d}", sc.boxes, annotated=tuple(BTCV.values()))
    test = _plain(BTCV, 5).boxes
    write_scene(base / "Testing/img/img0061.nii.gz", None, test, LPS)
    cases["BTCV_0061"] = FixtureCase("BTCV_0061", test, test=True)
    return Fixture("btcv", root, cases)


# --------------------------------------------------------------------------------------------------------------- CHAOS
def chaos(root: Path) -> Fixture:
    """CT/<pid>/DICOM_anon (z decreasing with the name index) + Ground PNGs (1-bit and 8-bit); Test_Sets; MR junk."""
    cases, grid = {}, LPS
    nz = grid.size[2]
    names = [f"i{nz - 1 - k:04d},0000b.dcm" for k in range(nz)]       # z decreases with the file index
    instance = [nz - k for k in range(nz)]
    for pid, one_bit, shift in (("1", True, 0), ("2", False, 3)):
        sc = Scene(shift)
        sc.put(1, ("Liver",), "right", hu=140)
        sc.put(1, ("Liver",), "right", hu=140)
        folder = root / "Train_Sets/CT" / pid
        write_dicom_series(folder / "DICOM_anon", names, sc.boxes, grid, -1000.0, instance)
        lab = raw_label(sc.boxes, voxel_centres(grid.reference()))
        for k in range(nz):
            write_png(folder / "Ground" / f"liver_GT_{nz - 1 - k:03d}.png", lab[k] > 0, one_bit)
        cases[f"CHAOS_{pid}"] = FixtureCase(f"CHAOS_{pid}", sc.boxes, annotated=("Liver",))
    write_dicom_series(root / "Test_Sets/CT/3/DICOM_anon", names, Scene(5).boxes, grid, -1000.0, instance)
    cases["CHAOS_3"] = FixtureCase("CHAOS_3", test=True)
    mr = root / "Train_Sets/MR/1/T2SPIR"                              # MR part: must be ignored
    write_dicom_series(mr / "DICOM_anon", ["IMG-0001-00001.dcm", "IMG-0001-00002.dcm"], [], Grid(
        extent=((-48, 48), (-40, 40), (0, 10))), 0.0)
    write_png(mr / "Ground/IMG-0001-00001.png", np.zeros((20, 24)), False)
    return Fixture("chaos", root, cases)


# --------------------------------------------------------------------------------------------------------- Pancreas-CT
def pancreas_ct(root: Path) -> Fixture:
    """DICOM series in unpredictable study/series folders + NIfTI labels (y-flipped; or on a finer grid); label0025
    without image."""
    cases, grid = {}, LPS
    nz = grid.size[2]
    fine = Grid(axes=((0, 1), (1, 1), (2, 1)), extent=((-49, 47), (-41, 39), (0, 60)), spacing=(2.0, 2.0, 5.0))
    for pid, names, lab_grid in (
            ("0001", [f"1-{nz - k:03d}.dcm" for k in range(nz)], LAS),          # y-flipped label, same voxels
            ("0002", [f"{nz - 1 - k:06d}.dcm" for k in range(nz)], fine)):     # pre-2020 names; label on a finer grid
        sc = Scene(int(pid))
        sc.put(1, ("Pancreas",), "left", hu=100)
        series = root / "Pancreas-CT" / f"PANCREAS_{pid}" / f"11-24-2015-PANCREAS{pid}-Pancreas-1{pid}" / f"Pancreas-9{pid}"
        write_dicom_series(series, names, sc.boxes, grid, -1024.0, [nz - k for k in range(nz)])
        write_scene(None, root / "TCIA_pancreas_labels-02-05-2017" / f"label{pid}.nii.gz", sc.boxes, lab_grid,
                    lab_grid=lab_grid)
        cases[f"PancreasCT_{pid}"] = FixtureCase(f"PancreasCT_{pid}", sc.boxes, annotated=("Pancreas",))
    # label0025 exists, its image was removed from the 2020 release
    write_scene(None, root / "TCIA_pancreas_labels-02-05-2017/label0025.nii.gz", Scene().boxes, LAS)
    return Fixture("pancreas_ct", root, cases, skipped=["label0025.nii.gz"])


# --------------------------------------------------------------------------------------------------------------- CT-ORG
def ct_org(root: Path) -> Fixture:
    """float32 images and labels; one lungs label joined across the midline, one kidneys label, bone and brain."""
    cases = {}
    for n, shift in ((0, 0), (21, 2)):
        sc = Scene(shift)
        sc.put(1, ("Liver",), "right")
        sc.put(2, ("Bladder",), "left")
        sc.put(4, ("Right Kidney",), "right")
        sc.put(4, ("Left Kidney",), "left")
        sc.put(5, (), "left", hu=700)                                   # bone: no DSM class
        sc.put(6, (), "right", hu=30)                                   # brain: no DSM class
        # one lung component across the midline (joined at the carina): cut at the midline x = 0
        sc.add(3, (-24, -4, 50), (0, 12, 60), ("Right Lung",), hu=-800)
        sc.add(3, (0, -4, 50), (24, 12, 60), ("Left Lung",), hu=-800)
        write_scene(root / "OrganSegmentations" / f"volume-{n}.nii.gz", root / "OrganSegmentations" / f"labels-{n}.nii.gz",
                    sc.boxes, LAS, img_dtype=np.float32, lab_dtype=np.float32)
        cases[f"CTORG_{n}"] = FixtureCase(f"CTORG_{n}", sc.boxes, annotated=_annot(
            "Right Kidney", "Left Kidney", "Liver", "Right Lung", "Left Lung", "Bladder"))
    return Fixture("ct_org", root, cases)


# ----------------------------------------------------------------------------------------------------------------- WORD
WORD = {1: "Liver", 2: "Spleen", 3: "Left Kidney", 4: "Right Kidney", 5: "Stomach", 6: "Gall Bladder",
        7: "Esophagus", 8: "Pancreas", 9: "Duodenum", 10: "Colon", 11: "Intestine", 13: "Rectum", 14: "Bladder",
        15: "Left Head of Femur", 16: "Right Head of Femur"}


def word(root: Path) -> Fixture:
    """imagesTr/Val/Ts (labelsTs absent), a uint16 label, one adrenal label for both sides (left in two pieces)."""
    base, cases = root / "WORD-V0.1.0", {}
    annotated = tuple(WORD.values()) + ("Right Adrenal Gland", "Left Adrenal Gland")
    for split, wid, dtype in (("Tr", "0001", np.uint8), ("Val", "0002", np.uint16)):
        sc = _plain(WORD, int(wid))
        sc.put(12, ("Right Adrenal Gland",), "right")                  # one adrenal label, both sides
        sc.put(12, ("Left Adrenal Gland",), "left")
        sc.put(12, ("Left Adrenal Gland",), "left")                    # a second, separate left fragment
        write_scene(base / f"images{split}" / f"word_{wid}.nii.gz", base / f"labels{split}" / f"word_{wid}.nii.gz",
                    sc.boxes, LPS, lab_dtype=dtype)
        cases[f"WORD_{wid}"] = FixtureCase(f"WORD_{wid}", sc.boxes, annotated=annotated)
    write_scene(base / "imagesTs/word_0014.nii.gz", None, Scene().boxes, LPS)          # labelsTs not unpacked
    cases["WORD_0014"] = FixtureCase("WORD_0014", test=True)
    (base / "dataset.json").write_text(json.dumps({"name": "WORD", "labels": {str(k): v for k, v in WORD.items()}}))
    return Fixture("word", root, cases)


# ----------------------------------------------------------------------------------------------------------------- AMOS
AMOS = {1: "Spleen", 2: "Right Kidney", 3: "Left Kidney", 4: "Gall Bladder", 5: "Esophagus", 6: "Liver",
        7: "Stomach", 8: "Aorta", 9: "Postcava", 10: "Pancreas", 11: "Right Adrenal Gland", 12: "Left Adrenal Gland",
        13: "Duodenum", 14: "Bladder", 15: "Prostate"}
AMOS_JSON = ["background", "spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver", "stomach",
             "arota", "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder",
             "prostate/uterus"]


def amos(root: Path) -> Fixture:
    """RAS images; imagesTr/Va/Ts; an MRI id (>= 500) to skip; __MACOSX and ._ junk; dataset.json with "arota"."""
    base, cases = root / "amos22", {}
    for split, aid in (("Tr", "0001"), ("Va", "0008"), ("Tr", "0508")):   # 0508 is MRI: skipped
        sc = _plain(AMOS, int(aid) % 7)
        write_scene(base / f"images{split}" / f"amos_{aid}.nii.gz", base / f"labels{split}" / f"amos_{aid}.nii.gz",
                    sc.boxes, RAS)
        if int(aid) < 500:
            cases[f"AMOS_{aid}"] = FixtureCase(f"AMOS_{aid}", sc.boxes, annotated=tuple(AMOS.values()))
    write_scene(base / "imagesTs/amos_0015.nii.gz", None, Scene().boxes, RAS)
    cases["AMOS_0015"] = FixtureCase("AMOS_0015", test=True)
    write_junk(root / "__MACOSX/amos22/imagesTr", "amos_0001.nii.gz")
    write_junk(base / "labelsTr", "amos_0001.nii.gz")
    (base / "dataset.json").write_text(json.dumps({
        "name": "AMOS", "licence": "CC-BY-SA 4.0", "labels": {str(i): n for i, n in enumerate(AMOS_JSON)},
        "training": [{"image": "./imagesTr/amos_0001.nii.gz", "label": "./labelsTr/amos_0001.nii.gz"}],
        "test": [{"image": "./imagesTs/amos_0015.nii.gz"}]}))
    return Fixture("amos", root, cases, skipped=["MRI"])
