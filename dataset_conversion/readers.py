"""Reading images and labels as distributed, and putting a label on its image's grid.

Everything returns SimpleITK images (LPS physical space) or numpy arrays in SimpleITK's (z, y, x) order on the
image grid. Read failures become :class:`~.spec.CaseError` naming the file and the fix.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import List, Sequence, Tuple

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from .spec import CaseError, CaseFiles

READ_FIX = ("The file is corrupt or truncated (an interrupted download or unpack?): extract it again from the "
            "original archive and re-run; finished cases are not redone.")


def check_nifti_complete(path: Path, fix: str = READ_FIX) -> None:
    """Raise :class:`CaseError` if a NIfTI file is truncated or its gzip stream is corrupt.

    SimpleITK reads a truncated ``.nii.gz`` without complaint (the missing part comes back as zeros), so the data
    size the header promises is checked: against the file size for ``.nii``; for ``.nii.gz`` against the gzip
    trailer (ISIZE, no decompression), and only if that disagrees (e.g. a multi-member gzip) by decompressing.
    """
    name = str(path).lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    try:
        img = nib.load(str(path))
        hdr = img.header    # dataobj.offset: where the data really start (ITK writes vox_offset 0, data at 352)
        expected = int(img.dataobj.offset) + int(np.prod(hdr.get_data_shape())) * hdr.get_data_dtype().itemsize
    except Exception as e:  # nibabel raises several kinds for a damaged header
        raise CaseError(f"cannot read the NIfTI header of {path}: {e}. {fix}") from None
    if not name.endswith(".gz"):
        if path.stat().st_size < expected:
            raise CaseError(f"{path} is truncated ({path.stat().st_size} of {expected} bytes). {fix}")
        return
    with open(path, "rb") as f:
        f.seek(-4, 2)
        if int.from_bytes(f.read(4), "little") == expected % 2 ** 32:
            return
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise CaseError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}). {fix}") from None
    if total < expected:
        raise CaseError(f"{path} is truncated ({total} of {expected} bytes after decompression). {fix}")


def read_file(path: Path) -> sitk.Image:
    """Read one image file (NIfTI, ...) with SimpleITK; a 3D single-channel image is required. Truncated or
    corrupt files are an error naming the file (see :func:`check_nifti_complete`)."""
    check_nifti_complete(Path(path))
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise CaseError(f"cannot read {path}: {reason}. {READ_FIX}") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(f"{path} is not a 3D single-channel image (dimension {img.GetDimension()}, "
                        f"{img.GetNumberOfComponentsPerPixel()} components); DSM converts 3D CT only.")
    return img


def count_nonfinite(path: Path) -> int:
    """Number of NaN/Inf values *stored* in a float NIfTI file (0 for integer files and other formats), counted
    while streaming the data, so memory stays small. Needed because SimpleITK's NIfTI reader returns 0 for them."""
    name = str(path).lower()
    if not name.endswith((".nii", ".nii.gz")):
        return 0
    img = nib.load(str(path))
    dtype = img.header.get_data_dtype()
    if dtype.kind not in "fc":
        return 0                                     # integers cannot hold NaN
    left = int(np.prod(img.header.get_data_shape())) * dtype.itemsize
    step = dtype.itemsize * (1 << 22)
    n = 0
    with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
        f.seek(int(img.dataobj.offset))
        while left > 0:
            buf = f.read(min(step, left))
            if not buf:
                break
            n += int(np.count_nonzero(~np.isfinite(np.frombuffer(buf[:len(buf) - len(buf) % dtype.itemsize],
                                                                 dtype))))
            left -= len(buf)
    return n


def nonfinite_mask(path: Path):
    """(z, y, x) bool mask of the NaN/Inf voxels stored in a float NIfTI file, or None when it has none; the whole
    array is loaded only when :func:`count_nonfinite` found some."""
    if not count_nonfinite(path):
        return None
    bad = ~np.isfinite(np.asanyarray(nib.load(str(path)).dataobj))
    return np.ascontiguousarray(bad.reshape(bad.shape[:3]).transpose(2, 1, 0)) if bad.ndim >= 3 else bad


