"""What a DSM model folder records about its text model: ``dsm_text.json`` (which CLIP text model and weights the
queries were aligned with, written by the Stage 2 trainer) and where its cached prompt embeddings live.

Shared by training (the Stage 2 trainer writes the record) and inference (the predictor and the model export read
it), so neither imports the other. A copy of the record and of the cached prompts also goes into the model folder's
``dataset.json`` (key ``dsm_text``), a file nnU-Net's own ``nnUNetv2_export_model_to_zip`` packs.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from nnunetv2_dsm.io_utils import atomic_write_text
from nnunetv2_dsm.text import PROMPT_CACHE_FORMAT, PROMPT_CACHE_NAME

TEXT_INFO_FILE = "dsm_text.json"  # written by the Stage 2 trainer next to plans.json
DATASET_JSON_KEY = "dsm_text"     # the same record (plus prompt embeddings) inside the model folder's dataset.json


def prompt_cache_files(model_folder: str) -> List[str]:
    """Where cached prompt embeddings are looked up: the model folder's cache (new prompts go there) and the one
    ``nnUNetv2_dsm_embed_prompts -d ... --extra-prompts`` fills in ``$nnUNet_preprocessed/<dataset>`` (if set)."""
    files = [os.path.join(model_folder, PROMPT_CACHE_NAME)]
    pre = os.environ.get("nnUNet_preprocessed")
    plans_file = os.path.join(model_folder, "plans.json")
    if pre and os.path.isfile(plans_file):
        with open(plans_file) as f:
            files.append(os.path.join(pre, json.load(f)["dataset_name"], PROMPT_CACHE_NAME))
    return files


def merged_prompt_cache(files: Sequence[str]) -> Optional[Dict]:
    """The prompt caches in ``files`` (text.py's per-prompt format) merged into one dict (earlier files win for a
    prompt present in several); None if none exists."""
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
    info_file = os.path.join(model_folder, TEXT_INFO_FILE)
    dataset_json_file = os.path.join(model_folder, "dataset.json")
    if not os.path.isfile(info_file) or not os.path.isfile(dataset_json_file):
        return False
    with open(info_file) as f:
        info = json.load(f)
    cache = merged_prompt_cache(prompt_cache_files(model_folder)) or {"entries": {}}
    table = cache["entries"].get(info.get("model"), {}).get(info.get("weights"), {})
    with open(dataset_json_file) as f:
        dataset_json = json.load(f)
    prompts = {k: {"embedding": [float(x) for x in e["embedding"]], "weights_size": e.get("weights_size")}
               for k, e in table.items()}
    dataset_json[DATASET_JSON_KEY] = {**info, "prompts": prompts}
    atomic_write_text(dataset_json_file, json.dumps(dataset_json, indent=1))
    return True


def text_record(model_folder: str) -> Tuple[Dict, Optional[Dict]]:
    """(text record, prompt cache dict in text.py's format or None) of a model folder: ``dsm_text.json`` when
    present, else the ``dsm_text`` entry of its ``dataset.json`` (a model shared with nnU-Net's own exporter)."""
    info_file = os.path.join(model_folder, TEXT_INFO_FILE)
    if os.path.isfile(info_file):
        with open(info_file) as f:
            return json.load(f), None
    dataset_json_file = os.path.join(model_folder, "dataset.json")
    record = {}
    if os.path.isfile(dataset_json_file):
        with open(dataset_json_file) as f:
            record = dict(json.load(f).get(DATASET_JSON_KEY) or {})
    prompts = record.pop("prompts", None)
    if not prompts:
        return record, None
    table = {k: {"embedding": torch.tensor(e["embedding"], dtype=torch.float32), "weights_size": e.get("weights_size")}
             for k, e in prompts.items()}
    return record, {"format": PROMPT_CACHE_FORMAT, "entries": {record.get("model"): {record.get("weights"): table}}}
