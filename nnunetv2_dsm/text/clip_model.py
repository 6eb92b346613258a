"""The CLIP text tower behind :mod:`nnunetv2_dsm.text`: where its weights come from and how it is built.

The paper's OpenAI CLIP ViT-B/32 (open_clip ``ViT-B-32-quickgelu``, tag ``openai``). Weights come from (first match
wins): ``random_weights=True`` (seeded random init, tests/demos only); ``clip_weights`` (a local
``open_clip_pytorch_model.bin`` / ``.safetensors``, or a recorded source ``"hub:TAG"`` / ``"random(SEED)"``); the
environment variable ``nnUNet_dsm_clip_weights``; else the hub tag (Hugging Face cache first, then a download).
open_clip is imported only when a tower is built (:func:`load_text_encoder`): reading the caches never needs it.
"""
from __future__ import annotations

import gc
import os
import socket
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

PROMPT_TEMPLATE = "a computerized tomography of a {}"
DEFAULT_MODEL = "ViT-B-32-quickgelu"
DEFAULT_PRETRAINED = "openai"
DEFAULT_HUB_REPO = "timm/vit_base_patch32_clip_224.openai"
DEFAULT_SEED = 0
WEIGHTS_ENV = "nnUNet_dsm_clip_weights"
# the caches' names and formats (:mod:`nnunetv2_dsm.text`), here because no_weights_message names them
DATASET_CACHE_NAME = "dsm_text_embeddings.pt"
PROMPT_CACHE_NAME = "dsm_prompt_embeddings.pt"
DATASET_CACHE_FORMAT = "nnunetv2_dsm.text_embeddings/1"
PROMPT_CACHE_FORMAT = "nnunetv2_dsm.prompt_embeddings/1"
CLI = "nnUNetv2_dsm_embed_prompts"
PathLike = Union[str, os.PathLike]


class TextEmbeddingError(RuntimeError):
    """CLIP text embeddings are unavailable: no cache and no weights, a stale cache, or an unusable weights file."""


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
        """The source in words, for messages."""
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
        from huggingface_hub import try_to_load_from_cache  # lazy: installed with open_clip, needed for hub tags
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
        import open_clip  # lazy: optional and slow to import; cached embeddings never need it
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