def check_finite(path: Path, what: str = "label") -> None:
    """Raise :class:`CaseError` if the file stores NaN or infinite values (counted), e.g. a label or an anomaly
    map: they would be read as 0 without a word (see :func:`nonfinite_mask`)."""
    n = count_nonfinite(Path(path))
    if n:
        raise CaseError(f"{path} holds {n} NaN or infinite values; a {what} must be finite. Re-export it.")


REWRITE_FIX = "Write the file again (re-run the command that made it)."


def check_complete_and_finite(path: Path, what: str = "label or score map") -> None:
    """Raise :class:`CaseError` if a NIfTI file is truncated/corrupt or stores NaN/Inf (for readers outside the
    converter, e.g. nnUNetv2_dsm_evaluate)."""
    check_nifti_complete(Path(path), REWRITE_FIX)
    try:
        check_finite(Path(path), what)
    except CaseError:
        raise
    except Exception as e:  # nibabel raises several kinds for a file it cannot parse
        raise CaseError(f"cannot read {path}: {e}. {REWRITE_FIX}") from None


def read_label_file(path: Path) -> sitk.Image:
    """:func:`read_file` for a label: NaN/Inf values are an error, not background."""
    img = read_file(path)                            # completeness first: nibabel must not meet a truncated file
    check_finite(Path(path), "label")
    return img


def check_not_label_map(image: sitk.Image, path: Path) -> None:
    """Raise :class:`CaseError` if the 'CT' looks like a label map: 8-bit, or a few small non-negative integers
    (a CT in HU has air at about -1000 and hundreds of distinct values)."""
    if image.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8):
        raise CaseError(f"{path} is an 8-bit image: that is a label map or a screenshot, not a CT in HU. Check "
                        f"which file is the image and which the label.")
    arr = sitk.GetArrayViewFromImage(image)
    if arr.size and np.issubdtype(arr.dtype, np.integer) and arr.min() >= 0 and arr.max() < 64:
        raise CaseError(f"{path} holds only the values {np.unique(arr)[:8].tolist()}...: that is a label map, not a "
                        f"CT in HU. Check which file is the image and which the label.")


def read_nifti(case: CaseFiles) -> sitk.Image:
    """Default image reader: the case's single image file."""
    return read_file(Path(case.image))


def read_nifti_label(case: CaseFiles, image: sitk.Image, ctx) -> np.ndarray:
    """Default label reader: the case's single label file, aligned to the image grid, as integers."""
    lab = read_label_file(Path(case.label))
    return to_int_labels(align_label(lab, image, ctx.label_grid, Path(case.label), ctx.image_name), Path(case.label))


# ---------------------------------------------------------------------------------------------------------------
# DICOM

def dicom_positions(files: Sequence[Path]) -> Tuple[np.ndarray, List[str], Tuple[int, int]]:
    """Slice positions along the slice normal, SeriesInstanceUIDs and (rows, columns) from the headers."""
    import pydicom  # lazy: only the DICOM sources (CHAOS, Pancreas-CT) need it
    pos, series, shapes = [], [], set()
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True, force=True)
            iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
            ipp = np.asarray(ds.ImagePositionPatient, dtype=float)
            shapes.add((int(ds.Rows), int(ds.Columns)))
        except Exception as e:  # pydicom raises many kinds
            raise CaseError(f"cannot read the DICOM header of {f}: {type(e).__name__}: {e}. {READ_FIX}") from None
        pos.append(float(np.dot(ipp, np.cross(iop[:3], iop[3:]))))
        series.append(str(getattr(ds, "SeriesInstanceUID", "")))
    if len(shapes) != 1:
        raise CaseError(f"the DICOM files of {Path(files[0]).parent} have different slice sizes {sorted(shapes)}; "
                        f"keep one series per folder.")
    return np.asarray(pos), series, shapes.pop()


