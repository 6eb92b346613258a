"""TotalSegmentator v1 (104 classes) and v2 (117 classes), Zenodo 6802613: ``s0000/ct.nii.gz`` +
``s0000/segmentations/<class name>.nii.gz`` (one binary mask per class, all present, empty ones included).

The map below is keyed by mask *name*, so v1 and v2 (whose integer ids differ) share it; the version is detected
from the mask names (v1 has ``face``/``heart_myocardium``, v2 ``heart``/``sternum``/``kidney_cyst_left``). Lungs are
the union of the lobes (left = upper + lower left lobe; right = upper + middle + lower right lobe), each side by
its own name (no swap). Only mapped masks are read; where mapped masks overlap, the later one in the version's class
order wins (as TotalSegmentator's own converter combines them); unmapped masks (vertebrae, ribs, muscles, ...) never
erase a mapped one. Every mapped mask of the detected version must be present. Case ids ``TS_s0000``.
"""
from pathlib import Path
from typing import Dict, List

import numpy as np

from .. import readers
from ..spec import CaseError, CaseFiles, Notes, Source, walk_files

_VERT = [f"vertebrae_{v}" for v in ["L5", "L4", "L3", "L2", "L1"] + [f"T{i}" for i in range(12, 0, -1)]
         + [f"C{i}" for i in range(7, 0, -1)]]
_RIBS = [f"rib_{side}_{i}" for side in ("left", "right") for i in range(1, 13)]
_LOBES = ["lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
          "lung_lower_lobe_right"]
_MUSCLES = [f"{muscle}_{side}" for muscle in ("gluteus_maximus", "gluteus_medius", "gluteus_minimus")
            for side in ("left", "right")] \
    + ["autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right"]
_LIMBS = [f"{bone}_{side}" for bone in ("humerus", "scapula", "clavicula", "femur", "hip") for side in ("left", "right")]

# class_map["total"] (v2) and class_map["total_v1"] in TotalSegmentator's map_to_binary.py, in id order
V2_NAMES = (["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
             "adrenal_gland_right", "adrenal_gland_left"] + _LOBES
            + ["esophagus", "trachea", "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder",
               "prostate", "kidney_cyst_left", "kidney_cyst_right", "sacrum", "vertebrae_S1"] + _VERT
            + ["heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right",
               "subclavian_artery_left", "common_carotid_artery_right", "common_carotid_artery_left",
               "brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left",
               "superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein", "iliac_artery_left",
               "iliac_artery_right", "iliac_vena_left", "iliac_vena_right"] + _LIMBS + ["spinal_cord"] + _MUSCLES
            + ["brain", "skull"] + _RIBS + ["sternum", "costal_cartilages"])
V1_NAMES = (["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta", "inferior_vena_cava",
             "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right", "adrenal_gland_left"] + _LOBES + _VERT
            + ["esophagus", "trachea", "heart_myocardium", "heart_atrium_left", "heart_ventricle_left",
               "heart_atrium_right", "heart_ventricle_right", "pulmonary_artery", "brain", "iliac_artery_left",
               "iliac_artery_right", "iliac_vena_left", "iliac_vena_right", "small_bowel", "duodenum", "colon"] + _RIBS
            + _LIMBS + ["sacrum", "face"] + _MUSCLES + ["urinary_bladder"])
VERSIONS = {"v2": V2_NAMES, "v1": V1_NAMES}
assert len(V2_NAMES) == 117 == len(set(V2_NAMES)) and len(V1_NAMES) == 104 == len(set(V1_NAMES))

# mask name -> DSM classes; every other v1/v2 name has no DSM class (background, not annotated)
LABELS: Dict[str, object] = {
    "spleen": "Spleen", "kidney_right": "Right Kidney", "kidney_left": "Left Kidney", "gallbladder": "Gall Bladder",
    "liver": "Liver", "stomach": "Stomach", "pancreas": "Pancreas", "adrenal_gland_right": "Right Adrenal Gland",
    "adrenal_gland_left": "Left Adrenal Gland",
    "lung_upper_lobe_left": "Left Lung", "lung_lower_lobe_left": "Left Lung",
    "lung_upper_lobe_right": "Right Lung", "lung_middle_lobe_right": "Right Lung", "lung_lower_lobe_right": "Right Lung",
    "esophagus": "Esophagus", "small_bowel": "Intestine", "duodenum": "Duodenum", "colon": "Colon",
    "urinary_bladder": "Bladder", "prostate": "Prostate",
    "kidney_cyst_left": ("Left Kidney", "Kidney Cyst"), "kidney_cyst_right": ("Right Kidney", "Kidney Cyst"),
    "aorta": "Aorta", "inferior_vena_cava": "Postcava", "portal_vein_and_splenic_vein": "Portal Vein and Splenic Vein",
}
LABELS.update({n: None for n in set(V1_NAMES) | set(V2_NAMES) if n not in LABELS})
SUFFIX = ".nii.gz"


