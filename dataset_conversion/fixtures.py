"""Miniature copies of each source's distributed layout, with known label content.

The content of a case is a *scene* in patient space (LPS millimetres): boxes, each with the source label id (or
mask name) it is stored under and the DSM classes its voxels must come out as. Each source's writer
(:mod:`.fixture_sources`) rasterises the scene onto the grid *the source uses* (slice-first I,P,L for KiTS, RAS
for TotalSegmentator, a y-flipped label for Pancreas-CT, DICOM name order opposite to z for CHAOS, ...) in the
source's dtypes and file formats. The expected output is the same scene rasterised onto whatever grid the
converter wrote, so the check is voxel by voxel and independent of how the converter reorients.

Boxes are aligned to the voxel boundaries of every fixture grid (x, y multiples of 4 mm, z of 5 mm), so no voxel
centre lies on a box face. The body is an ellipse symmetric about x = 0: the patient's midline.

Public entry point: :func:`write_fixture` (``source`` = a SOURCE name; returns a :class:`Fixture`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from nnunetv2_dsm.labels import NUM_CLASSES, class_index, encode

EXTENT = ((-48.0, 48.0), (-40.0, 40.0), (0.0, 60.0))     # LPS mm, per physical axis
SPACING = (4.0, 4.0, 5.0)                                # mm, per physical axis
BODY_RADII = (44.0, 34.0)
BODY_HU, AIR_HU = 40.0, -1000.0


@dataclass
class Box:
    """An axis-aligned box in patient space with its stored label and its expected DSM classes."""
    raw: Union[int, str]              # label id in the source's file, or mask name (TotalSegmentator)
    lo: Tuple[float, float, float]    # LPS mm
    hi: Tuple[float, float, float]
    expect: Tuple[str, ...] = ()      # DSM classes of its voxels; () = background
    hu: float = 80.0


@dataclass
class FixtureCase:
    """One expected output case: its scene, whether it is an unlabelled test image, its annotated classes."""
    case_id: str
    boxes: List[Box] = field(default_factory=list)
    test: bool = False
    annotated: Tuple[str, ...] = ()

    def expected_label(self, ref: sitk.Image) -> np.ndarray:
        """The DSM-encoded label this case must have on the grid of ``ref`` ((z, y, x) uint8)."""
        pts = voxel_centres(ref)
        out = np.zeros(ref.GetSize()[::-1], np.uint8)
        for b in self.boxes:
            out[inside(pts, b)] = code(b.expect)
        return out

    def expected_image(self, ref: sitk.Image) -> np.ndarray:
        """The HU values this case's image must have on the grid of ``ref``."""
        return scene_image(self.boxes, voxel_centres(ref))


@dataclass
class Fixture:
    """A written miniature layout: INPUT_DIR, the expected output cases, the files that must be reported skipped."""
    source: str
    root: Path                                   # INPUT_DIR
    cases: Dict[str, FixtureCase]
    skipped: List[str] = field(default_factory=list)   # file names that must appear among the documented skips

    @property
    def train(self) -> List[str]:
        return sorted(k for k, c in self.cases.items() if not c.test)

    @property
    def test(self) -> List[str]:
        return sorted(k for k, c in self.cases.items() if c.test)


def code(classes: Sequence[str]) -> int:
    """DSM integer of a voxel carrying ``classes`` (via :func:`nnunetv2_dsm.labels.encode`)."""
    multi_hot = np.zeros((NUM_CLASSES, 1), bool)
    for name in classes:
        multi_hot[class_index(name) - 1, 0] = True
    return int(encode(multi_hot)[0])


# ---------------------------------------------------------------------------------------------------------------
# grids

@dataclass(frozen=True)
class Grid:
    """An image grid covering ``extent``: index axis m runs along physical axis ``axes[m][0]`` with sign
    ``axes[m][1]`` (SimpleITK/LPS convention)."""
    axes: Tuple[Tuple[int, int], ...] = ((0, 1), (1, 1), (2, 1))
    extent: Tuple[Tuple[float, float], ...] = EXTENT
    spacing: Tuple[float, float, float] = SPACING

    @property
    def size(self) -> Tuple[int, int, int]:
        return tuple(int(round((self.extent[a][1] - self.extent[a][0]) / self.spacing[a])) for a, _ in self.axes)

    @property
    def index_spacing(self) -> Tuple[float, float, float]:
        return tuple(self.spacing[a] for a, _ in self.axes)

    @property
    def direction(self) -> np.ndarray:
        matrix = np.zeros((3, 3))
        for column, (axis, sign) in enumerate(self.axes):
            matrix[axis, column] = sign
        return matrix

    @property
    def origin(self) -> np.ndarray:
        o = np.zeros(3)
        for a, s in self.axes:
            lo, hi = self.extent[a]
            o[a] = lo + self.spacing[a] / 2 if s > 0 else hi - self.spacing[a] / 2
        return o

    def reference(self) -> sitk.Image:
        img = sitk.Image(list(self.size), sitk.sitkUInt8)
        img.SetSpacing(self.index_spacing)
        img.SetOrigin(self.origin.tolist())
        img.SetDirection(self.direction.ravel().tolist())
        return img

    def nifti_affine(self) -> np.ndarray:
        """The NIfTI (RAS) affine of this grid."""
        a = np.eye(4)
        flip = np.diag([-1.0, -1.0, 1.0])
        a[:3, :3] = flip @ self.direction @ np.diag(self.index_spacing)
        a[:3, 3] = flip @ self.origin
        return a


