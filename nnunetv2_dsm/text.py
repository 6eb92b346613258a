"""CLIP text embeddings of the DSM class prompts (paper Eq. 20) and of open-vocabulary prompts, with their caches.

DSM aligns its class queries with CLIP text embeddings of ``"a computerized tomography of a {class}"``. The text
tower is the paper's OpenAI CLIP ViT-B/32 (open_clip ``ViT-B-32-quickgelu``, tag ``openai``). Weights come from
(first match wins): ``random_weights=True`` (seeded random init, tests/demos only); ``clip_weights`` (a local
``open_clip_pytorch_model.bin`` / ``.safetensors``, or a recorded source ``"hub:TAG"`` / ``"random(SEED)"``); the
environment variable ``nnUNet_dsm_clip_weights``; else the hub tag (Hugging Face cache first, then a download).

Embeddings are computed once and cached, so training and prediction never need the weights:

* dataset cache ``$nnUNet_preprocessed/DatasetXXX_Name/dsm_text_embeddings.pt`` (the dataset's base folder, never a
  configuration folder), written by ``nnUNetv2_dsm_embed_prompts -d ID``: a dict with ``format``, ``model``,
  ``weights`` (``hub:openai`` / ``file:/abs/path`` / ``random(0)``), ``weights_size``, ``trained_weights``,
  ``template``, ``names``, ``prompts``, ``embeddings`` (n, 512) float32, ``torch_version``, ``open_clip_version``,
  ``created``. Read by :func:`load_class_embeddings` (the Stage 2 trainer).
* per-prompt cache ``dsm_prompt_embeddings.pt`` (any folder; the CLI fills the one beside the dataset cache, a
  predictor may also keep one in its model folder): ``{"format", "entries": {model: {weights id: {prompt:
  {"embedding": (512,), "weights_size": int | None}}}}}``. Keys are the full prompt text (whitespace collapsed).

Both are written atomically (temporary file + ``os.replace``: never a partial file; two processes adding prompts at
once may drop one's new entries, which are then recomputed). A cache made for other names, template, model or
weights is a miss. Reading them never imports open_clip.
"""
from __future__ import annotations

import datetime
import gc
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from nnunetv2_dsm.labels import CLASS_NAMES

PROMPT_TEMPLATE = "a computerized tomography of a {}"
DEFAULT_MODEL = "ViT-B-32-quickgelu"
DEFAULT_PRETRAINED = "openai"
DEFAULT_HUB_REPO = "timm/vit_base_patch32_clip_224.openai"
DEFAULT_SEED = 0
WEIGHTS_ENV = "nnUNet_dsm_clip_weights"
DATASET_CACHE_NAME = "dsm_text_embeddings.pt"
PROMPT_CACHE_NAME = "dsm_prompt_embeddings.pt"
DATASET_CACHE_FORMAT = "nnunetv2_dsm.text_embeddings/1"
PROMPT_CACHE_FORMAT = "nnunetv2_dsm.prompt_embeddings/1"
CLI = "nnUNetv2_dsm_embed_prompts"
PathLike = Union[str, os.PathLike]


class TextEmbeddingError(RuntimeError):
    """CLIP text embeddings are unavailable: no cache and no weights, a stale cache, or an unusable weights file."""


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


@dataclass(frozen=True)
class WeightsSource:
    """Where the CLIP weights come from: ``kind`` is ``"hub"`` (``tag``), ``"file"`` (``path``, ``size``) or
    ``"random"`` (``seed``). ``id`` is what caches record and compare; it is accepted back as ``clip_weights``."""
    kind: str
    tag: Optional[str] = None
    path: Optional[str] = None
    size: Optional[int] = None
    seed: Optional[int] = None

    @property
    def id(self) -> str:
        return {"hub": f"hub:{self.tag}", "file": f"file:{self.path}", "random": f"random({self.seed})"}[self.kind]

    @property
    def trained(self) -> bool:
        return self.kind != "random"

    def matches(self, weights_id: str, size: Optional[int]) -> bool:
        """Same source as a recorded (id, size); a file that is gone here is matched by its path alone."""
        return weights_id == self.id and (self.size is None or size is None or size == self.size)

    def describe(self) -> str:
        if self.kind == "hub":
            return f"hub tag '{self.tag}'"
        if self.kind == "file":
            return f"file {self.path} ({self.size} bytes)" if self.size is not None else f"file {self.path} (missing)"
        return (f"random({self.seed}): UNTRAINED random text tower, for tests and demos only; its embeddings carry "
                f"no language meaning")