def read_dicom_series(files: Sequence[Path]) -> Tuple[sitk.Image, np.ndarray]:
    """Read DICOM slices as one volume sorted by position along the slice normal.

    Returns the image and the permutation ``order`` such that volume slice ``i`` is ``files[order[i]]``, so a
    caller holding per-file masks (CHAOS) can stack them the same way.
    """
    files = [Path(f) for f in files]
    if len(files) < 2:
        raise CaseError(f"{Path(files[0]).parent if files else 'a DICOM folder'} holds fewer than 2 slices; a CT "
                        f"series needs at least 2.")
    pos, series, _ = dicom_positions(files)
    if len(set(series)) > 1:
        raise CaseError(f"{files[0].parent} mixes {len(set(series))} DICOM series; keep only the CT series of "
                        f"this case in the folder.")
    order = np.argsort(pos, kind="stable")
    steps = np.diff(pos[order])
    if (steps <= 1e-3).any():
        raise CaseError(f"{files[0].parent}: two DICOM files share a slice position; remove the duplicate slice.")
    if steps.max() - steps.min() > 0.01 * steps.mean() + 1e-3:
        raise CaseError(f"{files[0].parent}: slice spacing varies from {steps.min():.3f} to {steps.max():.3f} mm "
                        f"(a missing slice?); re-download the series.")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(files[i]) for i in order])
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise CaseError(f"cannot read the DICOM series in {files[0].parent}: {str(e).strip().splitlines()[-1]}. "
                        f"{READ_FIX}") from None
    return compact_integer_image(img), order


def compact_integer_image(img: sitk.Image) -> sitk.Image:
    """Cast an integer-valued CT image to int16 when its range fits (DICOM rescale gives int32/float)."""
    if img.GetPixelID() == sitk.sitkInt16:
        return img
    arr = sitk.GetArrayViewFromImage(img)
    if arr.size and arr.min() >= -32768 and arr.max() <= 32767 and (
            np.issubdtype(arr.dtype, np.integer) or np.array_equal(arr, np.rint(arr))):
        return sitk.Cast(img, sitk.sitkInt16)
    return img


def read_png_mask(path: Path) -> np.ndarray:
    """A per-slice PNG mask as bool (nonzero = foreground; 1-bit, 8-bit and 16-bit PNGs alike)."""
    from PIL import Image  # lazy: only CHAOS's PNG masks need Pillow
    try:
        with Image.open(path) as im:
            if im.mode not in ("1", "L", "I", "I;16", "I;16B", "I;16L"):
                im = im.convert("L")
            return np.asarray(im) != 0
    except (OSError, SyntaxError, ValueError) as e:
        raise CaseError(f"cannot read the mask {path}: {e}. {READ_FIX}") from None


# ---------------------------------------------------------------------------------------------------------------
# geometry

