"""Miniature layouts of TotalSegmentator, AbdomenCT-1K, LiTS, KiTS 19/21/23 and the MSD CT tasks for
:func:`.fixtures.write_fixture`, and the ``WRITERS`` registry. Expected classes are stated independently of the
converter's maps."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import fixtures_organs as organs
from .fixtures import IPL, LAS, LPS, RAS, RPS, Fixture, FixtureCase, inside, voxel_centres, write_junk, write_nifti, \
    write_scene
from .fixtures_organs import Scene
from .sources.totalsegmentator import V1_NAMES, V2_NAMES     # the releases' file name lists

# ------------------------------------------------------------------------------------------------- TotalSegmentator
TS_EXPECT = {"spleen": ("Spleen",), "kidney_right": ("Right Kidney",), "kidney_left": ("Left Kidney",),
             "gallbladder": ("Gall Bladder",), "liver": ("Liver",), "stomach": ("Stomach",),
             "pancreas": ("Pancreas",), "adrenal_gland_right": ("Right Adrenal Gland",),
             "adrenal_gland_left": ("Left Adrenal Gland",), "esophagus": ("Esophagus",),
             "small_bowel": ("Intestine",), "duodenum": ("Duodenum",), "colon": ("Colon",),
             "urinary_bladder": ("Bladder",), "aorta": ("Aorta",), "inferior_vena_cava": ("Postcava",),
             "portal_vein_and_splenic_vein": ("Portal Vein and Splenic Vein",)}
TS_LOBES = {"lung_upper_lobe_left": "left", "lung_lower_lobe_left": "left", "lung_upper_lobe_right": "right",
            "lung_middle_lobe_right": "right", "lung_lower_lobe_right": "right"}


def _ts_case(folder: Path, names, version: str, shift: int) -> FixtureCase:
    sc = Scene(shift)
    sc.add("vertebrae_L1", (-8, 16, 0), (8, 24, 10), ())               # unmapped, drawn first ...
    liver = sc.put("liver", ("Liver",), "right")
    sc.add("rib_right_11", liver.lo, (liver.lo[0] + 4, liver.hi[1], liver.hi[2]), ("Liver",))   # ... never erases liver
    for name, expect in TS_EXPECT.items():
        if name != "liver":
            sc.put(name, expect, "left" if "left" in name or name in ("spleen", "stomach") else "right")
    for lobe, side in TS_LOBES.items():
        sc.put(lobe, ("Right Lung" if side == "right" else "Left Lung",), side, hu=-800)
    kl = next(box for box in sc.boxes if box.raw == "kidney_left")
    if version == "v2":
        sc.put("prostate", ("Prostate",), "right")
        sc.inner(kl, "kidney_cyst_left", ("Left Kidney", "Kidney Cyst"))     # later in class order: wins
        kr = next(box for box in sc.boxes if box.raw == "kidney_right")
        sc.inner(kr, "kidney_cyst_right", ("Right Kidney", "Kidney Cyst"))
        sc.put("heart", (), "left")
    else:
        sc.put("face", (), "left")
    write_scene(folder / "ct.nii.gz", None, sc.boxes, RAS)
    pts = voxel_centres(RAS.reference())
    for n in names:
        mask = np.zeros(pts.shape[1:], np.uint8)
        for box in sc.boxes:
            if box.raw == n:
                mask[inside(pts, box)] = 1
        write_nifti(folder / "segmentations" / f"{n}.nii.gz", mask, RAS, np.uint8)
    annotated = sorted({c for e in TS_EXPECT.values() for c in e} | {"Right Lung", "Left Lung"}
                       | ({"Prostate", "Kidney Cyst"} if version == "v2" else set()))
    return FixtureCase(f"TS_{folder.name}", sc.boxes, annotated=tuple(annotated))


def totalsegmentator(root: Path) -> Fixture:
    """A v2 (117 masks) and a v1 (104 masks) case, RAS, overlapping masks, lobes, kidney cysts, meta.csv."""
    base = root / "Totalsegmentator_dataset_v201"
    cases = {"TS_s0000": _ts_case(base / "s0000", V2_NAMES, "v2", 0),
             "TS_s0011": _ts_case(base / "s0011", V1_NAMES, "v1", 4)}
    (base / "meta.csv").write_text("\ufeffimage_id;age;gender;institute;study_type;split\n"
                                   "s0000;63;m;A;ct abdomen-pelvis;train\ns0011;70;f;B;CT Polytrauma ;test\n",
                                   encoding="utf-8")
    return Fixture("totalsegmentator", root, cases)


# --------------------------------------------------------------------------------------------------- AbdomenCT-1K
def abdomenct1k(root: Path) -> Fixture:
    """Images in ImagePart1-3 (x-flipped grid), masks in Mask/; a one-kidney patient; an image without mask."""
    cases = {}
    annotated = ("Spleen", "Right Kidney", "Left Kidney", "Liver", "Pancreas")
    for cid, part, both in (("00001", 1, True), ("00402", 2, False)):
        sc = Scene(int(cid) % 5)
        sc.put(1, ("Liver",), "right")
        sc.put(3, ("Spleen",), "left")
        sc.put(4, ("Pancreas",), "left")
        sc.put(2, ("Left Kidney",), "left")
        if both:
            sc.put(2, ("Right Kidney",), "right")     # else: a single kidney, placed by the body midline
        write_scene(root / f"AbdomenCT-1K-ImagePart{part}" / f"Case_{cid}_0000.nii.gz",
                    root / "Mask" / f"Case_{cid}.nii.gz", sc.boxes, RPS)
        cases[f"AbdomenCT1K_{cid}"] = FixtureCase(f"AbdomenCT1K_{cid}", sc.boxes, annotated=annotated)
    write_scene(root / "AbdomenCT-1K-ImagePart3/Case_00901_0000.nii.gz", None, Scene().boxes, RPS)   # no mask
    return Fixture("abdomenct1k", root, cases, skipped=["images without a mask"])


# ----------------------------------------------------------------------------------------------------------- LiTS
def lits(root: Path, n_cases: int = 2) -> Fixture:
    """Uncompressed .nii under media/nas/.../Training Batch 1|2 (a space in the name); a test volume."""
    base, cases = root / "media/nas/01_Datasets/CT/LITS", {}
    for n in range(n_cases):
        sc = Scene(n)
        liver = sc.put(1, ("Liver",), "right", hu=60)
        sc.put(1, ("Liver",), "right", hu=60)
        if n % 3 != 2:                                               # some cases have no tumour
            sc.inner(liver, 2, ("Liver", "Liver Tumor"))
        batch = "Training Batch 1" if n < max(1, n_cases // 2) else "Training Batch 2"
        write_scene(base / batch / f"volume-{n}.nii", base / batch / f"segmentation-{n}.nii", sc.boxes, LAS)
        cases[f"LiTS_{n:04d}"] = FixtureCase(f"LiTS_{n:04d}", sc.boxes, annotated=("Liver", "Liver Tumor"))
    write_scene(base / "Test/test-volume-0.nii", None, Scene().boxes, LAS)
    cases["LiTS_test_0000"] = FixtureCase("LiTS_test_0000", test=True)
    return Fixture("lits", root, cases)


# ----------------------------------------------------------------------------------------------------------- KiTS
def kits(root: Path, version: str = "23", n_cases: int = 2) -> Fixture:
    """KiTS19/21/23 layouts, slice-first I,P,L float32 imaging; per-rater files to ignore; a test case (19) or a
    case whose imaging is not downloaded (23)."""
    base = {"19": root / "kits19/data", "21": root / "kits21/kits21/data", "23": root / "kits23/dataset"}[version]
    seg = {"19": "segmentation.nii.gz", "21": "aggregated_MAJ_seg.nii.gz", "23": "segmentation.nii.gz"}[version]
    annotated = ("Right Kidney", "Left Kidney", "Kidney Tumor") + (() if version == "19" else ("Kidney Cyst",))
    ids = list(range(n_cases)) if version != "23" else list(range(n_cases - 1)) + [400]   # KiTS23: no 300-399
    cases = {}
    for i, cid in enumerate(ids):
        sc = Scene(i)
        kr = sc.put(1, ("Right Kidney",), "right")
        kl = sc.put(1, ("Left Kidney",), "left")
        sc.inner(kr, 2, ("Right Kidney", "Kidney Tumor"))
        if version != "19":
            sc.inner(kl, 3, ("Left Kidney", "Kidney Cyst"))
        folder = base / f"case_{cid:05d}"
        write_scene(folder / "imaging.nii.gz", folder / seg, sc.boxes, IPL, img_dtype=np.float32)
        cases[f"KiTS_{cid:05d}"] = FixtureCase(f"KiTS_{cid:05d}", sc.boxes, annotated=annotated)
        if version == "21":
            for extra in ("aggregated_AND_seg.nii.gz", "aggregated_OR_seg.nii.gz",
                          "segmentations/kidney_instance-1_annotation-1.nii.gz"):
                write_scene(None, folder / extra, sc.boxes[:1], IPL)
            (folder / "raw/kidney/0/final").mkdir(parents=True)
            (folder / "raw/kidney/0/final/20210101_ann1.json").write_text("{}")
        if version == "23":
            write_scene(None, folder / "instances/kidney_instance-1_annotation-1.nii.gz", sc.boxes[:1], IPL)
    skipped = []
    if version == "19":                                             # 210-299: test imaging without labels
        write_scene(base / "case_00210/imaging.nii.gz", None, Scene().boxes, IPL, img_dtype=np.float32)
        cases["KiTS_00210"] = FixtureCase("KiTS_00210", test=True)
        (base / "kits.json").write_text("[]")
    if version == "23":                                             # imaging not downloaded for this case
        write_scene(None, base / "case_00401/segmentation.nii.gz", Scene().boxes, IPL)
        (base / "kits23.json").write_text("[]")
        skipped.append("case_00401")
    return Fixture("kits", root, cases, skipped=skipped)


# ----------------------------------------------------------------------------------------------------------- MSD
MSD_TASKS = {  # folder, file stem, labelled ids, test id, {raw: expected classes}, label dtype, grid
    "03": ("Task03_Liver", "liver", ["0", "3"], "132", {1: ("Liver",), 2: ("Liver", "Liver Tumor")}, np.uint8, LPS),
    "06": ("Task06_Lung", "lung", ["001"], "002", {1: ("Lung Tumor",)}, np.uint8, RAS),
    "07": ("Task07_Pancreas", "pancreas", ["001"], "002", {1: ("Pancreas",), 2: ("Pancreas", "Pancreas Tumor")},
           np.uint8, LPS),
    "08": ("Task08_HepaticVessel", "hepaticvessel", ["001"], "002",
           {1: ("Hepatic Vessel",), 2: ("Hepatic Vessel Tumor",)}, np.uint8, LPS),
    "09": ("Task09_Spleen", "spleen", ["2"], "1", {1: ("Spleen",)}, np.uint8, LPS),
    "10": ("Task10_Colon", "colon", ["001"], "002", {1: ("Colon Tumor",)}, np.float32, RAS),
}
MSD_JSON = {"03": ["liver", "cancer"], "06": ["cancer"], "07": ["pancreas", "cancer"], "08": ["Vessel", "Tumour"],
            "09": ["spleen"], "10": ["colon cancer primaries"]}


def msd(root: Path) -> Fixture:
    """The six CT tasks (sparse ids, ._ junk, v1 dataset.json, float32 Task10 labels) and a non-CT task to skip."""
    cases = {}
    for task, (folder, stem, ids, test_id, expect, dtype, grid) in MSD_TASKS.items():
        base = root / folder
        for i, n in enumerate(ids):
            sc = Scene(i + int(task))
            for raw, classes in expect.items():
                host = sc.put(raw, classes, "right")
                if raw == 1 and 2 in expect and expect[2][0] == classes[0]:
                    sc.inner(host, 2, expect[2])                     # tumour inside its (annotated) organ
                    break
            write_scene(base / "imagesTr" / f"{stem}_{n}.nii.gz", base / "labelsTr" / f"{stem}_{n}.nii.gz",
                        sc.boxes, grid, lab_dtype=dtype)
            annotated = sorted({c for e in expect.values() for c in e})
            cases[f"MSD{task}_{stem}_{n}"] = FixtureCase(f"MSD{task}_{stem}_{n}", sc.boxes, annotated=tuple(annotated))
            for sub in ("imagesTr", "labelsTr"):
                write_junk(base / sub, f"{stem}_{n}.nii.gz")         # AppleDouble junk from the tars
        write_scene(base / "imagesTs" / f"{stem}_{test_id}.nii.gz", None, Scene().boxes, grid)
        cases[f"MSD{task}_{stem}_{test_id}"] = FixtureCase(f"MSD{task}_{stem}_{test_id}", test=True)
        write_junk(base, "imagesTr")
        (base / "dataset.json").write_text(json.dumps({
            "name": folder.split("_")[1], "modality": {"0": "CT"}, "relase": "1.0",
            "labels": {"0": "background", **{str(i + 1): n for i, n in enumerate(MSD_JSON[task])}},
            "numTraining": len(ids), "numTest": 1,
            "training": [{"image": f"./imagesTr/{stem}_{n}.nii.gz", "label": f"./labelsTr/{stem}_{n}.nii.gz"}
                         for n in ids], "test": [f"./imagesTs/{stem}_{test_id}.nii.gz"]}))
    (root / "Task01_BrainTumour").mkdir()
    (root / "Task01_BrainTumour/dataset.json").write_text("{}")
    return Fixture("msd", root, cases, skipped=["Task01_BrainTumour"])


WRITERS = {"btcv": organs.btcv, "chaos": organs.chaos, "pancreas_ct": organs.pancreas_ct, "ct_org": organs.ct_org,
           "word": organs.word, "amos": organs.amos, "totalsegmentator": totalsegmentator,
           "abdomenct1k": abdomenct1k, "lits": lits, "kits": kits, "msd": msd}
