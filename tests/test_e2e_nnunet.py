"""End to end through the real nnU-Net command-line tools on a tiny phantom dataset.

nnUNetv2_plan_and_preprocess → nnUNetv2_train -tr nnUNetTrainerDSMStage1_tiny → nnUNetv2_predict, then Stage 2
(_tiny) starting from that Stage 1 checkpoint, all as subprocesses with nnUNet_extTrainer pointing at the
package's trainer folder, exactly as a user runs them.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_dsm import phantom
from nnunetv2_dsm.labels import MAX_LABEL, ORGAN_NAMES, decode
from nnunetv2_dsm.nnunet_ext import EXT_TRAINER_DIR

pytestmark = pytest.mark.slow
BIN = os.path.dirname(sys.executable)
DATASET = "Dataset901_DSMPhantom"
SHAPE = (32, 32, 32)
ORGANS_A = ["Liver", "Spleen", "Right Kidney", "Left Kidney"]
ORGANS_B = ["Liver", "Stomach", "Aorta", "Pancreas", "Right Lung", "Left Lung", "Bladder"]


def _cases():
    cases = []
    for i in range(6):
        cases.append(dict(case_id=f"OrgA_{i:03d}", source="btcv", annotated=ORGANS_A, seed=i, shape=SHAPE))
        cases.append(dict(case_id=f"OrgB_{i:03d}", source="word", annotated=ORGANS_B, seed=100 + i, shape=SHAPE))
    for i in range(3):
        cases.append(dict(case_id=f"Tum_{i:03d}", source="lits", annotated=["Liver", "Liver Tumor"], seed=200 + i,
                          shape=SHAPE, tumors=["Liver Tumor"]))
    cases.append(dict(case_id="Test_000", source="lits", annotated=["Liver", "Liver Tumor"], seed=300, shape=SHAPE,
                      tumors=["Liver Tumor"], subset="test"))
    return cases


def run(cmd, env, timeout=900):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def nnunet_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_extTrainer=EXT_TRAINER_DIR,
               nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", nnUNet_compile="0", OMP_NUM_THREADS="2",
               PATH=BIN + os.pathsep + env.get("PATH", ""))
    phantom.write_raw_dataset(str(root / "raw" / DATASET), _cases())
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): 0 (single-threaded augmentation) breaks it
    run(["nnUNetv2_plan_and_preprocess", "-d", "901", "-c", "3d_fullres", "-np", "1", "-npfp", "1",
         "--verify_dataset_integrity"], {**env, "nnUNet_n_proc_DA": "1"})
    # a fixed split whose validation fold holds organ cases of both sources and a tumor case
    train = [c["case_id"] for c in _cases() if c.get("subset", "train") == "train"]
    val = ["OrgA_000", "OrgB_000", "Tum_000"]
    with open(root / "preprocessed" / DATASET / "splits_final.json", "w") as f:
        json.dump([{"train": [c for c in train if c not in val], "val": val}], f)
    return root, env


@pytest.fixture(scope="module")
def stage1(nnunet_env):
    root, env = nnunet_env
    log = run(["nnUNetv2_train", "901", "3d_fullres", "0", "-tr", "nnUNetTrainerDSMStage1_tiny", "-device", "cpu"], env)
    return root, env, log


def _check_geometry(pred_file, image_file):
    pred, img = sitk.ReadImage(str(pred_file)), sitk.ReadImage(str(image_file))
    assert pred.GetSize() == img.GetSize()
    np.testing.assert_allclose(pred.GetSpacing(), img.GetSpacing())
    np.testing.assert_allclose(pred.GetOrigin(), img.GetOrigin())
    np.testing.assert_allclose(pred.GetDirection(), img.GetDirection())
    return np.unique(sitk.GetArrayFromImage(pred))


def _check_prediction(pred_file, image_file):
    pred, img = sitk.ReadImage(str(pred_file)), sitk.ReadImage(str(image_file))
    assert pred.GetSize() == img.GetSize()
    np.testing.assert_allclose(pred.GetSpacing(), img.GetSpacing())
    np.testing.assert_allclose(pred.GetOrigin(), img.GetOrigin())
    np.testing.assert_allclose(pred.GetDirection(), img.GetDirection())
    values = np.unique(sitk.GetArrayFromImage(pred))
    assert values.min() >= 0 and values.max() <= MAX_LABEL
    decode(values)  # every value is part of the DSM encoding
    return values


def test_stage1_tiny_trains_and_predicts_through_the_stock_commands(stage1):
    root, env, log = stage1
    out_dir = root / "results" / DATASET / "nnUNetTrainerDSMStage1_tiny__nnUNetPlans__3d_fullres" / "fold_0"
    assert (out_dir / "checkpoint_final.pth").is_file()
    log = next(out_dir.glob("training_log_*.txt")).read_text()
    assert "DSM Stage 1: 10 training / 2 validation cases" in log
    assert "Validation on each case's annotated classes" in log
    dsm_summary = json.loads((out_dir / "validation" / "dsm" / "dsm_summary.json").read_text())
    assert "Liver" in json.dumps(dsm_summary) and "Liver Tumor" not in json.dumps(dsm_summary)
    pred = root / "pred_stage1"
    run(["nnUNetv2_predict", "-i", str(root / "raw" / DATASET / "imagesTs"), "-o", str(pred), "-d", "901", "-c",
         "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerDSMStage1_tiny", "-device", "cpu", "-npp", "1", "-nps", "1"],
        env)
    values = _check_prediction(pred / "Test_000.nii.gz", root / "raw" / DATASET / "imagesTs" / "Test_000_0000.nii.gz")
    assert values.max() <= len(ORGAN_NAMES)  # Stage 1 never predicts tumors


@pytest.fixture(scope="module")
def stage2(stage1):
    root, env, _ = stage1
    run(["nnUNetv2_dsm_embed_prompts", "-d", "901", "--random-weights"], env)
    run(["nnUNetv2_train", "901", "3d_fullres", "0", "-tr", "nnUNetTrainerDSMStage2_tiny", "-device", "cpu"], env)
    run(["nnUNetv2_predict", "-i", str(root / "raw" / DATASET / "imagesTs"), "-o", str(root / "pred_stage2"), "-d",
         "901", "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerDSMStage2_tiny", "-device", "cpu", "-npp", "1",
         "-nps", "1", "--save_probabilities"], env)
    return root, env


def test_stage2_tiny_starts_from_stage1_and_predicts(stage2):
    root, env = stage2
    out_dir = root / "results" / DATASET / "nnUNetTrainerDSMStage2_tiny__nnUNetPlans__3d_fullres" / "fold_0"
    log = next(out_dir.glob("training_log_*.txt")).read_text()
    assert "Stage 1 → Stage 2: loaded" in log
    new_line = next(line for line in log.splitlines() if "New in Stage 2 (trained from scratch)" in line)
    assert "tumor.queries" in new_line and "alignment.proj" in new_line and "kmmm" not in new_line
    assert "DSM Stage 2: 12 training / 3 validation cases" in log
    # the checkpoint records exactly the classes the Stage 2 training cases annotate (it used to say all 45)
    import torch
    from nnunetv2_dsm.labels import CLASS_NAMES
    weights = torch.load(out_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    trained = {CLASS_NAMES[i] for i in np.flatnonzero(weights["trained_classes"].numpy())}
    assert trained == set(ORGANS_A) | set(ORGANS_B) | {"Liver Tumor"}
    pred = root / "pred_stage2"
    _check_prediction(pred / "Test_000.nii.gz", root / "raw" / DATASET / "imagesTs" / "Test_000_0000.nii.gz")
    probs = np.load(pred / "Test_000.npz")["probabilities"]
    assert probs.shape == (45, *SHAPE) and probs.min() >= 0 and probs.max() <= 1


def test_stage2_without_a_stage1_checkpoint_names_the_path(nnunet_env):
    root, env = nnunet_env
    proc = subprocess.run(["nnUNetv2_train", "901", "3d_fullres", "1", "-tr", "nnUNetTrainerDSMStage2_tiny",
                           "-device", "cpu"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    expected = os.path.join("nnUNetTrainerDSMStage1_tiny__nnUNetPlans__3d_fullres", "fold_1", "checkpoint_final.pth")
    assert "no Stage 1 checkpoint at" in proc.stderr and expected in proc.stderr


def test_dsm_predict_writes_stock_label_maps_prompt_masks_and_anomaly_maps(stage2):
    root, env = stage2
    images = root / "raw" / DATASET / "imagesTs"
    out = root / "pred_dsm"
    log = run(["nnUNetv2_dsm_predict", "-i", str(images), "-o", str(out), "-d", "901", "-c", "3d_fullres", "-f", "0",
               "-tr", "nnUNetTrainerDSMStage2_tiny", "-device", "cpu", "--save_probabilities", "--save-anomaly-maps",
               "--save-class-masks", "--prompts", "pancreas tumor", "a hepatic cyst"], env)
    assert "prompt 'pancreas tumor': answered by the" in log
    stock = root / "pred_stage2"  # nnUNetv2_predict output of the same model (test above)
    ours_seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "Test_000.nii.gz")))
    np.testing.assert_array_equal(ours_seg, sitk.GetArrayFromImage(sitk.ReadImage(str(stock / "Test_000.nii.gz"))))
    np.testing.assert_allclose(np.load(out / "Test_000.npz")["probabilities"],
                               np.load(stock / "Test_000.npz")["probabilities"], atol=1e-6)
    image = images / "Test_000_0000.nii.gz"
    anomaly = out / "anomaly_maps" / "Test_000.nii.gz"
    _check_geometry(anomaly, image)
    assert sitk.ReadImage(str(anomaly)).GetPixelID() == sitk.sitkFloat32
    for slug in ("pancreas_tumor", "a_hepatic_cyst"):
        values = _check_geometry(out / "prompts" / slug / "Test_000.nii.gz", image)
        assert set(values.tolist()) <= {0, 1}
    masks = sorted(p.name for p in (out / "masks" / "Test_000").iterdir())
    assert len(masks) == 45 and "liver_tumor.nii.gz" in masks
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "masks" / "Test_000" / "liver.nii.gz")))
    liver_p = np.load(out / "Test_000.npz")["probabilities"][5]
    differ = liver.astype(bool) != (liver_p > 0.5)  # same logits: only float rounding at exactly 0.5 may differ
    assert np.all(np.abs(liver_p[differ] - 0.5) < 1e-6)
    report = json.loads((out / "dsm_prompts.json").read_text())
    assert [r["prompt"] for r in report["Test_000"]] == ["pancreas tumor", "a hepatic cyst"]
    assert all(-1 <= r["similarity"] <= 1 and r["query"] for r in report["Test_000"])