def resolve_weights(clip_weights: Optional[PathLike] = None, random_weights: bool = False,
                    seed: int = DEFAULT_SEED) -> WeightsSource:
    """Pick the weights source: ``random_weights`` > ``clip_weights`` (path, ``"hub:TAG"``, ``"random(N)"`` or
    ``"file:PATH"``) > ``$nnUNet_dsm_clip_weights`` > the hub tag ``openai``. Nothing is loaded here."""
    if random_weights:
        return WeightsSource("random", seed=int(seed))
    spec = os.fspath(clip_weights) if clip_weights is not None else os.environ.get(WEIGHTS_ENV) or None
    if spec is None:
        return WeightsSource("hub", tag=DEFAULT_PRETRAINED)
    if spec.startswith("hub:"):
        return WeightsSource("hub", tag=spec[4:])
    if spec.startswith("random(") and spec.endswith(")"):
        return WeightsSource("random", seed=int(spec[7:-1]))
    path = os.path.abspath(os.path.expanduser(spec[5:] if spec.startswith("file:") else spec))
    return WeightsSource("file", path=path, size=os.path.getsize(path) if os.path.isfile(path) else None)


def no_weights_message(model_name: str, weights: WeightsSource, cause: str = "", dataset: str = "ID") -> str:
    """How to get the CLIP weights (or the cached embeddings) when they cannot be loaded here."""
    return (f"cannot load the CLIP text tower {model_name} from {weights.describe()}{': ' + cause if cause else ''}.\n"
            f"Get the embeddings in one of these ways:\n"
            f"  1. on a machine with internet, run once `{CLI} -d {dataset}`: it downloads the OpenAI weights and "
            f"caches the embeddings in $nnUNet_preprocessed/<dataset>/{DATASET_CACHE_NAME} (copy that folder's "
            f"{DATASET_CACHE_NAME} and {PROMPT_CACHE_NAME} here);\n"
            f"  2. download open_clip_pytorch_model.bin (or open_clip_model.safetensors) from "
            f"https://huggingface.co/{DEFAULT_HUB_REPO} and pass `--clip-weights /path/to/file` or set "
            f"{WEIGHTS_ENV}=/path/to/file;\n"
            f"  3. demo/tests only: `--random-weights` embeds with a randomly initialised text tower (fixed seed): "
            f"the embeddings carry no language meaning and a model trained on them cannot follow text prompts.")


