"""Which CLIP weights the demo embeds its prompts with, and the warning when it has none.

First match wins: the demo's ``--clip-weights PATH``; ``$nnUNet_dsm_clip_weights``; OpenAI's ViT-B/32 already in
the Hugging Face cache (no download is attempted); otherwise a seeded *random* text tower, with a warning saying
what that means for the held-out class.
"""
from __future__ import annotations

import os
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

from nnunetv2_dsm.demo.sources import HELD_OUT_CLASS, HELD_OUT_PROMPT


@dataclass(frozen=True)
class ClipChoice:
    """The weights the demo uses: ``args`` for nnUNetv2_dsm_embed_prompts / _predict, a description, whether
    they are trained, and (for random weights) why no real ones were found."""
    args: List[str]
    weights_id: str
    describe: str
    trained: bool
    notes: List[str] = field(default_factory=list)

    def warning(self, indent: str = "") -> str:
        """The warning printed and reported when the text embeddings are untrained ('' when they are trained)."""
        if self.trained:
            return ""
        text = (f"WARNING: no CLIP weights were found ({'; '.join(self.notes) or 'none given'}), so the demo "
                f"uses an UNTRAINED, randomly initialised CLIP text tower (--random-weights). Its text embeddings "
                f"carry no language meaning: the prompt '{HELD_OUT_PROMPT}' cannot be matched to the model's classes "
                f"by what it means (e.g. to the seen liver and kidney tumors), so the mask it returns for the "
                f"held-out class {HELD_OUT_CLASS} is not a zero-shot result. The zero-shot numbers then reflect only "
                f"the anomaly-prompt path: the class-agnostic anomaly map (AUROC / FPR95 inside the pancreas). For "
                f"real embeddings pass --clip-weights /path/to/open_clip_pytorch_model.bin (OpenAI ViT-B/32) or set "
                f"nnUNet_dsm_clip_weights; the demo then redoes the embeddings and Stage 2 onwards.")
        return "\n".join(textwrap.wrap(text, 110, initial_indent=indent, subsequent_indent=indent + "  ",
                                       break_on_hyphens=False))


def _hub_cached() -> Optional[str]:
    """Path of OpenAI's ViT-B/32 open_clip weights in the Hugging Face cache, or None (never downloads)."""
    try:
        with warnings.catch_warnings():            # open_clip's imports warn about torch.jit deprecations
            warnings.simplefilter("ignore")
            import open_clip
        from huggingface_hub import try_to_load_from_cache
        from nnunetv2_dsm.text import DEFAULT_MODEL, DEFAULT_PRETRAINED
        repo = (open_clip.get_pretrained_cfg(DEFAULT_MODEL, DEFAULT_PRETRAINED) or {}).get("hf_hub", "").strip("/")
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, name) if repo else None
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    except Exception:  # noqa: BLE001 -- any problem here just means "not cached"
        return None
    return None


def choose_clip_weights(clip_weights: Optional[str] = None, use_hub_cache: bool = True) -> ClipChoice:
    """The demo's CLIP weights (see the module docstring). A given path that does not exist is an error."""
    from nnunetv2_dsm.text import DEFAULT_PRETRAINED, WEIGHTS_ENV
    if clip_weights:
        path = os.path.abspath(os.path.expanduser(clip_weights))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--clip-weights {clip_weights}: no such file")
        return ClipChoice(["--clip-weights", path], f"file:{path}", f"file {path} (--clip-weights)", True)
    notes = ["no --clip-weights"]
    env = os.environ.get(WEIGHTS_ENV)
    if env and os.path.isfile(os.path.expanduser(env)):
        path = os.path.abspath(os.path.expanduser(env))
        return ClipChoice(["--clip-weights", path], f"file:{path}", f"file {path} (${WEIGHTS_ENV})", True)
    notes.append(f"${WEIGHTS_ENV} names a missing file: {env}" if env else f"${WEIGHTS_ENV} not set")
    cached = _hub_cached() if use_hub_cache else None
    if cached:
        return ClipChoice(["--clip-weights", f"hub:{DEFAULT_PRETRAINED}"], f"hub:{DEFAULT_PRETRAINED}",
                          f"OpenAI ViT-B/32 from the Hugging Face cache ({cached})", True)
    notes.append("not in the Hugging Face cache")
    return ClipChoice(["--random-weights"], "random(0)", "random (untrained) text tower: --random-weights", False,
                      notes)
