"""Fault suite, nnUNetv2_dsm_predict argument faults that need no trained model (the predict module handles them;
listed here so the fault suite covers every command): one line, exit 2, nothing written."""
import pytest
import torch

from _fault_helpers import assert_error, checksums, run


@pytest.fixture
def env(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / "nn"))
    (tmp_path / "nn").mkdir()
    (tmp_path / "in").mkdir()
    return tmp_path


@pytest.mark.parametrize("args, fragments", [
    (["-d", "1", "-f", "zero"], ["-f takes fold numbers", "zero"]),
    (["-d", "777"], ["-d 777: unknown dataset"]),
    (["-d", "1", "-device", "cuda"], ["-device cuda", "-device cpu"]),
], ids=["fold-zero", "unknown-d", "cuda-without-gpu"])
def test_predict_argument_faults(env, capsys, args, fragments):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: -device cuda is valid here")
    from nnunetv2_dsm.cli.predict import main
    before = checksums(env)
    argv = ["-i", env / "in", "-o", env / "out", "-c", "3d_fullres", *args]
    if "-device" not in args:
        argv += ["-device", "cpu"]
    code, err, _ = run(main, argv, capsys)
    assert_error(code, err, 2, *fragments)
    assert checksums(env) == before and not (env / "out").exists()


def test_crafted_checkpoint_in_the_model_folder_runs_no_code(tmp_path, capsys):
    """nnU-Net's own loader unpickles checkpoints with weights_only=False; nnUNetv2_dsm_predict checks each fold's
    file with the safe loader first: a payload is refused in one line and never runs."""
    from test_faults_train import _Payload, nnunet_like_checkpoint
    from nnunetv2_dsm.inference.predictor import PredictionError, check_model_folder
    marker = tmp_path / "PWNED"
    ck = nnunet_like_checkpoint()
    ck["logging"]["evil"] = _Payload(marker)
    (tmp_path / "model" / "fold_0").mkdir(parents=True)
    torch.save(ck, tmp_path / "model" / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(PredictionError, match="could run code"):
        check_model_folder(str(tmp_path / "model"), [0], "checkpoint_final.pth")
    assert not marker.exists()
