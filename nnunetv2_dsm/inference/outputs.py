"""Outputs that describe themselves: what each label-map code means, clean per-class file names, per-class
statistics (TotalSegmentator's ``statistics.json`` shape) and a PNG preview per case.

The label map holds DSM's composite codes 0..71 (``nnunetv2_dsm.labels``): 1-25 are organs, 26-71 a tumor inside a
given host organ (or with no host), so one voxel can stand for two of the 45 classes. ``label_table`` says, per
code, which classes it stands for and its colour; it is written next to the label maps as JSON and as an ITK-SNAP
label description file (ITK-SNAP: Segmentation → Import Label Descriptions).
"""
from __future__ import annotations

import colorsys
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunetv2_dsm.labels import CLASS_NAMES, MAX_LABEL, NUM_CLASSES, NUM_ORGANS, label_meaning

LABEL_TABLE_JSON = "label_table.json"
LABEL_TABLE_ITKSNAP = "label_table_itksnap.txt"
STATISTICS_FOLDER = "statistics"
PREVIEW_FOLDER = "preview"

# File names (TotalSegmentator's spelling where it has the structure; the paper's typos fixed)
_CLEAN = {
    "Right Kidney": "kidney_right", "Left Kidney": "kidney_left", "Gall Bladder": "gallbladder",
    "Postcava": "inferior_vena_cava", "Portal Vein and Splenic Vein": "portal_vein_and_splenic_vein",
    "Right Adrenal Gland": "adrenal_gland_right", "Left Adrenal Gland": "adrenal_gland_left",
    "Right Lung": "lung_right", "Left Lung": "lung_left", "Intestine": "small_bowel", "Bladder": "urinary_bladder",
    "Left Head of Femur": "femur_head_left", "Right Head of Femur": "femur_head_right", "Celiac Truck": "celiac_trunk",
    "Postcava Tumor Thrombus": "inferior_vena_cava_tumor_thrombus",
}


def clean_name(index: int) -> str:
    """File-name spelling of class ``index`` (0-based): lower case, underscores, e.g. 24 → ``celiac_trunk``."""
    name = CLASS_NAMES[index]
    return _CLEAN.get(name) or "_".join(name.lower().split())


CLEAN_NAMES = tuple(clean_name(i) for i in range(NUM_CLASSES))


def class_from_text(text: str) -> int:
    """0-based class index of a display name ('Liver Tumor') or clean name ('liver_tumor'); UserError otherwise."""
    key = "_".join(text.strip().lower().replace("-", " ").split())
    for i in range(NUM_CLASSES):
        if key in (CLEAN_NAMES[i], "_".join(CLASS_NAMES[i].lower().split())):
            return i
    from nnunetv2_dsm.errors import UserError
    raise UserError(f"--roi_subset: unknown class {text!r}; the classes are: {', '.join(CLEAN_NAMES)}")


def class_colour(index: int) -> List[int]:
    """A fixed RGB colour per class (0-based): organs spread over the hue circle, tumors in saturated reds/yellows
    offset from them."""
    if index < NUM_ORGANS:
        h, s, v = (index * 0.618034) % 1.0, 0.55, 0.95
    else:
        h, s, v = ((index - NUM_ORGANS) * 0.137) % 0.25 - 0.05, 1.0, 1.0
    return [int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v)]


def label_table() -> Dict[str, Dict]:
    """Code (str) → {"name", "classes" (display names), "class_indices" (1-based, as in dataset.json), "files"
    (clean names), "color" [r, g, b]} for every code 0..MAX_LABEL; a tumor code takes the tumor's colour."""
    table = {"0": {"name": "background", "classes": [], "class_indices": [], "files": [], "color": [0, 0, 0]}}
    for code in range(1, MAX_LABEL + 1):
        organ, tumor = label_meaning(code)
        classes = [c for c in (organ, tumor) if c]
        idx = [CLASS_NAMES.index(c) for c in classes]
        name = organ if tumor is None else f"{tumor} in {organ}" if organ else f"{tumor} (host not segmented)"
        table[str(code)] = {"name": name, "classes": classes, "class_indices": [i + 1 for i in idx],
                            "files": [CLEAN_NAMES[i] for i in idx], "color": class_colour(idx[-1])}
    return table


