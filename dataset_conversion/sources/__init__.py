"""Registry of the source datasets: ``SOURCES[name]`` is each module's ``SOURCE``."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from ..spec import InputError, Source
from . import abdomenct1k, amos, btcv, chaos, ct_org, kits, lits, msd, pancreas_ct, totalsegmentator, word

SOURCES: Dict[str, Source] = {module.SOURCE.name: module.SOURCE for module in (
    btcv, chaos, pancreas_ct, ct_org, word, amos, totalsegmentator, abdomenct1k, lits, kits, msd)}


def get_source(name: str) -> Source:
    """The :class:`~..spec.Source` registered as ``name`` (case-insensitive, '-' or '_')."""
    key = name.lower().replace("-", "_")
    if key not in SOURCES:
        raise InputError(f"unknown SOURCE {name!r}; use one of: {', '.join(SOURCES)}")
    return SOURCES[key]


def guess_sources(root: Path) -> List[str]:
    """Names of the sources whose distributed layout ``root`` looks like (cheap file-name checks)."""
    out = []
    for name, src in SOURCES.items():
        try:
            if src.looks_like(Path(root)):
                out.append(name)
        except OSError:
            pass
    return out
