"""Sharing a DSM model as nnU-Net does (``nnUNetv2_export_model_to_zip`` / ``nnUNetv2_install_pretrained_model_from_zip``)
with what free-text prompts need at the receiving site.

Two ways: :func:`record_text_in_dataset_json` copies the text record and the model's cached prompt embeddings into
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
import json
import os
import zipfile
from typing import Dict, Optional, Sequence, Tuple

import torch

TEXT_INFO_FILE = "dsm_text.json"  # written by the Stage 2 trainer next to plans.json
DATASET_JSON_KEY = "dsm_text"     # the same record (plus prompt embeddings) inside the model folder's dataset.json


def merged_prompt_cache(files: Sequence[str]) -> Optional[Dict]:
    """The prompt caches in ``files`` (text.py's per-prompt format) merged into one dict (earlier files win for a
    prompt present in several); None if none exists."""
    from nnunetv2_dsm.text import PROMPT_CACHE_FORMAT
    merged: Optional[Dict] = None
    for f in files:
        if not os.path.isfile(f):
            continue
        store = torch.load(f, map_location="cpu", weights_only=True)
        if not isinstance(store, dict) or store.get("format") != PROMPT_CACHE_FORMAT:
            continue
        if merged is None:
            merged = {k: v for k, v in store.items() if k != "entries"}
            merged["entries"] = {}
        for model, by_weights in store.get("entries", {}).items():
            for weights, table in by_weights.items():
                target = merged["entries"].setdefault(model, {}).setdefault(weights, {})
                for prompt, entry in table.items():
                    target.setdefault(prompt, entry)
    return merged


def record_text_in_dataset_json(model_folder: str) -> bool:
    """Copy ``dsm_text.json`` and the cached prompt embeddings of that text model and weights (model folder and
    dataset caches, merged) into ``model_folder/dataset.json`` under ``dsm_text`` ({..record, "prompts": {prompt:
    {"embedding": [512 floats], "weights_size"}}}), atomically. False (nothing written) without ``dsm_text.json``."""
    from nnunetv2_dsm.inference.export import atomic_write_text
    from nnunetv2_dsm.inference.predictor import prompt_cache_files
    info_file, dj_file = os.path.join(model_folder, TEXT_INFO_FILE), os.path.join(model_folder, "dataset.json")
    if not os.path.isfile(info_file) or not os.path.isfile(dj_file):
        return False
    with open(info_file) as f:
        info = json.load(f)
    cache = merged_prompt_cache(prompt_cache_files(model_folder)) or {"entries": {}}
    table = cache["entries"].get(info.get("model"), {}).get(info.get("weights"), {})
    with open(dj_file) as f:
        dj = json.load(f)
    dj[DATASET_JSON_KEY] = {**info, "prompts": {k: {"embedding": [float(x) for x in e["embedding"]],
                                                    "weights_size": e.get("weights_size")} for k, e in table.items()}}
    atomic_write_text(dj_file, json.dumps(dj, indent=1))
    return True


def text_record(model_folder: str) -> Tuple[Dict, Optional[Dict]]:
    """(text record, prompt cache dict in text.py's format or None) of a model folder: ``dsm_text.json`` when
    present, else the ``dsm_text`` entry of its ``dataset.json`` (a model shared with nnU-Net's own exporter)."""
    from nnunetv2_dsm.text import PROMPT_CACHE_FORMAT
    info_file = os.path.join(model_folder, TEXT_INFO_FILE)
    if os.path.isfile(info_file):
        with open(info_file) as f:
            return json.load(f), None
    dj_file = os.path.join(model_folder, "dataset.json")
    record = {}
    if os.path.isfile(dj_file):
        with open(dj_file) as f:
            record = dict(json.load(f).get(DATASET_JSON_KEY) or {})
    prompts = record.pop("prompts", None)
    if not prompts:
        return record, None
    table = {k: {"embedding": torch.tensor(e["embedding"], dtype=torch.float32), "weights_size": e.get("weights_size")}
             for k, e in prompts.items()}
    return record, {"format": PROMPT_CACHE_FORMAT, "entries": {record.get("model"): {record.get("weights"): table}}}


def add_dsm_files(zip_file: str, model_folder: str, results_root: str) -> Sequence[str]:
    """Append the model folder's ``dsm_text.json`` and the merged prompt cache to ``zip_file`` at the paths the
    folder has relative to ``results_root``; returns the archive names added."""
    from nnunetv2_dsm.inference.predictor import prompt_cache_files
    from nnunetv2_dsm.text import PROMPT_CACHE_NAME
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