def itksnap_label_description(table: Dict[str, Dict]) -> str:
    """The label table in ITK-SNAP's label description format (one line per code: index, RGB, alpha, visibility,
    mesh visibility, quoted name)."""
    lines = ["################################################", "# ITK-SnAP Label Description File",
             "# written by nnUNetv2_dsm_predict: DSM composite label codes",
             "# Columns: IDX -R- -G- -B- -A-- VIS MSH LABEL", "################################################"]
    for code, e in table.items():
        r, g, b = e["color"]
        vis = 0 if code == "0" else 1
        label = "Clear Label" if code == "0" else e["name"].replace('"', "'")
        lines.append(f"{int(code):5d} {r:5d} {g:4d} {b:4d} {float(vis):8g} {vis:2d} {vis:2d}    \"{label}\"")
    return "\n".join(lines) + "\n"


def write_label_tables(folder: str) -> None:
    """``label_table.json`` and ``label_table_itksnap.txt`` in ``folder`` (atomic writes)."""
    from nnunetv2_dsm.io_utils import atomic_write_text
    table = label_table()
    atomic_write_text(os.path.join(folder, LABEL_TABLE_JSON), json.dumps(
        {"description": "DSM composite label codes of the label maps in this folder: code -> the classes it stands "
                        "for (a tumor code also marks its host organ)", "labels": table}, indent=1))
    atomic_write_text(os.path.join(folder, LABEL_TABLE_ITKSNAP), itksnap_label_description(table))


def class_statistics(seg: np.ndarray, image: np.ndarray, spacing: Sequence[float],
                     classes: Optional[Sequence[int]] = None) -> Dict[str, Dict]:
    """Per class (0-based ``classes``, default all 45; a class counts every code that marks it, so an organ includes
    its tumors): {"volume" ml, "voxels", "intensity" mean, "intensity_std"} — intensities in the image's units
    (HU for CT), None where the class is empty. ``seg`` and ``image`` (*S) share one grid; ``spacing`` in mm."""
    codes = seg.ravel().astype(np.int64)
    img = image.ravel().astype(np.float64)
    n = np.bincount(codes, minlength=MAX_LABEL + 1)
    s1 = np.bincount(codes, weights=img, minlength=MAX_LABEL + 1)
    s2 = np.bincount(codes, weights=img * img, minlength=MAX_LABEL + 1)
    from nnunetv2_dsm.labels import region_values
    ml = float(np.prod(spacing)) / 1000.0
    out = {}
    for c in (range(NUM_CLASSES) if classes is None else classes):
        v = list(region_values(c + 1))
        k = int(n[v].sum())
        mean = float(s1[v].sum() / k) if k else None
        std = float(np.sqrt(max(s2[v].sum() / k - mean * mean, 0.0))) if k else None
        out[CLEAN_NAMES[c]] = {"volume": round(k * ml, 4), "voxels": k,
                               "intensity": None if mean is None else round(mean, 2),
                               "intensity_std": None if std is None else round(std, 2)}
    return out


def _panel(ct: np.ndarray, seg: np.ndarray, aspect: float, lut: np.ndarray, size: int = 256):
    """One 2D view: CT in an abdominal window (W 400, L 40) with the label colours blended at 50%."""
    from PIL import Image
    grey = np.clip((ct + 160.0) / 400.0, 0, 1)[..., None] * 255.0
    colour = lut[seg]
    rgb = np.where(seg[..., None] > 0, 0.5 * grey + 0.5 * colour, grey).astype(np.uint8)
    h, w = rgb.shape[:2]
    scale = size / max(h * aspect, w)
    return Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * aspect * scale))), Image.NEAREST)


def write_preview(path: str, ct_lps: np.ndarray, seg_lps: np.ndarray, spacing_lps: Sequence[float]) -> None:
    """A PNG with axial, coronal and sagittal slices through the centre of the segmented voxels (the volume's centre
    if none), radiological convention (patient's right on the image's left). Arrays (z, y, x) on the LPS grid;
    ``spacing_lps`` (z, y, x) mm."""
    from PIL import Image
    from nnunetv2_dsm.io_utils import atomic_target
    lut = np.array([e["color"] for e in label_table().values()], np.float32)
    fg = np.argwhere(seg_lps > 0)
    z, y, x = (fg.mean(0) if len(fg) else np.array(seg_lps.shape) / 2).astype(int)
    sz, sy, sx = spacing_lps
    views = [(ct_lps[z], seg_lps[z], sy / sx),                                    # axial: anterior up
             (ct_lps[::-1, y], seg_lps[::-1, y], sz / sx),                        # coronal: superior up
             (ct_lps[::-1, :, x], seg_lps[::-1, :, x], sz / sy)]                  # sagittal: superior up
    panels = [_panel(c, s, a, lut) for c, s, a in views]
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), max(p.height for p in panels)))
    offset = 0
    for p in panels:
        sheet.paste(p, (offset, 0))
        offset += p.width + 8
    with atomic_target(path) as tmp:
        sheet.save(tmp, format="PNG")
