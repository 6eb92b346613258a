"""Turning sliding-window logits back into files with the input image's geometry, one channel at a time.

nnU-Net's export resamples all region channels at once (45 × a full CT in float32 is ~14 GB for 512×512×300).
These functions use nnU-Net's own resampling function, cropping bounding box and axis transposition from the plans
and the case properties, but stream over channels, so peak memory stays a few channels' worth. The label map is
identical to nnU-Net's (``sigmoid > 0.5`` ⇔ ``logit > 0``, regions written in ``regions_class_order``).
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

from nnunetv2_dsm.io_utils import atomic_target


def _spacings(properties: dict, plans_manager, configuration_manager) -> Tuple[list, list]:
    target = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    current = configuration_manager.spacing if len(configuration_manager.spacing) == \
        len(properties["shape_after_cropping_and_before_resampling"]) else [target[0], *configuration_manager.spacing]
    return current, target


def resampled_channels(logits, properties: dict, plans_manager, configuration_manager,
                       channels: Optional[Sequence[int]] = None) -> Iterator[Tuple[int, np.ndarray]]:
    """Yield (channel, float32 array) resampled to the cropped original grid (transposed as nnU-Net works)."""
    current, target = _spacings(properties, plans_manager, configuration_manager)
    shape = properties["shape_after_cropping_and_before_resampling"]
    for c in (range(logits.shape[0]) if channels is None else channels):
        ch = logits[c:c + 1]
        ch = ch.float() if isinstance(ch, torch.Tensor) else torch.from_numpy(np.asarray(ch, dtype=np.float32))
        out = configuration_manager.resampling_fn_probabilities(ch, shape, current, target)
        yield c, (out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out))[0].astype(np.float32, copy=False)


def to_original_grid(array: np.ndarray, properties: dict, plans_manager, fill=0) -> np.ndarray:
    """A cropped-grid array (*S_cropped) → the grid the predictor was given (the LPS copy of the input, see
    ``inference.inputs``): undo nnU-Net's crop and axis transposition."""
    full = np.full(properties["shape_before_cropping"], fill, dtype=array.dtype)
    full = insert_crop_into_image(full, array, properties["bbox_used_for_cropping"])
    return full.transpose(plans_manager.transpose_backward)


def to_input_grid(array: np.ndarray, properties: dict) -> np.ndarray:
    """(..., *LPS grid) → (..., *the input file's own grid): undo ``inputs.load_case``'s reorientation (if any)."""
    r = properties.get("dsm_reorientation")
    return array if r is None or r.identity else r.to_input(array)


def label_map(logits, properties: dict, plans_manager, configuration_manager, regions_class_order) -> np.ndarray:
    """The nnU-Net region label map (uint8) on the original grid, streamed channel by channel."""
    seg = np.zeros(properties["shape_after_cropping_and_before_resampling"], dtype=np.uint8)
    for c, ch in resampled_channels(logits, properties, plans_manager, configuration_manager,
                                    channels=range(len(regions_class_order))):
        seg[ch > 0] = regions_class_order[c]
    return to_original_grid(seg, properties, plans_manager)


def write_float_image(array: np.ndarray, path: str, properties: dict, reader_writer) -> None:
    """Write a float32 map with the input image's geometry (SimpleITKIO and NibabelIO datasets), atomically."""
    name = type(reader_writer).__name__
    with atomic_target(path) as tmp:
        if name == "SimpleITKIO" and "sitk_stuff" in properties:
            import SimpleITK as sitk
            geo = properties["sitk_stuff"]
            img = sitk.GetImageFromArray(array[0] if len(geo["spacing"]) == 2 else array)
            img.SetSpacing(geo["spacing"]), img.SetOrigin(geo["origin"]), img.SetDirection(geo["direction"])
            sitk.WriteImage(img, tmp, True)
        elif name == "NibabelIO" and "nibabel_stuff" in properties:
            import nibabel
            nibabel.save(nibabel.Nifti1Image(array.transpose((2, 1, 0)),
                                             properties["nibabel_stuff"]["original_affine"]), tmp)
        else:
            raise NotImplementedError(f"float maps can only be written for datasets read with SimpleITKIO or "
                                      f"NibabelIO (this one uses {name}); label maps and masks work with any reader")


def write_seg(array: np.ndarray, path: str, properties: dict, reader_writer) -> None:
    """The dataset's own segmentation writer, atomically (temp file + rename)."""
    with atomic_target(path) as tmp:
        reader_writer.write_seg(array, tmp, properties)
