"""A synthetic abdominal CT phantom: organs as smooth blobs with CT-like intensities, tumors inside some organs.

No public CT ships with the package, so tests and the demo generate their data here. Each case is drawn from a
seeded random generator: a body ellipse with fat and muscle, lungs at the top, liver, spleen, kidneys, stomach,
pancreas, aorta, bladder placed in anatomically plausible positions (array axes are z, y, x = inferior→superior,
anterior→posterior, patient right→left: LPS with the identity direction SimpleITK writes), each deformed by low-frequency noise, plus optional
tumors inside their host organs with their own attenuation. The labels come out as the DSM 45-class multi-hot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from nnunetv2_dsm.io_utils import atomic_target
from nnunetv2_dsm.labels import NUM_CLASSES, TUMOR_HOSTS, class_index

# Mean attenuation (HU) of each structure; noise is added on top.
ORGAN_HU: Dict[str, float] = {
    "Liver": 60.0, "Spleen": 45.0, "Right Kidney": 160.0, "Left Kidney": 160.0, "Stomach": 15.0,
    "Pancreas": 35.0, "Aorta": 220.0, "Bladder": 5.0, "Right Lung": -820.0, "Left Lung": -820.0,
}
TUMOR_HU: Dict[str, float] = {"Liver Tumor": -5.0, "Kidney Tumor": 60.0, "Pancreas Tumor": -10.0,
                               "Spleen Tumor": 0.0, "Kidney Cyst": 5.0}

# Organ centre (fractions of z, y, x extent) and semi-axes (fractions of the extent).
_LAYOUT: Dict[str, Tuple[Tuple[float, float, float], Tuple[float, float, float]]] = {
    "Right Lung": ((0.86, 0.50, 0.30), (0.14, 0.24, 0.15)),
    "Left Lung": ((0.86, 0.50, 0.70), (0.14, 0.24, 0.15)),
    "Liver": ((0.62, 0.45, 0.32), (0.13, 0.22, 0.17)),
    "Spleen": ((0.64, 0.58, 0.76), (0.08, 0.10, 0.07)),
    "Stomach": ((0.62, 0.33, 0.62), (0.08, 0.10, 0.09)),
    "Right Kidney": ((0.45, 0.66, 0.30), (0.09, 0.07, 0.06)),
    "Left Kidney": ((0.46, 0.66, 0.70), (0.09, 0.07, 0.06)),
    "Pancreas": ((0.50, 0.48, 0.53), (0.05, 0.05, 0.13)),
    "Aorta": ((0.50, 0.62, 0.48), (0.36, 0.035, 0.035)),
    "Bladder": ((0.14, 0.38, 0.50), (0.07, 0.09, 0.10)),
}
PHANTOM_ORGANS: Tuple[str, ...] = tuple(_LAYOUT)


@dataclass
class PhantomCase:
    image: np.ndarray        # (z, y, x) int16 HU
    multi_hot: np.ndarray    # (45, z, y, x) bool, DSM class order
    spacing: Tuple[float, float, float]  # (z, y, x) mm


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (np.abs(field).max() + 1e-6)


def _blob(grid: np.ndarray, centre, axes, rng: np.random.Generator, wobble: float = 0.25) -> np.ndarray:
    """Ellipsoid in fractional coordinates, its surface deformed by smooth noise."""
    d = sum(((grid[i] - centre[i]) / axes[i]) ** 2 for i in range(3))
    return d < 1.0 + wobble * _smooth_noise(rng, d.shape, sigma=max(d.shape) / 8)


def make_case(shape: Sequence[int] = (48, 48, 48), spacing: Sequence[float] = (3.0, 3.0, 3.0), seed: int = 0,
              tumors: Sequence[str] = (), organs: Sequence[str] = PHANTOM_ORGANS,
              tumor_radius: Optional[float] = None, variation: float = 0.0) -> PhantomCase:
    """One phantom CT with ``organs`` and a tumor of each type in ``tumors`` inside (one of) its host organ(s).

    ``variation`` > 0 also varies the anatomy: each organ's semi-axes are scaled by a factor in
    [1 - variation, 1 + variation] per axis and its centre moved by up to ``variation / 5`` per axis, drawn from a
    second generator seeded by ``seed`` (so ``variation=0``, the default, gives exactly the same case as before)."""
    rng = np.random.default_rng(seed)
    anatomy = np.random.default_rng([int(seed), 1]) if variation > 0 else None
    shape = tuple(int(s) for s in shape)
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, s, dtype=np.float32) for s in shape], indexing="ij"))
    jitter = lambda c: tuple(ci + rng.uniform(-0.02, 0.02) for ci in c)  # noqa: E731

    image = np.full(shape, -1000.0, dtype=np.float32)  # air
    body = ((grid[1] - 0.5) / 0.46) ** 2 + ((grid[2] - 0.5) / 0.47) ** 2 < 1.0
    image[body] = -90.0  # fat
    muscle = body & ~(((grid[1] - 0.5) / 0.40) ** 2 + ((grid[2] - 0.5) / 0.42) ** 2 < 1.0)
    image[muscle] = 45.0
    multi_hot = np.zeros((NUM_CLASSES, *shape), dtype=bool)
    for name in organs:
        centre, axes = _LAYOUT[name]
        if anatomy is not None:
            axes = tuple(a * anatomy.uniform(1 - variation, 1 + variation) for a in axes)
            centre = tuple(c + anatomy.uniform(-variation / 5, variation / 5) for c in centre)
        mask = _blob(grid, jitter(centre), axes, rng) & body
        mask &= ~multi_hot[:25].any(0)  # organs do not overlap; earlier ones win
        image[mask] = ORGAN_HU[name]
        multi_hot[class_index(name) - 1] = mask
    for tumor in tumors:
        hosts = [h for h in TUMOR_HOSTS[tumor] if multi_hot[class_index(h) - 1].any()]
        if not hosts:
            raise ValueError(f"cannot place {tumor!r}: none of its hosts {TUMOR_HOSTS[tumor]} is in the phantom")
        host = multi_hot[class_index(hosts[rng.integers(len(hosts))]) - 1]
        inner = ndimage.binary_erosion(host, iterations=2)
        candidates = np.argwhere(inner if inner.any() else host)
        centre = candidates[rng.integers(len(candidates))] / (np.array(shape) - 1)
        host_radius = (3 * host.sum() / (4 * np.pi)) ** (1 / 3) / np.mean(shape)  # equivalent sphere, fraction
        r = tumor_radius if tumor_radius is not None else max(rng.uniform(0.4, 0.55) * host_radius,
                                                                 2.0 / np.mean(shape))
        mask = _blob(grid, centre, (r, r, r), rng, wobble=0.2) & host
        image[mask] = TUMOR_HU[tumor]
        multi_hot[class_index(tumor) - 1] |= mask
    image += 12.0 * rng.standard_normal(shape).astype(np.float32)
    image = ndimage.gaussian_filter(image, 0.6)
    return PhantomCase(np.clip(np.round(image), -1024, 3071).astype(np.int16), multi_hot,
                       tuple(float(s) for s in spacing))


def restrict_to_annotated(multi_hot: np.ndarray, annotated: Sequence[str]) -> np.ndarray:
    """What a source that annotates only ``annotated`` would have labelled: other channels cleared."""
    keep = np.zeros(NUM_CLASSES, dtype=bool)
    keep[[class_index(n) - 1 for n in annotated]] = True
    return multi_hot & keep.reshape(-1, *[1] * (multi_hot.ndim - 1))


def write_nifti(array_zyx: np.ndarray, spacing_zyx: Sequence[float], path: str) -> None:
    """Write a (z, y, x) array as NIfTI with SimpleITK (identity direction, origin 0), atomically."""
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    with atomic_target(path) as tmp:
        sitk.WriteImage(img, tmp, useCompression=True)


def write_raw_dataset(dataset_dir: str, cases: Sequence[dict], name: str = "DSMPhantom") -> None:
    """Write phantom cases as an nnU-Net raw dataset in the DSM label space with its manifest.

    Each case dict: ``case_id``, ``source``, ``annotated`` (class names), and the :func:`make_case` kwargs
    (``shape``, ``spacing``, ``seed``, ``tumors``); optional ``subset`` ('train' → imagesTr/labelsTr,
    otherwise imagesTs/labelsTs).
    """
    import json
    import os
    from nnunetv2_dsm.labels import dataset_json_labels, encode, regions_class_order
    from nnunetv2_dsm.manifest import MANIFEST_KEY, make_entry, make_manifest
    entries, n_train = {}, 0
    for spec in cases:
        subset = spec.get("subset", "train")
        folder = "Tr" if subset == "train" else "Ts"
        for sub in (f"images{folder}", f"labels{folder}"):
            os.makedirs(os.path.join(dataset_dir, sub), exist_ok=True)
        kw = {k: spec[k] for k in ("shape", "spacing", "seed", "tumors") if k in spec}
        case = make_case(**kw)
        labels = encode(restrict_to_annotated(case.multi_hot, spec["annotated"]))
        write_nifti(case.image, case.spacing, os.path.join(dataset_dir, f"images{folder}", f"{spec['case_id']}_0000.nii.gz"))
        write_nifti(labels, case.spacing, os.path.join(dataset_dir, f"labels{folder}", f"{spec['case_id']}.nii.gz"))
        entries[spec["case_id"]] = make_entry(spec["source"], spec["annotated"], subset=subset)
        n_train += subset == "train"
    dataset_json = {"channel_names": {"0": "CT"}, "labels": dataset_json_labels(),
                    "regions_class_order": regions_class_order(), "numTraining": n_train, "file_ending": ".nii.gz",
                    "name": name, "description": "synthetic abdominal CT phantom (nnunetv2_dsm.phantom)",
                    MANIFEST_KEY: make_manifest(entries)}
    with open(os.path.join(dataset_dir, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=1, sort_keys=False)
