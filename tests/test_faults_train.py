"""Fault suite, training side and the remaining commands: no checkpoint can run code when loaded, a damaged one is
one line; nnUNetv2_dsm_train / _demo / _embed_prompts keep the error contract; manifests reject unusable case ids."""
import os
import sys
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _fault_helpers import assert_error, checksums, run
from nnunetv2_dsm.checkpoint import CheckpointError, load_checkpoint
from nnunetv2_dsm.manifest import ManifestError, load_manifest, make_entry, make_manifest


def nnunet_like_checkpoint() -> dict:
    """What nnU-Net 2.8's save_checkpoint writes (types as in nnUNetTrainer.save_checkpoint and its logger)."""
    return {
        "network_weights": OrderedDict(w=torch.arange(6.0).reshape(2, 3), b=torch.zeros(2)),
        "optimizer_state": {"state": {0: {"momentum_buffer": torch.ones(2, 3)}},
                            "param_groups": [{"lr": 0.01, "momentum": 0.99, "nesterov": True, "foreach": None,
                                              "params": [0, 1]}]},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.4)],
                    "dice_per_class_or_region": [[np.float64(0.1), np.float32(0.2)]], "train_losses": [0.3],
                    "lrs": [0.01], "epoch_start_timestamps": [1.0], "extra": [np.arange(3)]},
        "_best_ema": np.float64(0.4),
        "current_epoch": 2,
        "init_args": {"plans": {"configurations": {}}, "configuration": "3d_fullres", "fold": 0,
                      "dataset_json": {"labels": {"background": 0}}, "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainerDSMStage1",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }


class _Payload:
    """Unpickling this runs code (writes a marker file): what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_nnunet_checkpoint_loads_with_weights_only(tmp_path):
    torch.save(nnunet_like_checkpoint(), tmp_path / "ck.pth")
    ck = load_checkpoint(tmp_path / "ck.pth")
    assert torch.equal(ck["network_weights"]["w"], torch.arange(6.0).reshape(2, 3))
    assert ck["_best_ema"] == 0.4 and ck["init_args"]["device"] == torch.device("cpu")
    assert np.array_equal(ck["logging"]["extra"][0], np.arange(3))


def test_crafted_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "PWNED"
    ck = nnunet_like_checkpoint()
    ck["logging"]["evil"] = _Payload(marker)
    torch.save(ck, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="could run code") as e:
        load_checkpoint(tmp_path / "evil.pth")
    assert "system" in str(e.value) and str(tmp_path / "evil.pth") in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["half", "text", "empty"])
def test_damaged_checkpoint_is_one_clear_error(tmp_path, damage):
    torch.save(nnunet_like_checkpoint(), tmp_path / "ck.pth")
    data = (tmp_path / "ck.pth").read_bytes()
    (tmp_path / "ck.pth").write_bytes({"half": data[: len(data) // 2], "text": b"hello", "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint") as e:
        load_checkpoint(tmp_path / "ck.pth")
    assert "\n" not in str(e.value)


def test_checkpoint_without_network_weights(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "ck.pth")
    with pytest.raises(CheckpointError, match="no 'network_weights'"):
        load_checkpoint(tmp_path / "ck.pth")


def test_stage2_loads_the_stage1_checkpoint_safely(tmp_path, monkeypatch):
    from nnunetv2_dsm.training.nnUNetTrainerDSMStage2 import nnUNetTrainerDSMStage2
    marker = tmp_path / "PWNED"
    torch.save({"network_weights": {}, "x": _Payload(marker)}, tmp_path / "stage1.pth")
    fake = SimpleNamespace(stage1_checkpoint_path=lambda: str(tmp_path / "stage1.pth"))
    # read_stage1 is the one reader of the Stage 1 file (the weight transfer and the distillation teacher)
    with pytest.raises(CheckpointError, match="Stage 1 checkpoint .* could run code"):
        nnUNetTrainerDSMStage2.read_stage1(fake)
    assert not marker.exists()
    (tmp_path / "stage1.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="Stage 1 checkpoint .* is truncated"):
        nnUNetTrainerDSMStage2.read_stage1(fake)


def _train_raising(monkeypatch, exc):
    import nnunetv2.run.run_training as rt
    monkeypatch.setattr(sys, "argv", list(sys.argv))              # main() rewrites sys.argv for nnU-Net's parser

    def entry():
        raise exc
    monkeypatch.setattr(rt, "run_training_entry", entry)


@pytest.mark.parametrize("kind", ["checkpoint", "embeddings"])
def test_train_reports_dsm_input_errors_in_one_line(monkeypatch, capsys, kind):
    from nnunetv2_dsm.cli.train import main
    from nnunetv2_dsm.text import TextEmbeddingError
    exc = (CheckpointError("Stage 1 checkpoint /x/checkpoint_final.pth is truncated or not a PyTorch checkpoint")
           if kind == "checkpoint" else
           TextEmbeddingError("no CLIP class-prompt embeddings at /p/dsm_text_embeddings.pt; create them with "
                              "`nnUNetv2_dsm_embed_prompts -d Dataset500_X`"))
    _train_raising(monkeypatch, exc)
    code, err, _ = run(main, ["500", "3d_fullres", "0"], capsys)
    assert_error(code, err, 2, "nnUNetv2_dsm_train: error:", "/x/checkpoint_final.pth" if kind == "checkpoint" else
                 "nnUNetv2_dsm_embed_prompts -d Dataset500_X")


def test_train_ctrl_c_exits_130(monkeypatch, capsys):
    from nnunetv2_dsm.cli.train import main
    _train_raising(monkeypatch, KeyboardInterrupt())
    code, err, _ = run(main, ["500", "3d_fullres", "0"], capsys)
    assert code == 130 and "Traceback" not in err


def test_demo_output_that_is_a_file(tmp_path, capsys):
    from nnunetv2_dsm.cli.demo import main
    target = tmp_path / "demo_out"
    target.write_text("x")
    before = checksums(tmp_path)
    code, err, _ = run(main, ["-o", target], capsys)
    assert_error(code, err, 2, str(target), "is a file")
    assert checksums(tmp_path) == before


def test_demo_output_below_a_file(tmp_path, capsys):
    from nnunetv2_dsm.cli.demo import main
    (tmp_path / "f").write_text("x")
    code, err, _ = run(main, ["-o", tmp_path / "f" / "sub"], capsys)
    assert_error(code, err, 2, str(tmp_path / "f"), "is a file")


def test_embed_prompts_unknown_dataset_is_one_line(tmp_path, capsys, monkeypatch):
    from nnunetv2_dsm.cli.embed_prompts import main
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    code, err, _ = run(main, ["-d", "987", "--random-weights"], capsys)
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1


@pytest.mark.parametrize("case_id", ["../../../outside/SECRET", "a/b", "a\\b", "x..y", ".hidden", "tab\there", ""])
def test_manifest_rejects_unusable_case_ids(case_id):
    ds = {"dsm_manifest": make_manifest({case_id: make_entry("btcv", ["Liver"])})}
    with pytest.raises(ManifestError, match="not usable as a file name"):
        load_manifest(ds, "dataset.json")


def test_manifest_accepts_the_converters_case_ids():
    ids = ["BTCV_0001", "MSD03_liver_0", "TS_s0001", "CHAOS_1", "KiTS_00000", "AbdomenCT-1K_Case_00001"]
    m = load_manifest({"dsm_manifest": make_manifest({c: make_entry("btcv", ["Liver"]) for c in ids})})
    assert sorted(m.cases) == sorted(ids)