def detect_version(names, unknown_ok: bool = False) -> str:
    """'v1' or 'v2' from the set of mask names of one case (unknown names are an error unless ``unknown_ok``)."""
    names = set(names)
    unknown = names - set(LABELS)
    names -= unknown
    if unknown and not unknown_ok:
        raise CaseError(f"unknown TotalSegmentator mask names {sorted(unknown)[:5]}: neither v1 nor v2 has them. "
                        f"Remove the extra files, pass --unknown-labels background to ignore them, or extend "
                        f"sources/totalsegmentator.py.")
    only1, only2 = names - set(V2_NAMES), names - set(V1_NAMES)
    if only1 and only2:
        raise CaseError(f"the masks mix v1 names {sorted(only1)[:3]} and v2 names {sorted(only2)[:3]}; use one release.")
    if only1:
        return "v1"
    if only2:
        return "v2"
    raise CaseError("cannot tell TotalSegmentator v1 from v2: the folder holds only names common to both. "
                    "Unpack the complete segmentations/ folder.")


def find_cases(root: Path, notes: Notes) -> List[CaseFiles]:
    """The cases below ``root`` (see the module docstring); unusable files go to ``notes``."""
    cases = []
    for f in walk_files(root):
        if f.name != "ct.nii.gz" or not f.parent.name[:1] == "s" or not f.parent.name[1:].isdigit():
            continue
        seg = f.parent / "segmentations"
        masks = {p.name[:-len(SUFFIX)]: p for p in sorted(seg.glob("*" + SUFFIX)) if not p.name.startswith(".")} \
            if seg.is_dir() else {}
        if not masks:
            notes.skip(f, "image without segmentations/ folder: not converted")
            continue
        cases.append(CaseFiles(f"TS_{f.parent.name}", f, masks))
    return cases


def read_label(case: CaseFiles, image, ctx) -> np.ndarray:
    """The mapped masks combined into one id map (ids = order among the mapped masks of the detected version);
    sets the case's integer label map."""
    version = detect_version(case.label, unknown_ok=ctx.unknown == "background")
    extra = sorted(set(case.label) - set(LABELS))
    if extra:
        ctx.notes.warn(f"ignored unknown mask files {extra[:5]}")
    order = [n for n in VERSIONS[version] if LABELS[n] is not None]
    missing = [n for n in order if n not in case.label]
    if missing:
        seg = Path(next(iter(case.label.values()))).parent
        raise CaseError(f"{seg} lacks {len(missing)} masks of TotalSegmentator {version}, e.g. {missing[0]}{SUFFIX}; "
                        f"every release ships all of them. Unpack the case again.")
    case.label_map = {i + 1: LABELS[n] for i, n in enumerate(order)}
    raw = np.zeros(image.GetSize()[::-1], np.uint8)
    for i, n in enumerate(order):
        path = Path(case.label[n])
        label = readers.align_label(readers.read_label_file(path), image, "same", path, ctx.image_name)
        if np.issubdtype(label.dtype, np.floating):
            label = readers.to_int_labels(label, path)
        top = label.max() if label.size else 0
        if top == 0:
            continue
        if top > 1 or label.min() < 0:
            raise CaseError(f"{path} holds values other than 0/1 (max {top}); a TotalSegmentator mask is binary. "
                            f"Is a multi-label file in segmentations/?")
        np.copyto(raw, np.uint8(i + 1), where=label.astype(bool, copy=False))
    return raw


SOURCE = Source(
    name="totalsegmentator", title="TotalSegmentator", labels=LABELS, find_cases=find_cases, read_label=read_label,
    looks_like=lambda root: any(f.parent.name == "segmentations" and f.name == "liver.nii.gz"
                                for _, f in zip(range(50000), walk_files(root))),
    expected_layout="s0000/ct.nii.gz + s0000/segmentations/<class name>.nii.gz",
    reference="Wasserthal et al., TotalSegmentator, Radiology: AI 2023 (Zenodo 6802613)",
    licence="CC BY 4.0",
)
