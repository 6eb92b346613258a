"""CLIP text embeddings of the DSM class prompts (paper Eq. 20) and of open-vocabulary prompts, with their caches.

DSM aligns its class queries with CLIP text embeddings of ``"a computerized tomography of a {class}"``. The text
tower (the paper's OpenAI CLIP ViT-B/32) and where its weights come from are in :mod:`.clip_model`; its public
names are re-exported here, so ``nnunetv2_dsm.text`` stays the one import path.

Embeddings are computed once and cached, so training and prediction never need the weights:

* dataset cache ``$nnUNet_preprocessed/DatasetXXX_Name/dsm_text_embeddings.pt`` (the dataset's base folder, never a
  configuration folder), written by ``nnUNetv2_dsm_embed_prompts -d ID``: a dict with ``format``, ``model``,
  ``weights`` (``hub:openai`` / ``file:/abs/path`` / ``random(0)``), ``weights_size``, ``trained_weights``,
  ``template``, ``names``, ``prompts``, ``embeddings`` (n, 512) float32, ``torch_version``, ``open_clip_version``,
  ``created``. Read by :func:`load_class_embeddings` (the Stage 2 trainer).
* per-prompt cache ``dsm_prompt_embeddings.pt`` (any folder; the CLI fills the one beside the dataset cache, a
  predictor may also keep one in its model folder): ``{"format", "entries": {model: {weights id: {prompt:
  {"embedding": (512,), "weights_size": int | None}}}}}``. Keys are the full prompt text (whitespace collapsed).

Both are written atomically (:mod:`nnunetv2_dsm.io_utils`: never a partial file; two processes adding prompts at
once may drop one's new entries, which are then recomputed). A cache made for other names, template, model or
weights is a miss. Reading them never imports open_clip.
"""
from __future__ import annotations

import datetime
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from nnunetv2_dsm.io_utils import atomic_open
from nnunetv2_dsm.labels import CLASS_NAMES
from nnunetv2_dsm.text.clip_model import (CLI, DATASET_CACHE_FORMAT, DATASET_CACHE_NAME, DEFAULT_HUB_REPO,
                                          DEFAULT_MODEL, DEFAULT_PRETRAINED, DEFAULT_SEED, PROMPT_CACHE_FORMAT,
                                          PROMPT_CACHE_NAME, PROMPT_TEMPLATE, WEIGHTS_ENV, PathLike,
                                          TextEmbeddingError, TextEncoder, WeightsSource, clear_encoder_memo,
                                          load_text_encoder, no_weights_message, resolve_weights)


def prompt_for(name: str, template: Optional[str] = PROMPT_TEMPLATE) -> str:
    """The CLIP prompt of a class name (paper Eq. 20). ``template=None`` (or ``"{}"``) keeps the text verbatim; a
    text that already starts with the template's fixed part is kept too, and a leading article ("a/an hepatic cyst")
    replaces the template's own, so no prompt reads "of a a ..."."""
    text = " ".join(str(name).split())
    if not template or template == "{}":
        return text
    prefix = template.split("{}")[0]
    if prefix and text.lower().startswith(prefix.strip().lower()):
        return text
    if template.endswith(" a {}") and text.lower().startswith(("a ", "an ")):
        return template[:-len("a {}")] + text
    return template.format(text)


# ----------------------------------------------------------------------------------------------------------- caches
def _atomic_save(obj, path: Path) -> None:
    """``torch.save`` through :func:`nnunetv2_dsm.io_utils.atomic_open`: readers never see a partial file."""
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)


