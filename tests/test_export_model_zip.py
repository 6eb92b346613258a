"""A DSM Stage 2 model shared as nnU-Net shares models: nnUNetv2_dsm_export_model_to_zip → nnU-Net's
install_model_from_zip_file at another site (no dataset, no CLIP weights) → predict with a cached prompt."""
import json
import zipfile

import SimpleITK as sitk

import nnunetv2_dsm.text as text
from _predict_helpers import TRAINER, model, phantom_lps, predict  # noqa: F401 (fixture)
from nnunetv2_dsm.cli.embed_prompts import main as embed_main
from nnunetv2_dsm.cli.export_model import main as export_main

FOLDER = f"Dataset997_DSMPredict/{TRAINER}__nnUNetPlans__3d_fullres"


def _exportable(model):
    """The files nnU-Net's training leaves and its exporter packs, and prompts cached for the dataset."""
    from nnunetv2_dsm.benchmark.plans import synthetic_fingerprint
    folder = model / "results" / FOLDER
    (folder / "fold_0" / "validation").mkdir(exist_ok=True)
    (folder / "fold_0" / "validation" / "summary.json").write_text("{}")
    (folder / "fold_0" / "progress.png").write_bytes(b"")
    (folder / "dataset_fingerprint.json").write_text(json.dumps(synthetic_fingerprint(1)))
    (model / "preprocessed" / "Dataset997_DSMPredict").mkdir(parents=True, exist_ok=True)
    embed_main(["-d", "997", "--random-weights", "--extra-prompts", "hepatic cyst"])
    return folder


def _install_offline_and_predict(archive, tmp_path, monkeypatch, capsys):
    """Install ``archive`` with nnU-Net's installer at a site with no dataset and no CLIP weights; predict with the
    cached prompt."""
    from nnunetv2.model_sharing.model_download import install_model_from_zip_file
    site = tmp_path / "site"
    monkeypatch.setenv("nnUNet_results", str(site / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(site / "preprocessed"))
    (site / "results").mkdir(parents=True)
    install_model_from_zip_file(str(archive))

    def offline(*args, **kwargs):
        raise text.TextEmbeddingError("offline: the CLIP text tower cannot be loaded here")
    monkeypatch.setattr(text, "load_text_encoder", offline)
    sitk.WriteImage(phantom_lps(), str(tmp_path / "ct.nii.gz"))
    assert predict(tmp_path / "ct.nii.gz", tmp_path / "out", "--prompts", "hepatic cyst") == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "prompts" / "hepatic_cyst" / "ct.nii.gz").is_file()


def test_zip_round_trip_keeps_text_record_and_prompt_cache(model, tmp_path, monkeypatch, capsys):
    _exportable(model)
    archive = tmp_path / "model.zip"
    assert export_main(["-d", "997", "-o", str(archive), "-c", "3d_fullres", "-tr", TRAINER, "-f", "0"]) == 0
    names = set(zipfile.ZipFile(archive).namelist())
    assert {f"{FOLDER}/dsm_text.json", f"{FOLDER}/dsm_prompt_embeddings.pt",
            f"{FOLDER}/fold_0/checkpoint_final.pth"} <= names
    _install_offline_and_predict(archive, tmp_path, monkeypatch, capsys)


def test_stock_export_carries_the_record_in_dataset_json(model, tmp_path, monkeypatch, capsys):
    """After record_text_in_dataset_json (for the Stage 2 trainer to call), nnU-Net's own exporter is enough."""
    from nnunetv2.model_sharing.model_export import export_pretrained_model
    from nnunetv2_dsm.text.model_record import record_text_in_dataset_json
    folder = _exportable(model)
    assert record_text_in_dataset_json(str(folder))
    archive = tmp_path / "stock.zip"
    export_pretrained_model("997", str(archive), ("3d_fullres",), TRAINER, "nnUNetPlans", (0,))
    assert f"{FOLDER}/dsm_text.json" not in zipfile.ZipFile(archive).namelist()   # nnU-Net's fixed file list
    _install_offline_and_predict(archive, tmp_path, monkeypatch, capsys)