LPS = Grid()
RAS = Grid(axes=((0, -1), (1, -1), (2, 1)))
LAS = Grid(axes=((0, 1), (1, -1), (2, 1)))                 # y flipped
RPS = Grid(axes=((0, -1), (1, 1), (2, 1)))                 # x flipped only
IPL = Grid(axes=((2, -1), (1, 1), (0, 1)))                 # KiTS: slice-first, affine [[0,0,-s],[0,-s,0],[-s,0,0]]


def voxel_centres(ref: sitk.Image) -> np.ndarray:
    """LPS coordinates (3, z, y, x) of every voxel centre of ``ref``."""
    size = ref.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in size], indexing="ij"))   # (3, x, y, z)
    d = np.asarray(ref.GetDirection()).reshape(3, 3) @ np.diag(ref.GetSpacing())
    pts = np.tensordot(d, idx, axes=1) + np.asarray(ref.GetOrigin())[:, None, None, None]
    return pts.transpose(0, 3, 2, 1)


def inside(pts: np.ndarray, b: Box) -> np.ndarray:
    """Bool (z, y, x): voxel centres strictly inside the box."""
    return np.all([(pts[a] > b.lo[a]) & (pts[a] < b.hi[a]) for a in range(3)], axis=0)


def scene_image(boxes: Sequence[Box], pts: np.ndarray) -> np.ndarray:
    """HU of the scene at the given voxel centres: air, an elliptic body symmetric about x = 0, the boxes."""
    body = (pts[0] / BODY_RADII[0]) ** 2 + (pts[1] / BODY_RADII[1]) ** 2 <= 1
    img = np.where(body, BODY_HU, AIR_HU)
    for b in boxes:
        img[inside(pts, b)] = b.hu
    return img


def raw_label(boxes: Sequence[Box], pts: np.ndarray, ids: Optional[Dict] = None) -> np.ndarray:
    """The label as the source stores it (later boxes overwrite earlier ones)."""
    out = np.zeros(pts.shape[1:], np.int32)
    for b in boxes:
        out[inside(pts, b)] = ids[b.raw] if ids else b.raw
    return out


# ---------------------------------------------------------------------------------------------------------------
# file writers

def write_nifti(path: Path, arr_zyx: np.ndarray, grid: Grid, dtype) -> None:
    """Write with nibabel (as the datasets were made), array in the grid's index order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(arr_zyx).transpose(2, 1, 0).astype(dtype), grid.nifti_affine())
    img.set_qform(grid.nifti_affine(), code=1)
    img.set_sform(grid.nifti_affine(), code=1)
    nib.save(img, str(path))


def write_scene(img_path: Optional[Path], lab_path: Optional[Path], boxes: Sequence[Box], grid: Grid,
                img_dtype=np.int16, lab_dtype=np.uint8, lab_grid: Optional[Grid] = None, ids=None) -> None:
    """Image and/or label NIfTI of a scene (the label optionally on another grid)."""
    if img_path is not None:
        write_nifti(img_path, scene_image(boxes, voxel_centres(grid.reference())), grid, img_dtype)
    if lab_path is not None:
        g = lab_grid or grid
        write_nifti(lab_path, raw_label(boxes, voxel_centres(g.reference()), ids), g, lab_dtype)


def write_dicom_series(folder: Path, names: Sequence[str], boxes: Sequence[Box], grid: Grid, intercept: float,
                       instance_numbers: Optional[Sequence[int]] = None) -> None:
    """One uncompressed DICOM file per slice (index axis 2 of an axial ``grid``), stored uint16 with
    RescaleIntercept ``intercept``. ``names[k]`` is the file name of slice k."""
    import pydicom  # lazy: optional, only the DICOM fixtures (CHAOS, Pancreas-CT) need it
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian, generate_uid
    folder.mkdir(parents=True, exist_ok=True)
    ref = grid.reference()
    hu = scene_image(boxes, voxel_centres(ref))                      # (z, y, x)
    d = grid.direction
    study, series = generate_uid(), generate_uid()
    sx, sy, _ = grid.index_spacing
    for k, name in enumerate(names):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = CTImageStorage, sop, study, series
        ds.Modality, ds.PatientID, ds.Manufacturer = "CT", "", ""
        ds.ImagePositionPatient = [float(v) for v in ref.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [float(v) for v in np.concatenate([d[:, 0], d[:, 1]])]
        ds.PixelSpacing = [sy, sx]
        ds.SliceThickness = grid.index_spacing[2]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = intercept, 1
        ds.InstanceNumber = instance_numbers[k] if instance_numbers else k + 1
        ds.PixelData = np.rint(hu[k] - intercept).astype("<u2").tobytes()
        pydicom.dcmwrite(str(folder / name), ds, enforce_file_format=True)


def write_png(path: Path, mask: np.ndarray, one_bit: bool) -> None:
    """A per-slice mask PNG: 1-bit (mode "1") or 8-bit 0/255."""
    from PIL import Image  # lazy: only the CHAOS fixture's PNG masks need Pillow
    path.parent.mkdir(parents=True, exist_ok=True)
    binary = np.asarray(mask, bool)
    (Image.fromarray(binary) if one_bit else Image.fromarray(binary.astype(np.uint8) * 255)).save(path)


def write_junk(folder: Path, name: str) -> None:
    """A macOS AppleDouble file (``._name``): a few hundred bytes that are not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"._{name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 200)


def write_fixture(source: str, root: Union[str, Path], **options) -> Fixture:
    """Write the miniature distributed layout of ``source`` under ``root``; returns what the converter must produce.

    ``options`` are source-specific (e.g. ``n_cases`` for btcv/lits/kits, ``version`` for kits).
    """
    from .fixtures_more import WRITERS  # lazy: fixtures_more imports this module
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return WRITERS[source](root, **options)
