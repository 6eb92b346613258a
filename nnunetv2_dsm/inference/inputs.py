"""What ``nnUNetv2_dsm_predict -i`` accepts, read, checked and brought to the model's training orientation.

``-i`` may be one image file of any name (``ct.nii.gz``), a folder of such files (one case each), a folder in
nnU-Net's convention (``<case>_0000.nii.gz``, one file per channel), a DICOM series folder, or a folder of DICOM
series folders. Every image is read with SimpleITK and reoriented to LPS — the axis order the converters write
(``dataset_conversion.readers.canonical``) and hence the one the model was trained in — by an exact permutation
and flip of the voxel array; :class:`Reorientation` undoes it on every output, which is then written with the
input's own grid (size, spacing, origin, direction), so a CT stored as RAS or with permuted axes gets the same
segmentation in world space as its LPS copy.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnunetv2_dsm.errors import UserError

TRAINING_ORIENTATION = "LPS"
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_NNUNET_NAME = re.compile(r"(.+)_(\d{4})$")


class InputError(UserError):
    """An input image or folder the predictor cannot use; the message names the file and the fix."""


@dataclass
class InputCase:
    """One case to predict: ``files`` holds one image per channel, or the slices of one DICOM series."""
    case_id: str
    files: List[str]
    dicom: bool = False

    @property
    def source(self) -> str:
        return os.path.dirname(self.files[0]) if self.dicom else self.files[0]


def image_stem(name: str) -> Optional[str]:
    """``ct.nii.gz`` → ``ct``; None for a name without a known image ending."""
    low = name.lower()
    return next((name[: -len(e)] for e in IMAGE_ENDINGS if low.endswith(e)), None)


def is_dicom_file(path: str) -> bool:
    """A ``.dcm`` file, or a file with DICOM's ``DICM`` marker at byte 128 (series often come without ending); not a
    ``DICOMDIR`` index."""
    if os.path.basename(path).upper() == "DICOMDIR":
        return False
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _visible(folder: str) -> List[str]:
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if not f.startswith(".")]


def _image_cases(images: List[str], n_channels: int) -> List[InputCase]:
    """Image files of one folder: nnU-Net's ``<case>_XXXX`` grouping when every name follows it, else one case per
    file (single-channel models)."""
    stems = [image_stem(os.path.basename(f)) for f in images]
    matches = [_NNUNET_NAME.fullmatch(s) for s in stems]
    if all(matches):
        cases: Dict[str, List[Tuple[int, str]]] = {}
        for m, f in zip(matches, images):
            cases.setdefault(m.group(1), []).append((int(m.group(2)), f))
        out = []
        for case, chans in cases.items():
            if sorted(c for c, _ in chans) != list(range(n_channels)):
                raise InputError(f"case {case} in {os.path.dirname(images[0])} has channel files "
                                 f"{[os.path.basename(f) for _, f in sorted(chans)]}; the model expects {n_channels} "
                                 f"channel(s): _0000 ... _{n_channels - 1:04d}")
            out.append(InputCase(case, [f for _, f in sorted(chans)]))
        return out
    if n_channels != 1:
        raise InputError(f"{os.path.dirname(images[0])}: the model takes {n_channels} channels per case; name the "
                         f"files <case>_0000 ... <case>_{n_channels - 1:04d} (nnU-Net's convention)")
    return [InputCase(s, [f]) for s, f in zip(stems, images)]


def find_cases(path: str, n_channels: int = 1) -> List[InputCase]:
    """The cases of ``-i``: an image file, a folder of images, a DICOM series folder or a folder of them."""
    if os.path.isfile(path):
        stem = image_stem(os.path.basename(path))
        if stem is None:
            if is_dicom_file(path):
                raise InputError(f"{path} is a single DICOM slice: give the folder that holds the whole series")
            raise InputError(f"{path} is not an image this predictor reads (endings {', '.join(IMAGE_ENDINGS)}, or "
                             f"a DICOM series folder)")
        m = _NNUNET_NAME.fullmatch(stem)
        return [InputCase(m.group(1) if m and n_channels == 1 else stem, [path])]
    if not os.path.isdir(path):
        raise InputError(f"input {path} does not exist")
    entries = _visible(path)
    images = [f for f in entries if os.path.isfile(f) and image_stem(os.path.basename(f))]
    if images:
        return _image_cases(images, n_channels)
    dicoms = [f for f in entries if os.path.isfile(f) and is_dicom_file(f)]
    if dicoms:
        return [InputCase(os.path.basename(os.path.normpath(path)), dicoms, dicom=True)]
    cases = []
    for sub in (f for f in entries if os.path.isdir(f)):
        files = [f for f in _visible(sub) if os.path.isfile(f) and is_dicom_file(f)]
        if files:
            cases.append(InputCase(os.path.basename(sub), files, dicom=True))
    if not cases:
        raise InputError(f"no images in {path}: expected NIfTI/NRRD/MHA files ({', '.join(IMAGE_ENDINGS)}), DICOM "
                         f"files, or folders of DICOM series")
    return cases


def select_part(cases: Sequence[InputCase], num_parts: int, part_id: int) -> List[InputCase]:
    """nnU-Net's ``-num_parts/-part_id`` split: every ``num_parts``-th case starting at ``part_id``."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise InputError(f"-part_id must lie in 0 ... {num_parts - 1} for -num_parts {num_parts}, got {part_id}")
    return list(cases[part_id::num_parts])


