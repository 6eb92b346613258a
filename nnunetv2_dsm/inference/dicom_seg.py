"""DICOM-SEG output (``nnUNetv2_dsm_predict --output_type dicom_seg``): the 45 classes as segments of a binary DICOM
Segmentation object referencing the input CT series, written with highdicom (``pip install nnunetv2-dsm[dicom]``).

Segments are multi-label, as DSM's classes: a voxel of "Liver Tumor in the Liver" is in both the Liver and the Liver
Tumor segment (decoded from the composite label map, ``labels.decode``). Classes are coded with SNOMED CT categories
(Organ / Morphologically Abnormal Structure) and a private scheme ``99NNUNETV2DSM`` for the class itself (value =
the class index, meaning = the class name), so a PACS shows the names; only non-empty classes (or the
``--roi_subset`` classes) become segments.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from nnunetv2_dsm.errors import UserError
from nnunetv2_dsm.labels import CLASS_NAMES, MAX_LABEL, NUM_CLASSES, NUM_ORGANS, decode

PRIVATE_SCHEME = "99NNUNETV2DSM"


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise UserError("--output_type dicom_seg needs highdicom: pip install 'nnunetv2-dsm[dicom]'") from None
    return highdicom


def sorted_series(folder: str):
    """The series' datasets in the order of the predicted volume's slices (by position along the slice normal, as
    ``readers.read_dicom_series`` stacks them)."""
    import pydicom
    from nnunetv2_dsm.dataset_conversion.readers import dicom_positions
    from nnunetv2_dsm.inference.inputs import is_dicom_file
    files = [Path(folder, f) for f in sorted(os.listdir(folder)) if is_dicom_file(os.path.join(folder, f))]
    pos, _, _ = dicom_positions(files)
    return [pydicom.dcmread(str(files[i])) for i in np.argsort(pos, kind="stable")]


def segment_description(hd, index: int, number: int):
    """Segment ``number`` (1-based) for class ``index`` (0-based)."""
    from pydicom.sr.codedict import codes
    category = codes.SCT.Organ if index < NUM_ORGANS else codes.SCT.MorphologicallyAbnormalStructure
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=CLASS_NAMES[index][:64],
        segmented_property_category=category,
        segmented_property_type=hd.sr.CodedConcept(str(index + 1), PRIVATE_SCHEME, CLASS_NAMES[index]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="nnunetv2-dsm", version=_version(), family=codes.cid7162.ArtificialIntelligence))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("nnunetv2-dsm")
    except PackageNotFoundError:
        return "0"


def write_dicom_seg(seg_zyx: np.ndarray, series_folder: str, path: str, classes: Optional[Sequence[int]] = None) -> None:
    """Write the composite label map ``seg_zyx`` (frames, rows, columns on the series' own grid) as DICOM-SEG over
    the series in ``series_folder``; ``classes`` (0-based) restricts the segments (default: the non-empty ones)."""
    hd = _highdicom()
    if not os.path.isdir(series_folder):
        raise UserError(f"--output_type dicom_seg needs a DICOM series as input; {series_folder} is a file "
                        f"(use the default NIfTI output for it)")
    sources = sorted_series(series_folder)
    if len(sources) != seg_zyx.shape[0] or (sources[0].Rows, sources[0].Columns) != seg_zyx.shape[1:]:
        raise UserError(f"{series_folder}: the series ({len(sources)} slices) does not match the predicted grid "
                        f"{seg_zyx.shape}")
    lut = decode(np.arange(MAX_LABEL + 1))                       # (45, codes): code v marks class c
    present = lut[:, np.bincount(seg_zyx.ravel(), minlength=MAX_LABEL + 1) > 0].any(1)
    chosen = list(classes) if classes else [c for c in range(NUM_CLASSES) if present[c]]
    chosen = chosen or [0]                                       # an object needs a segment: an empty first class
    pixels = np.stack([lut[c][seg_zyx] for c in chosen], -1).astype(np.uint8)  # (frames, rows, columns, segments)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(hd, c, i + 1) for i, c in enumerate(chosen)],
        series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="nnunetv2-dsm", manufacturer_model_name="DSM (nnU-Net v2)", software_versions=_version(),
        device_serial_number="0", series_description="DSM segmentation", omit_empty_frames=False)
    from nnunetv2_dsm.io_utils import atomic_target
    with atomic_target(path) as tmp:
        seg.save_as(tmp)
