"""Sharing a DSM model as nnU-Net does (``nnUNetv2_export_model_to_zip`` / ``nnUNetv2_install_pretrained_model_from_zip``)
with what free-text prompts need at the receiving site.

Two ways: ``text.model_record.record_text_in_dataset_json`` copies the text record and the model's cached prompt embeddings into
the model folder's ``dataset.json`` (key ``dsm_text``), a file nnU-Net's own exporter packs, so the stock
``nnUNetv2_export_model_to_zip`` carries them (the predictor reads them back, :func:`text_record`); and
``nnUNetv2_dsm_export_model_to_zip`` (below) adds the files themselves.

nnU-Net's exporter packs a fixed list of files per model folder (checkpoints, plans.json, dataset.json, fingerprint,
progress.png, validation summary). DSM models also need ``dsm_text.json`` (which CLIP text model and weights the
queries are aligned with) and the cached prompt embeddings, so a site without CLIP weights can use the prompts cached
where the model was trained. :func:`export_model_to_zip` runs nnU-Net's exporter and adds, per model folder, the
text record and one prompt cache merged from the model folder's and the dataset's
(``$nnUNet_preprocessed/<dataset>/dsm_prompt_embeddings.pt``, filled by ``nnUNetv2_dsm_embed_prompts
--extra-prompts``). The stock installer unpacks everything into ``$nnUNet_results``, where the predictor finds it.
"""
from __future__ import annotations

import io
import os
import zipfile
from typing import Sequence

import torch

from nnunetv2_dsm.text import PROMPT_CACHE_NAME
from nnunetv2_dsm.text.model_record import TEXT_INFO_FILE, merged_prompt_cache, prompt_cache_files



def add_dsm_files(zip_file: str, model_folder: str, results_root: str) -> Sequence[str]:
    """Append the model folder's ``dsm_text.json`` and the merged prompt cache to ``zip_file`` at the paths the
    folder has relative to ``results_root``; returns the archive names added."""
    rel = os.path.relpath(model_folder, results_root)
    added = []
    with zipfile.ZipFile(zip_file, "a", zipfile.ZIP_DEFLATED) as z:
        info = os.path.join(model_folder, TEXT_INFO_FILE)
        if os.path.isfile(info):
            z.write(info, os.path.join(rel, TEXT_INFO_FILE))
            added.append(os.path.join(rel, TEXT_INFO_FILE))
        cache = merged_prompt_cache(prompt_cache_files(model_folder))
        if cache is not None:
            buf = io.BytesIO()
            torch.save(cache, buf)
            z.writestr(os.path.join(rel, PROMPT_CACHE_NAME), buf.getvalue())
            added.append(os.path.join(rel, PROMPT_CACHE_NAME))
    return added


def export_model_to_zip(dataset: str, output_file: str, configurations: Sequence[str], trainer: str,
                        plans_identifier: str, folds: Sequence, checkpoints: Sequence[str] = ("checkpoint_final.pth",),
                        export_crossval_predictions: bool = False) -> Sequence[str]:
    """nnU-Net's ``export_pretrained_model`` (same arguments) plus :func:`add_dsm_files` for every exported model
    folder; returns the DSM archive names added."""
    from nnunetv2.model_sharing.model_export import export_pretrained_model
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    export_pretrained_model(dataset, output_file, tuple(configurations), trainer, plans_identifier, tuple(folds),
                            strict=True, save_checkpoints=tuple(checkpoints),
                            export_crossval_predictions=export_crossval_predictions)
    added = []
    for c in configurations:
        folder = get_output_folder(dataset, trainer, plans_identifier, c)
        if os.path.isdir(folder):
            added += add_dsm_files(output_file, folder, os.fspath(nnUNet_results))
    return added