# ------------------------------------------------------------------------------------------------ reading, checks
@dataclass(frozen=True)
class Reorientation:
    """The exact permutation and flips between an image's voxel array (SimpleITK order z, y, x) and the array of its
    LPS copy (``sitk.DICOMOrient(img, "LPS")``): canonical axis k is input axis ``perm[k]``, reversed if ``flip[k]``.
    Works on the last three axes, so (C, z, y, x) probabilities go through unchanged in C."""
    perm: Tuple[int, int, int]
    flip: Tuple[bool, bool, bool]

    @classmethod
    def of(cls, img: sitk.Image) -> "Reorientation":
        """Read the permutation off DICOMOrient applied to a 2×3×4 probe with the image's direction."""
        shape = (2, 3, 4)
        probe = sitk.GetImageFromArray(np.arange(24, dtype=np.int16).reshape(shape))
        probe.SetDirection(img.GetDirection())
        canon = sitk.GetArrayFromImage(sitk.DICOMOrient(probe, TRAINING_ORIENTATION))
        perm = tuple(shape.index(n) for n in canon.shape)
        corner = np.unravel_index(int(canon[0, 0, 0]), shape)
        r = cls(perm, tuple(bool(corner[p]) for p in perm))
        assert np.array_equal(r.to_canonical(np.arange(24).reshape(shape)), canon), "reorientation probe mismatch"
        return r

    @property
    def identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    def to_canonical(self, arr: np.ndarray) -> np.ndarray:
        """(..., *input grid) → (..., *LPS grid), a view."""
        lead = arr.ndim - 3
        arr = arr.transpose(*range(lead), *[lead + p for p in self.perm])
        return np.flip(arr, [lead + k for k in range(3) if self.flip[k]]) if any(self.flip) else arr

    def to_input(self, arr: np.ndarray) -> np.ndarray:
        """(..., *LPS grid) → (..., *input grid): the inverse of :meth:`to_canonical`, as a contiguous array."""
        lead = arr.ndim - 3
        if any(self.flip):
            arr = np.flip(arr, [lead + k for k in range(3) if self.flip[k]])
        inverse = np.argsort(self.perm)
        return np.ascontiguousarray(arr.transpose(*range(lead), *[lead + int(i) for i in inverse]))


def check_image(img: sitk.Image, name: str) -> None:
    """A 3D single-component volume with more than one slice, else :class:`InputError` naming ``name``."""
    size = "×".join(map(str, img.GetSize()))
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name} has {img.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector "
                         f"image, {size}); give a grayscale CT volume")
    if img.GetDimension() == 2 or (img.GetDimension() == 3 and min(img.GetSize()) == 1):
        raise InputError(f"{name} is a 2D image ({size}) but the model is 3D: give the whole CT volume (all slices "
                         f"in one file, or the DICOM series folder)")
    if img.GetDimension() != 3:
        raise InputError(f"{name} is a {img.GetDimension()}D image ({size}); give one 3D CT volume per file (split "
                         f"the time/channel axis into separate files)")