class TextEncoder:
    """An open_clip text tower (the visual tower freed) and its tokenizer; :meth:`encode` embeds prompts."""

    def __init__(self, model, tokenizer, model_name: str, weights: WeightsSource):
        self.model, self.tokenizer, self.model_name, self.weights = model, tokenizer, model_name, weights

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Prompts (verbatim) -> (n, D) float32 CPU tensor with L2-normalised rows, in order."""
        out = [self.model.encode_text(self.tokenizer(list(prompts[i:i + batch_size]))).float()
               for i in range(0, len(prompts), batch_size)]
        return F.normalize(torch.cat(out), dim=-1).cpu().contiguous()


_ENCODERS: Dict[tuple, TextEncoder] = {}  # a small memo: building CLIP costs seconds


def _hub_offline() -> bool:
    flags = (os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in ("1", "ON", "YES", "TRUE") for f in flags)


def _hub_checkpoint(open_clip, model_name: str, tag: str) -> Tuple[str, bool]:
    """(local checkpoint, quick_gelu) for a hub tag: the Hugging Face cache if it holds the file, else open_clip's
    download. Fails fast offline (huggingface_hub would retry for ~45 s) with :class:`TextEmbeddingError`."""
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        raise TextEmbeddingError(f"open_clip knows no pretrained tag {tag!r} for {model_name}; tags: "
                                 f"{open_clip.list_pretrained_tags_by_model(model_name)}")
    repo = cfg.get("hf_hub", "").strip("/")
    if repo:
        from huggingface_hub import try_to_load_from_cache
        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            cached = try_to_load_from_cache(repo, filename)
            if isinstance(cached, str) and os.path.isfile(cached):
                return cached, bool(cfg.get("quick_gelu"))
    weights = WeightsSource("hub", tag=tag)
    if _hub_offline():
        raise TextEmbeddingError(no_weights_message(model_name, weights, f"HF_HUB_OFFLINE is set and {repo or tag} "
                                                                         f"is not in the Hugging Face cache"))
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co") if repo else cfg.get("url", "")).hostname
    if not any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        try:  # behind a proxy the host need not resolve locally
            socket.getaddrinfo(host, 443)
        except (OSError, UnicodeError) as e:
            raise TextEmbeddingError(no_weights_message(model_name, weights, f"{host} is unreachable ({e})")) from None
    try:
        return open_clip.download_pretrained(cfg), bool(cfg.get("quick_gelu"))
    except Exception as e:  # huggingface_hub / urllib errors vary by version
        raise TextEmbeddingError(no_weights_message(model_name, weights, f"download failed ({e})")) from e


def load_text_encoder(model_name: str = DEFAULT_MODEL, weights: Optional[WeightsSource] = None) -> TextEncoder:
    """Build the open_clip model with the given weights (default :func:`resolve_weights`), keep its text side.
    Raises :class:`TextEmbeddingError` when the weights cannot be had. Recent encoders are memoised."""
    weights = weights or resolve_weights()
    mtime = os.path.getmtime(weights.path) if weights.kind == "file" and os.path.isfile(weights.path) else None
    key = (model_name, weights, mtime)
    if key in _ENCODERS:
        return _ENCODERS[key]
    if weights.kind == "file" and weights.size is None:
        raise TextEmbeddingError(no_weights_message(model_name, weights, f"no such file: {weights.path}"))
    try:
        import open_clip
    except ImportError as e:
        raise TextEmbeddingError(f"open_clip is not installed ({e}); pip install open-clip-torch") from e
    checkpoint, quick_gelu = (weights.path if weights.kind == "file" else None), False
    if weights.kind == "hub":  # the tag's activation is forced: OpenAI weights need QuickGELU
        checkpoint, quick_gelu = _hub_checkpoint(open_clip, model_name, weights.tag)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(weights.seed or 0)  # random init (and the random part of any build) is reproducible
            model = open_clip.create_model(model_name, pretrained=checkpoint, device="cpu",
                                           force_quick_gelu=quick_gelu)
    except Exception as e:
        raise TextEmbeddingError(
            f"could not build {model_name} from {weights.describe()}: {e}. A weights file must be an open_clip "
            f"state dict of this model (open_clip_pytorch_model.bin or open_clip_model.safetensors from "
            f"https://huggingface.co/{DEFAULT_HUB_REPO} for {DEFAULT_MODEL}), not OpenAI's TorchScript "
            f"ViT-B-32.pt.") from e
    model.visual = None  # only the text tower is needed
    gc.collect()
    model.eval().requires_grad_(False)
    encoder = TextEncoder(model, open_clip.get_tokenizer(model_name), model_name, weights)
    while len(_ENCODERS) >= 2:
        _ENCODERS.pop(next(iter(_ENCODERS)))
    _ENCODERS[key] = encoder
    return encoder


def clear_encoder_memo() -> None:
    """Forget memoised encoders (frees their memory)."""
    _ENCODERS.clear()
    gc.collect()


# ----------------------------------------------------------------------------------------------------------- caches
def _atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the cache from the rest of a group
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    from importlib.metadata import PackageNotFoundError, version
    try:
        oc = version("open_clip_torch")
    except PackageNotFoundError:
        oc = "unknown"
    return {"torch_version": str(torch.__version__), "open_clip_version": str(oc)}


def _prompt_key(prompt: str) -> str:
    return " ".join(prompt.split())


def _lookup(paths: Sequence[Path], model_name: str, weights: WeightsSource, prompts: Sequence[str]):
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
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    if not nnUNet_preprocessed.is_set():
        raise TextEmbeddingError("nnUNet_preprocessed is not set; export it (see nnU-Net's setting_up_paths.md)")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise TextEmbeddingError(f"unknown dataset {dataset!r}: {e}") from e
    folder = Path(os.fspath(nnUNet_preprocessed)) / name
    from nnunetv2.paths import nnUNet_raw
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