def geometry(img: sitk.Image) -> str:
    """Human-readable grid description for messages."""
    return (f"size {img.GetSize()}, spacing {tuple(round(s, 4) for s in img.GetSpacing())}, origin "
            f"{tuple(round(o, 3) for o in img.GetOrigin())}, direction {tuple(round(d, 3) for d in img.GetDirection())}")


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Same size, spacing, origin and direction (up to header rounding)."""
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-4, atol=1e-4)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4))


def _index_affine(img: sitk.Image) -> Tuple[np.ndarray, np.ndarray]:
    d = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    return d @ np.diag(img.GetSpacing()), np.asarray(img.GetOrigin(), dtype=float)


def exact_permutation(label: sitk.Image, image: sitk.Image):
    """If every image voxel centre is a label voxel centre and vice versa (same grid stored in another axis order
    or flipped), return ``(perm, flip)`` such that the label index along label axis j is image index along axis
    ``perm[j]`` (reversed if ``flip[j]``). Otherwise None."""
    a_l, o_l = _index_affine(label)
    a_i, o_i = _index_affine(image)
    index_map = np.linalg.solve(a_l, a_i)          # image index -> label index (a signed permutation if exact)
    c = np.linalg.solve(a_l, o_i - o_l)
    rounded = np.rint(index_map)
    one_per_axis = sorted(np.abs(rounded).sum(0)) == [1, 1, 1] and sorted(np.abs(rounded).sum(1)) == [1, 1, 1]
    if not np.allclose(index_map, rounded, atol=1e-3) or not one_per_axis:
        return None
    perm = [int(np.argmax(np.abs(rounded[j]))) for j in range(3)]
    flip = [bool(rounded[j, perm[j]] < 0) for j in range(3)]
    size_l, size_i = label.GetSize(), image.GetSize()
    for j in range(3):
        want = size_l[j] - 1 if flip[j] else 0
        if size_l[j] != size_i[perm[j]] or abs(c[j] - want) > 1e-2:
            return None
    return perm, flip


def apply_permutation(arr_zyx: np.ndarray, perm, flip) -> np.ndarray:
    """Label array (z, y, x) -> image array (z, y, x) for a :func:`exact_permutation` result."""
    xyz = arr_zyx.transpose(2, 1, 0)
    for j in range(3):
        if flip[j]:
            xyz = np.flip(xyz, axis=j)
    out = xyz.transpose(np.argsort(perm))
    return np.ascontiguousarray(out.transpose(2, 1, 0))


def align_label(label: sitk.Image, image: sitk.Image, mode: str, label_path: Path, image_name: str) -> np.ndarray:
    """The label's values on the image grid, as a (z, y, x) array.

    ``mode="same"``: the label must share the image grid, possibly stored in another axis order or flipped
    (then it is permuted exactly). ``mode="physical"``: anything else is resampled into the image's physical space
    with nearest neighbour, and the label must land inside the image. Arrays are never paired by index alone.
    """
    if same_grid(label, image):
        return sitk.GetArrayFromImage(label)
    pf = exact_permutation(label, image)
    if pf is not None:
        return apply_permutation(sitk.GetArrayViewFromImage(label), *pf)
    if mode != "physical":
        raise CaseError(f"geometry mismatch: the label {label_path} ({geometry(label)}) does not lie on the grid of "
                        f"its image {image_name} ({geometry(image)}). Check that the two files belong to the same "
                        f"case and that neither was resampled; fix or remove the pair and re-run.")
    before = sitk.GetArrayViewFromImage(label)
    n_before = int(np.count_nonzero(before))
    out = sitk.GetArrayFromImage(sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                               label.GetPixelID()))
    if n_before:
        vol = lambda im: float(np.prod(im.GetSpacing()))  # noqa: E731
        kept = np.count_nonzero(out) * vol(image) / (n_before * vol(label))
        if kept < 0.9:
            raise CaseError(f"the label {label_path} ({geometry(label)}) lies largely outside its image {image_name} "
                            f"({geometry(image)}): only {kept:.0%} of its foreground lands in the image. Check that "
                            f"the label belongs to this image.")
    return out


def to_int_labels(arr: np.ndarray, path: Path) -> np.ndarray:
    """Integer label array (uint8/uint16/int32); float labels must hold whole numbers."""
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise CaseError(f"{path} holds NaN or infinite label values; re-export the label.")
        r = np.rint(arr)
        bad = np.abs(arr - r) > 1e-3
        if bad.any():
            ex = np.unique(arr[bad])[:3].tolist()
            raise CaseError(f"{path} holds non-integer label values (e.g. {ex}): it was probably resampled with "
                            f"linear interpolation. Use the label as distributed, or re-export it with "
                            f"nearest-neighbour interpolation.")
        arr = r
    elif arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.size and arr.min() < 0:
        raise CaseError(f"{path} holds negative label values (e.g. {int(arr.min())}), which no source map knows.")
    top = int(arr.max()) if arr.size else 0
    dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32
    return arr.astype(dtype, copy=False)


def canonical(img: sitk.Image) -> sitk.Image:
    """Reorient to the closest LPS axis order (SimpleITK identity direction): an exact permutation/flip."""
    return sitk.DICOMOrient(img, "LPS")


def is_canonical(img: sitk.Image) -> bool:
    """True if the axes already run along +x, +y, +z (LPS): :func:`canonical` would change nothing."""
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    return bool((np.argmax(np.abs(d), axis=0) == np.arange(3)).all() and (np.diag(d) > 0).all())