def read_image(path: str) -> sitk.Image:
    """One image file, checked complete (truncated .nii.gz files read as zeros otherwise) and 3D."""
    from nnunetv2_dsm.dataset_conversion.readers import check_nifti_complete
    from nnunetv2_dsm.dataset_conversion.spec import CaseError
    try:
        check_nifti_complete(Path(path))
        img = sitk.ReadImage(str(path))
    except CaseError as e:
        raise InputError(str(e)) from None
    except RuntimeError as e:
        raise InputError(f"cannot read {path}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}") from None
    check_image(img, path)
    return img


def read_case(case: InputCase) -> List[sitk.Image]:
    """The case's channel images (a DICOM series is one channel), each 3D, all on one grid."""
    if case.dicom:
        from nnunetv2_dsm.dataset_conversion.readers import read_dicom_series
        from nnunetv2_dsm.dataset_conversion.spec import CaseError
        try:
            images = [read_dicom_series([Path(f) for f in case.files])[0]]
        except CaseError as e:
            raise InputError(str(e)) from None
        check_image(images[0], case.source)
    else:
        images = [read_image(f) for f in case.files]
    for f, img in zip(case.files[1:], images[1:]):
        if img.GetSize() != images[0].GetSize() or not np.allclose(img.GetSpacing(), images[0].GetSpacing()):
            raise InputError(f"{f} is not on the grid of {case.files[0]} (size {img.GetSize()} vs "
                             f"{images[0].GetSize()}); all channels of a case must share one grid")
    return images


def finite_array(img: sitk.Image, name: str) -> np.ndarray:
    """The voxel array (z, y, x) as float32; NaN/inf voxels (in the array or, for NIfTI, in the file) are replaced
    by the lowest finite value, with a warning on stderr saying how many there are."""
    arr = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)
    bad = ~np.isfinite(arr)
    from nnunetv2_dsm.dataset_conversion.readers import nonfinite_mask   # ITK's NIfTI reader turns NaN into 0
    in_file = nonfinite_mask(Path(name)) if os.path.isfile(name) else None
    if in_file is not None and in_file.shape == bad.shape:
        bad |= in_file
    n = int(bad.sum())
    if n:
        low = float(arr[~bad].min()) if n < arr.size else 0.0
        print(f"WARNING: {name}: {n} of {arr.size} voxels are NaN or infinite; they are set to {low:g} (the lowest "
              f"value of the image)", file=sys.stderr)
        arr = np.where(bad, np.float32(low), arr)
    return arr


def geometry(img: sitk.Image) -> Dict:
    """nnU-Net SimpleITKIO's ``sitk_stuff``: spacing, origin, direction in SimpleITK's (x, y, z) order."""
    return {"spacing": img.GetSpacing(), "origin": img.GetOrigin(), "direction": img.GetDirection()}


def load_case(case: InputCase) -> Tuple[np.ndarray, Dict]:
    """Read, check and reorient one case. Returns data (C, z, y, x) float32 on the LPS grid and nnU-Net properties:
    ``spacing`` (z, y, x) of the LPS grid (what preprocessing resamples from), ``sitk_stuff`` the input's own
    geometry (what outputs are written with) and ``dsm_reorientation`` (a :class:`Reorientation`)."""
    images = read_case(case)
    r = Reorientation.of(images[0])
    canon = sitk.DICOMOrient(images[0], TRAINING_ORIENTATION) if not r.identity else images[0]
    data = np.stack([r.to_canonical(finite_array(img, f)) for img, f in
                     zip(images, [case.source] if case.dicom else case.files)])
    return np.ascontiguousarray(data), {"spacing": list(canon.GetSpacing())[::-1], "sitk_stuff": geometry(images[0]),
                                        "dsm_reorientation": r, "dsm_source": case.source}