def _load(path: Path, strict: bool = True) -> Optional[dict]:
    """A cache file's dict; None when absent (or unreadable and not ``strict``: it is then rewritten)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as e:
        if not strict:
            return None
        raise TextEmbeddingError(f"{path} is not a readable embedding cache ({e}); delete it and re-run "
                                 f"`{CLI} -d <dataset> --force`") from e
    return obj if isinstance(obj, dict) else None


def _versions() -> Dict[str, str]:
    """The torch and open_clip versions a cache records (open_clip's from its metadata: it is not imported)."""
    try:
        oc = version("open_clip_torch")
    except PackageNotFoundError:
        oc = "unknown"
    return {"torch_version": str(torch.__version__), "open_clip_version": str(oc)}


def _prompt_key(prompt: str) -> str:
    return " ".join(prompt.split())


def _lookup(paths: Sequence[Path], model_name: str, weights: WeightsSource, prompts: Sequence[str]):
    """``{prompt: embedding}`` for the prompts found in the per-prompt caches ``paths`` (first file wins)."""
    found: Dict[str, torch.Tensor] = {}
    for path in paths:
        store = _load(path, strict=False) or {}
        table = store.get("entries", {}).get(model_name, {}).get(weights.id, {})
        for p in prompts:
            e = table.get(_prompt_key(p))
            if p not in found and e is not None and weights.matches(weights.id, e.get("weights_size")):
                found[p] = e["embedding"].float()
    return found


def _store(path: Path, model_name: str, weights: WeightsSource, embeddings: Dict[str, torch.Tensor]) -> None:
    """Add ``embeddings`` to the per-prompt cache ``path`` (rewritten only when something changed)."""
    store = _load(path, strict=False) or {}
    if store.get("format") != PROMPT_CACHE_FORMAT:
        store = {"format": PROMPT_CACHE_FORMAT, "entries": {}}
    table = store["entries"].setdefault(model_name, {}).setdefault(weights.id, {})
    new = {_prompt_key(p): {"embedding": e.detach().float().cpu().clone(), "weights_size": weights.size}
           for p, e in embeddings.items()}
    if all(k in table and torch.equal(table[k]["embedding"], v["embedding"]) for k, v in new.items()):
        return
    table.update(new)
    store.update(_versions())
    _atomic_save(store, path)


def embed_prompts(names: Sequence[str], *, template: Optional[str] = PROMPT_TEMPLATE,
                  model_name: str = DEFAULT_MODEL, clip_weights: Optional[PathLike] = None,
                  random_weights: bool = False, seed: int = DEFAULT_SEED,
                  cache_file: Union[None, PathLike, Sequence[PathLike]] = None,
                  recompute: bool = False) -> torch.Tensor:
    """Embed ``prompt_for(name, template)`` for each name -> (n, D) float32 (D = 512 for ViT-B/32), unit rows,
    in the given order. Weights as in :func:`resolve_weights`. ``cache_file`` (a path, or several: all are read,
    new entries go to the first) is a per-prompt cache: prompts found there need no weights at all."""
    prompts = [prompt_for(n, template) for n in names]
    if not prompts:
        return torch.empty(0, 0)
    weights = resolve_weights(clip_weights, random_weights, seed)
    paths = [Path(cache_file)] if isinstance(cache_file, (str, os.PathLike)) else [Path(p) for p in cache_file or ()]
    found = {} if recompute else _lookup(paths, model_name, weights, prompts)
    missing = list(dict.fromkeys(p for p in prompts if p not in found))
    if missing:
        computed = dict(zip(missing, load_text_encoder(model_name, weights).encode(missing)))
        found.update(computed)
        if paths:
            _store(paths[0], model_name, weights, computed)
    return torch.stack([found[p] for p in prompts]).float()


def dataset_cache_path(dataset_folder: PathLike) -> Path:
    """``<preprocessed dataset folder>/dsm_text_embeddings.pt``."""
    return Path(dataset_folder) / DATASET_CACHE_NAME


def prompt_cache_path(folder: PathLike) -> Path:
    """``<folder>/dsm_prompt_embeddings.pt`` (the preprocessed dataset folder, or a trained model folder)."""
    return Path(folder) / PROMPT_CACHE_NAME


def dataset_folder(dataset: Union[int, str]) -> Path:
    """``$nnUNet_preprocessed/DatasetXXX_Name`` of a dataset id or name, resolved by nnU-Net; raises
    :class:`TextEmbeddingError` for an unknown dataset or a missing preprocessed folder."""
    # lazy: only naming a dataset needs nnU-Net; reading and writing the caches does not
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    if not nnUNet_preprocessed.is_set():
        raise TextEmbeddingError("nnUNet_preprocessed is not set; export it (see nnU-Net's setting_up_paths.md)")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise TextEmbeddingError(f"unknown dataset {dataset!r}: {e}") from e
    folder = Path(os.fspath(nnUNet_preprocessed)) / name
    if not folder.is_dir() and not (nnUNet_raw.is_set() and (Path(os.fspath(nnUNet_raw)) / name).is_dir()):
        raise TextEmbeddingError(f"unknown dataset {dataset!r}: neither {folder} nor $nnUNet_raw/{name} exists")
    if not folder.is_dir():
        raise TextEmbeddingError(f"{folder} does not exist: run `nnUNetv2_plan_and_preprocess -d {dataset}` first, "
                                 f"then `{CLI} -d {dataset}`")
    return folder


def _dataset_cache_matches(cache: Optional[dict], names, template, model_name, weights: WeightsSource) -> bool:
    return bool(cache) and cache.get("format") == DATASET_CACHE_FORMAT and list(cache.get("names", ())) == \
        list(names) and cache.get("template") == template and cache.get("model") == model_name and \
        weights.matches(cache.get("weights"), cache.get("weights_size"))


def build_dataset_cache(dataset_folder: PathLike, *, names: Sequence[str] = CLASS_NAMES,
                        template: str = PROMPT_TEMPLATE, model_name: str = DEFAULT_MODEL,
                        clip_weights: Optional[PathLike] = None, random_weights: bool = False,
                        seed: int = DEFAULT_SEED, extra_prompts: Sequence[str] = (),
                        force: bool = False) -> Tuple[torch.Tensor, dict]:
    """Write (or reuse, when it matches names, template, model and weights) the dataset cache, and put the class
    prompts and ``extra_prompts`` (templated like names) into the per-prompt cache beside it.
    Returns (embeddings (n, D), info) where info = :func:`cache_info` plus ``reused`` and ``prompt_cache``."""
    folder = Path(dataset_folder)
    if (folder.parent / "dataset.json").is_file() and not (folder / "dataset.json").is_file():
        raise ValueError(f"{folder} looks like a configuration folder; pass the dataset's base folder {folder.parent}")
    path, prompts_path = dataset_cache_path(folder), prompt_cache_path(folder)
    weights = resolve_weights(clip_weights, random_weights, seed)
    cache = None if force else _load(path, strict=False)
    reused = _dataset_cache_matches(cache, names, template, model_name, weights)
    if not reused:
        try:
            emb = embed_prompts(names, template=template, model_name=model_name, clip_weights=weights.id,
                                cache_file=prompts_path, recompute=force)
        except TextEmbeddingError as e:
            if not cache:
                raise
            raise TextEmbeddingError(f"{path} holds embeddings for other settings (model {cache.get('model')}, "
                                     f"weights {cache.get('weights')}, {len(cache.get('names', ()))} names) than "
                                     f"asked for (model {model_name}, weights {weights.id}, {len(names)} names), "
                                     f"and recomputing them failed: {e}") from e
        cache = {"format": DATASET_CACHE_FORMAT, "model": model_name, "weights": weights.id,
                 "weights_size": weights.size, "trained_weights": weights.trained, "template": template,
                 "names": list(names), "prompts": [prompt_for(n, template) for n in names], "embeddings": emb,
                 "created": datetime.datetime.now().isoformat(timespec="seconds"), **_versions()}
        _atomic_save(cache, path)
    else:
        _store(prompts_path, model_name, weights, dict(zip(cache["prompts"], cache["embeddings"])))
    if extra_prompts:
        embed_prompts(extra_prompts, template=template, model_name=model_name, clip_weights=weights.id,
                      cache_file=prompts_path, recompute=force)
    return cache["embeddings"].float(), {**cache_info(cache, path), "reused": reused,
                                         "prompt_cache": str(prompts_path)}


def cache_info(cache: dict, path: PathLike) -> dict:
    """The provenance of a dataset cache (everything but the tensor), with a warning for random weights."""
    info = {k: v for k, v in cache.items() if k not in ("embeddings", "names", "prompts", "format")}
    info.update(path=str(path), rows=int(cache["embeddings"].shape[0]), dim=int(cache["embeddings"].shape[1]))
    if not cache.get("trained_weights", False):
        info["warning"] = ("UNTRAINED random CLIP text tower: these embeddings carry no language meaning (tests "
                           "and demos only); open-vocabulary prompts will not work")
    return info


def load_class_embeddings(preprocessed_dataset_folder: PathLike) -> Tuple[torch.Tensor, dict]:
    """The 45 class-prompt embeddings for training: (45, D) float32, row i = ``CLASS_NAMES[i]`` (label order), and
    the cache's provenance (``trained_weights`` False for random weights). Raises :class:`TextEmbeddingError`
    naming the file and the command to create it when the cache is missing or stale."""
    folder = Path(preprocessed_dataset_folder)
    path = dataset_cache_path(folder)
    make = f"`{CLI} -d {folder.name}{{}}` (offline: add --clip-weights FILE; demo only: --random-weights)"
    cache = _load(path)
    if cache is None:
        raise TextEmbeddingError(f"no CLIP class-prompt embeddings at {path}; create them with {make.format('')}")
    problems = []
    if cache.get("format") != DATASET_CACHE_FORMAT:
        problems.append(f"format {cache.get('format')!r} (expected {DATASET_CACHE_FORMAT!r})")
    if list(cache.get("names", ())) != list(CLASS_NAMES):
        problems.append("its rows are not the 45 DSM classes of nnunetv2_dsm.labels.CLASS_NAMES in order")
    if cache.get("template") != PROMPT_TEMPLATE:
        problems.append(f"template {cache.get('template')!r} (expected {PROMPT_TEMPLATE!r})")
    emb = cache.get("embeddings")
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != len(CLASS_NAMES):
        problems.append(f"embeddings of shape {getattr(emb, 'shape', None)}")
    if problems:
        raise TextEmbeddingError(f"stale CLIP embedding cache {path}: {'; '.join(problems)}. Re-create it with "
                                 f"{make.format(' --force')}")
    return emb.float().clone(), cache_info(cache, path)


__all__ = ["CLI", "DATASET_CACHE_FORMAT", "DATASET_CACHE_NAME", "DEFAULT_HUB_REPO", "DEFAULT_MODEL",
           "DEFAULT_PRETRAINED", "DEFAULT_SEED", "PROMPT_CACHE_FORMAT", "PROMPT_CACHE_NAME", "PROMPT_TEMPLATE",
           "WEIGHTS_ENV", "TextEmbeddingError", "TextEncoder", "WeightsSource", "build_dataset_cache", "cache_info",
           "clear_encoder_memo", "dataset_cache_path", "dataset_folder", "embed_prompts", "load_class_embeddings",
           "load_text_encoder", "no_weights_message", "prompt_cache_path", "prompt_for", "resolve_weights"]
