"""A DSM Stage 2 model folder with random weights, built from tiny plans in a second (no training), and CT
phantoms stored in any orientation: for the prediction tests, which assert geometry, not accuracy."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

TRAINER = "nnUNetTrainerDSMStage2_tiny"
CONFIGURATION = "3d_fullres"
SPACING = (2.0, 1.5, 1.5)  # z, y, x (SimpleITK array order), anisotropic so that a wrong axis order shows


def tiny_plans(root: str) -> dict:
    """nnU-Net's ExperimentPlanner on the benchmark's synthetic fingerprint, replanned for a 32×32×32 patch at
    SPACING with the tiny DSM decoder."""
    from dataclasses import asdict
    from nnunetv2_dsm.benchmark.plans import nnunet_environment, plan_synthetic_dataset, replan_topology
    from nnunetv2_dsm.network.dsm import TINY_ARCHITECTURE
    with nnunet_environment(root):
        plans = plan_synthetic_dataset(root)
    cfg = plans["configurations"][CONFIGURATION]
    cfg["spacing"] = list(SPACING)
    replan_topology(cfg, [32, 32, 32])
    kw = cfg["architecture"]["arch_kwargs"]
    kw["features_per_stage"] = [min(8 * 2 ** i, 32) for i in range(kw["n_stages"])]
    kw["n_conv_per_stage"] = [1] * kw["n_stages"]
    kw["n_conv_per_stage_decoder"] = [1] * (kw["n_stages"] - 1)
    cfg["dsm_architecture"] = asdict(TINY_ARCHITECTURE)
    cfg["batch_size"] = 1
    return plans


def build_model_folder(results: Path, dataset: str = "Dataset997_DSMPredict", seed: int = 0) -> Path:
    """``results/<dataset>/<TRAINER>__nnUNetPlans__3d_fullres`` with plans.json, dataset.json, dsm_text.json and
    fold_0/checkpoint_final.pth holding a seeded random Stage 2 network (and random class text embeddings)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_dsm.benchmark.plans import dataset_json_for_benchmark
    from nnunetv2_dsm.benchmark.runner import text_embeddings
    from nnunetv2_dsm.training.nnUNetTrainerDSM_tiny import nnUNetTrainerDSMStage2_tiny
    folder = Path(results) / dataset / f"{TRAINER}__nnUNetPlans__{CONFIGURATION}"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):
        plans = tiny_plans(str(Path(results).parent / "planning"))
    plans["dataset_name"] = dataset
    dj = dataset_json_for_benchmark(num_training=1)
    pm = PlansManager(plans)
    torch.manual_seed(seed)
    net = nnUNetTrainerDSMStage2_tiny.build_network_architecture(pm, pm.get_configuration(CONFIGURATION), 1, 45,
                                                                 True)
    net.alignment.set_text_embeddings(text_embeddings(seed))
    torch.save({"trainer_name": TRAINER, "init_args": {"configuration": CONFIGURATION},
                "network_weights": net.state_dict(), "inference_allowed_mirroring_axes": None},
               folder / "fold_0" / "checkpoint_final.pth")
    for name, obj in (("plans.json", plans), ("dataset.json", dj),
                      ("dsm_text.json", {"model": "ViT-B-32-quickgelu", "weights": f"random({seed})",
                                         "trained_weights": False})):
        (folder / name).write_text(json.dumps(obj, indent=1))
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """$nnUNet_results (dataset 997) holding the random-weight model, set in the environment for the module: a copy
    of one built per test session (building takes seconds; the copy keeps modules independent)."""
    import shutil
    built = tmp_path_factory.getbasetemp() / "dsm_predict_model"
    if not (built / "results").is_dir():
        build_model_folder(built / "partial")
        os.replace(built / "partial", built / "results")
    root = tmp_path_factory.mktemp("model")
    shutil.copytree(built / "results", root / "results")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_results", str(root / "results"))
        mp.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
        yield root


def predict(inp, out, *flags) -> int:
    """``nnUNetv2_dsm_predict`` (in-process) with the model of :func:`model` on the CPU; returns the exit status."""
    from nnunetv2_dsm.cli.predict import main
    return main(["-i", str(inp), "-o", str(out), "-d", "997", "-c", CONFIGURATION, "-tr", TRAINER, "-f", "0",
                 "-device", "cpu", "--disable_progress_bar", "-npp", "1", "-nps", "2", *map(str, flags)])


def phantom_lps(shape=(24, 28, 32), seed: int = 0) -> sitk.Image:
    """A CT-like LPS volume (int16 HU, SPACING) that is not left/right symmetric: a bright blob in the patient's
    left half (high x in LPS), a darker one on the right, noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    arr = -1000 + 1040 * ((z ** 2 + y ** 2 + x ** 2) < 0.8)
    arr = arr + 150 * (((x - 0.45) ** 2 + y ** 2 + z ** 2) < 0.1) - 80 * (((x + 0.4) ** 2 + (y - 0.2) ** 2) < 0.05)
    arr = np.clip(arr + rng.normal(0, 20, shape), -1024, 3071).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING[::-1])
    img.SetOrigin((-20.0, 15.0, 100.0))
    return img


def reoriented(img: sitk.Image, code: str) -> sitk.Image:
    """The same world-space image stored with another axis order/direction (an exact permutation and flip)."""
    return sitk.DICOMOrient(img, code)


def write_dicom_series(img: sitk.Image, folder: Path, series_uid: str = None, prefix: str = "IM") -> None:
    """One CT DICOM file per axial slice of an int16 HU image (stored uint16, RescaleIntercept -1024), with the
    image's geometry in ImagePositionPatient/ImageOrientationPatient; files named in reverse slice order so that
    the reader has to sort by position."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    folder.mkdir(parents=True, exist_ok=True)
    arr = sitk.GetArrayFromImage(img)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    study, series, frame = generate_uid(), series_uid or generate_uid(), generate_uid()
    sx, sy, sz = img.GetSpacing()
    for k in range(arr.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = CTImageStorage, ExplicitVRLittleEndian
        meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = CTImageStorage, sop, study, series
        ds.Modality, ds.PatientID, ds.PatientName, ds.Manufacturer = "CT", "PHANTOM", "Phantom^Predict", "test"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID, ds.SeriesNumber = "20260101", "120000", "", "1", 1
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName, ds.FrameOfReferenceUID = "", "O", "", frame
        ds.ImagePositionPatient = [float(v) for v in img.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [float(v) for v in np.concatenate([d[:, 0], d[:, 1]])]
        ds.PixelSpacing, ds.SliceThickness = [sy, sx], sz
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.InstanceNumber = -1024, 1, k + 1
        ds.PixelData = (arr[k].astype(np.int32) + 1024).astype("<u2").tobytes()
        pydicom.dcmwrite(str(folder / f"{prefix}{arr.shape[0] - k:04d}"), ds, enforce_file_format=True)
