"""Shared checks for the converter and merge tests."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunetv2_dsm.dataset_conversion.fixtures import write_fixture
from nnunetv2_dsm.dataset_conversion.writer import convert_by_name
from nnunetv2_dsm.labels import class_index, dataset_json_labels, regions_class_order
from nnunetv2_dsm.manifest import MANIFEST_KEY, SOURCE_STAGE, load_manifest


def snapshot(root: Path) -> dict:
    """{relative path: (size, mtime_ns, sha1)} of every file below root (hidden ones included)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
    return out


def convert_fixture(tmp_path: Path, source: str, dataset_id: int = 501, **options):
    """Write the source's fixture under tmp_path/in/<source> and convert it into tmp_path/raw."""
    fx = write_fixture(source, tmp_path / "in" / source, **options)
    summary = convert_by_name(source, fx.root, dataset_id, raw_dir=tmp_path / "raw", progress=False)
    return fx, summary


def read(path: Path):
    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


def assert_same_grid(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def check_dataset(fx, dataset_dir: Path):
    """Every output of a converted fixture, voxel by voxel, plus dataset.json and the manifest."""
    ds = json.loads((dataset_dir / "dataset.json").read_text())
    assert ds["labels"] == dataset_json_labels()
    assert ds["regions_class_order"] == regions_class_order()
    assert ds["channel_names"] == {"0": "CT"} and ds["file_ending"] == ".nii.gz"
    assert ds["numTraining"] == len(fx.train)
    manifest = load_manifest(ds)
    assert sorted(manifest.cases) == fx.train
    for cid in fx.train:
        entry = ds[MANIFEST_KEY]["cases"][cid]
        assert entry == {"source": fx.source, "stage": SOURCE_STAGE[fx.source], "subset": "train",
                         "annotated": sorted(fx.cases[cid].annotated, key=class_index)}, cid
    assert ds["dsm_conversion"]["imagesTs"] == fx.test
    listing = lambda sub: sorted(p.name for p in (dataset_dir / sub).glob("*")) if (dataset_dir / sub).is_dir() else []  # noqa
    assert listing("imagesTr") == sorted(f"{c}_0000.nii.gz" for c in fx.train)
    assert listing("labelsTr") == sorted(f"{c}.nii.gz" for c in fx.train)
    assert listing("imagesTs") == sorted(f"{c}_0000.nii.gz" for c in fx.test)
    for cid, case in fx.cases.items():
        img, arr = read(dataset_dir / ("imagesTs" if case.test else "imagesTr") / f"{cid}_0000.nii.gz")
        np.testing.assert_allclose(img.GetDirection(), np.eye(3).ravel(), err_msg=f"{cid} not reoriented to LPS")
        np.testing.assert_array_equal(arr, case.expected_image(img), err_msg=f"{cid}: image content/position")
        if case.test:
            continue
        lab, larr = read(dataset_dir / "labelsTr" / f"{cid}.nii.gz")
        assert larr.dtype == np.uint8, cid
        assert_same_grid(lab, img)
        expected = case.expected_label(lab)
        bad = int((larr != expected).sum())
        assert bad == 0, f"{cid}: {bad} voxels differ; got values {np.unique(larr[larr != expected])[:5]}, " \
                         f"expected {np.unique(expected[larr != expected])[:5]}"
        assert len(np.unique(expected)) > 1, f"{cid}: fixture has no foreground"
