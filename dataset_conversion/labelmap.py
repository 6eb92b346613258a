"""Apply a declarative label map: source ids -> DSM integer encoding, with the left/right split.

The output is built with lookup tables (memory O(volume), not 45 x volume): each source id maps to one
(organ, tumor) pair whose DSM integer is computed once with :func:`nnunetv2_dsm.labels.encode`. Ids mapped to a
lateral key ("Kidney", "Lung", ...) get the right- or left-side integer depending on where their voxels lie.

Left/right is decided in patient space (SimpleITK's LPS: the patient's right side has the *smaller* x), never by
array index: connected components (26-connectivity) of the lateral mask are assigned by their physical centroid
relative to a midline; a component that straddles the midline (lungs joined by the trachea) is cut at it. The
midline is halfway between the two largest components when they lie on opposite sides of the body, otherwise the
x of the body's centroid (voxels above -500 HU).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunetv2_dsm.labels import LATERAL_PAIRS, NUM_CLASSES, class_index, encode, label_meaning

from .spec import CaseError, Target, parse_label_map

STRADDLE_FRACTION = 0.2   # a component with more than this share of voxels on each side is cut at the midline


@lru_cache(maxsize=None)
def code_of(organ: Optional[str], tumor: Optional[str]) -> int:
    """DSM integer of a voxel that is ``organ`` (concrete side) and/or ``tumor``."""
    multi_hot = np.zeros((NUM_CLASSES, 1), dtype=bool)
    for name in (organ, tumor):
        if name:
            multi_hot[class_index(name) - 1, 0] = True
    return int(encode(multi_hot)[0])


def side_codes(target: Target) -> Tuple[int, int]:
    """(code if on the patient's right, code if on the left); equal for non-lateral targets."""
    if target.lateral:
        right, left = LATERAL_PAIRS[target.organ]
        return code_of(right, target.tumor), code_of(left, target.tumor)
    c = code_of(target.organ, target.tumor)
    return c, c


def apply_label_map(raw: np.ndarray, targets: Dict[int, Optional[Target]], image: sitk.Image, label_path: Path,
                    unknown: str = "error", notes=None) -> np.ndarray:
    """Source ids (z, y, x, on the image grid) -> DSM uint8 label map on the same grid.

    ``unknown="error"`` raises on ids the map does not know; ``"background"`` writes them as 0 with a warning.
    """
    counts = np.bincount(raw.ravel(), minlength=1) if raw.size else np.zeros(1, np.int64)
    present = [int(v) for v in np.flatnonzero(counts) if v != 0]
    bad = [v for v in present if v not in targets]
    if bad and unknown == "error":
        raise CaseError(f"{label_path} holds label values {bad} that the {len(targets)}-entry map of this source does "
                        f"not know (known: {sorted(targets)}). If the file belongs to this source, pass "
                        f"--unknown-labels background to write them as background, or add them to the source map.")
    if bad and notes is not None:
        notes.warn(f"{label_path}: unknown label values {bad} written as background")
    size = max(present + [0]) + 1
    lut_r, lut_l = np.zeros(size, np.uint8), np.zeros(size, np.uint8)
    lateral: Dict[str, List[int]] = {}
    for v in present:
        t = targets.get(v)
        if t is None:
            continue
        lut_r[v], lut_l[v] = side_codes(t)
        if t.lateral:
            lateral.setdefault(t.organ, []).append(v)
    out = lut_r[raw]
    body_x = _BodyMidline(image)
    for key, values in lateral.items():
        is_lat = np.zeros(size, bool)
        is_lat[values] = True
        left = left_side(is_lat[raw], image, body_x)
        out[left] = lut_l[raw[left]]
    return out


class _BodyMidline:
    """x (LPS, mm) of the body's centroid, computed on first use only."""

    def __init__(self, image: sitk.Image):
        self.image, self.value = image, None

    def __call__(self) -> float:
        if self.value is None:
            arr = sitk.GetArrayViewFromImage(self.image)
            step = max(1, int(np.ceil((arr.size / 2e6) ** (1 / 3))))   # a subsample is plenty for a centroid
            sub = arr[::step, ::step, ::step] > -500
            if not sub.any():
                sub = np.ones_like(sub)
            c = np.array(ndimage.center_of_mass(sub)) * step
            self.value = float(physical_x(self.image, c[None])[0])
        return self.value


def physical_x(image: sitk.Image, idx_zyx: np.ndarray) -> np.ndarray:
    """LPS x (mm) of (N, 3) continuous (z, y, x) indices."""
    d = np.asarray(image.GetDirection(), float).reshape(3, 3)
    g = d[0] * np.asarray(image.GetSpacing(), float)       # x per unit step along sitk index axes (x, y, z)
    return image.GetOrigin()[0] + np.asarray(idx_zyx, float)[:, ::-1] @ g


def left_side(mask: np.ndarray, image: sitk.Image, body_x=None) -> np.ndarray:
    """Bool array: True where a voxel of ``mask`` belongs to the patient's LEFT side (see module docstring)."""
    out = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return out
    sl = ndimage.find_objects(mask.astype(np.uint8))[0]
    sub = mask[sl]
    offset = np.array([s.start for s in sl])
    comps, n = ndimage.label(sub, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(comps.ravel())[1:]
    cents = np.array(ndimage.center_of_mass(sub, comps, range(1, n + 1))).reshape(n, 3) + offset
    cx = physical_x(image, cents)
    # x of every voxel of the crop, as a sum of per-axis terms (no per-voxel index arrays)
    d = np.asarray(image.GetDirection(), float).reshape(3, 3)
    g = d[0] * np.asarray(image.GetSpacing(), float)
    zz, yy, xx = (np.arange(s.start, s.stop, dtype=np.float32) for s in sl)
    vx = (np.float32(image.GetOrigin()[0]) + np.float32(g[2]) * zz[:, None, None] + np.float32(g[1]) * yy[None, :, None]
          + np.float32(g[0]) * xx[None, None, :])
    body = body_x if body_x is not None else _BodyMidline(image)
    midline = body() if callable(body) else float(body)
    if n >= 2:
        a, b = np.argsort(-sizes, kind="stable")[:2]
        if (cx[a] - midline) * (cx[b] - midline) < 0:
            midline = float(cx[a] + cx[b]) / 2
    on_left = vx > midline                                     # LPS: +x points to the patient's left
    left_count = np.bincount(comps[on_left & sub], minlength=n + 1)[1:]
    frac_left = left_count / sizes
    # per component: 0 right, 1 left, 2 cut at the midline
    decision = np.where((frac_left > STRADDLE_FRACTION) & (frac_left < 1 - STRADDLE_FRACTION), 2,
                        (cx > midline).astype(int))
    dec = np.concatenate([[0], decision])[comps]
    out[sl] = (dec == 1) | ((dec == 2) & on_left)
    return out


def classes_present(label_map: np.ndarray) -> List[str]:
    """DSM class names with at least one voxel in an encoded label map."""
    names = set()
    for v in np.flatnonzero(np.bincount(label_map.ravel(), minlength=1)):
        if v:
            names.update(n for n in label_meaning(int(v)) if n)
    return sorted(names, key=class_index)


def targets_by_id(label_map, where: str) -> Dict[int, Optional[Target]]:
    """A parsed label map whose keys must be integers (source label ids)."""
    parsed = parse_label_map(label_map, where)
    if not all(isinstance(k, (int, np.integer)) for k in parsed):
        raise ValueError(f"{where}: integer keys expected")
    return {int(k): v for k, v in parsed.items()}

