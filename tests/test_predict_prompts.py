"""Free-text prompts at an offline site: embeddings cached by nnUNetv2_dsm_embed_prompts in the dataset's
preprocessed folder are found by nnUNetv2_dsm_predict, which then never loads the CLIP text tower."""
import json

import SimpleITK as sitk

import nnunetv2_dsm.text as text
from _predict_helpers import model, phantom_lps, predict  # noqa: F401 (fixture)
from nnunetv2_dsm.cli.embed_prompts import main as embed_main


def test_prompts_cached_in_the_dataset_folder_need_no_clip_weights(model, tmp_path, monkeypatch, capsys):
    (model / "preprocessed" / "Dataset997_DSMPredict").mkdir(parents=True)
    embed_main(["-d", "997", "--random-weights", "--extra-prompts", "hepatic cyst"])
    assert (model / "preprocessed" / "Dataset997_DSMPredict" / text.PROMPT_CACHE_NAME).is_file()

    def offline(*args, **kwargs):
        raise text.TextEmbeddingError("offline: the CLIP text tower cannot be loaded here")
    monkeypatch.setattr(text, "load_text_encoder", offline)
    sitk.WriteImage(phantom_lps(), str(tmp_path / "ct.nii.gz"))
    assert predict(tmp_path / "ct.nii.gz", tmp_path / "out", "--prompts", "hepatic cyst") == 0
    mask = sitk.ReadImage(str(tmp_path / "out" / "prompts" / "hepatic_cyst" / "ct.nii.gz"))
    assert mask.GetSize() == phantom_lps().GetSize()
    report = json.loads((tmp_path / "out" / "dsm_prompts.json").read_text())
    assert [r["prompt"] for r in report["ct"]] == ["hepatic cyst"]
    capsys.readouterr()
    # a prompt nobody cached needs the weights: a one-line error, not a traceback
    assert predict(tmp_path / "ct.nii.gz", tmp_path / "out2", "--prompts", "colon polyp") == 2
    assert "offline: the CLIP text tower cannot be loaded" in capsys.readouterr().err
