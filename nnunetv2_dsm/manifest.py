"""Per-case metadata DSM keeps in dataset.json: source dataset, annotated classes, training stage, subset.

Every DSM dataset.json carries one extra top-level key, ``"dsm_manifest"``::

    "dsm_manifest": {
      "format": 1,
      "cases": {
        "BTCV_0001": {"source": "btcv", "annotated": ["Spleen", "Right Kidney", ...], "stage": 1, "subset": "train"},
        "LiTS_0003": {"source": "lits", "annotated": ["Liver", "Liver Tumor"], "stage": 2, "subset": "train"},
        "LiTS_0101": {"source": "lits", "annotated": ["Liver", "Liver Tumor"], "stage": 2, "subset": "test"},
        ...
      }
    }

nnU-Net copies dataset.json verbatim from raw to preprocessed to results, so the trainer sees the manifest as
``self.dataset_json`` and each batch's ``keys`` index it. ``annotated`` decides which of the 45 channels enter the
loss for that case (partial labels); ``stage`` is the first DSM training stage that uses the case (1: organ
datasets, 2: tumor datasets added in Stage 2); ``subset`` is ``train``, ``test`` (held-out seen-tumor test) or
``inference`` (MSD zero-shot set).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from nnunetv2_dsm.labels import NUM_CLASSES, UnknownClassError, class_index, class_name

MANIFEST_KEY = "dsm_manifest"
MANIFEST_FORMAT = 1
SUBSETS = ("train", "test", "inference")

# Paper Table 1: the first training stage of each source dataset. MSD is the zero-shot inference set.
SOURCE_STAGE: Dict[str, Optional[int]] = {
    "btcv": 1, "chaos": 1, "pancreas_ct": 1, "ct_org": 1, "word": 1, "amos": 1, "totalsegmentator": 1,
    "abdomenct1k": 1, "lits": 2, "kits": 2, "msd": None,
}


class ManifestError(ValueError):
    """dataset.json lacks the DSM manifest, or the manifest is malformed. The message names the file and the fix."""


MAX_CASE_ID_LENGTH = 200


def case_id_problem(case_id: object) -> Optional[str]:
    """Why ``case_id`` cannot name nnU-Net files (``<id>_0000.nii.gz``), or None if it can. A case id becomes a file
    name inside the dataset: no path separators, no ``..``, no leading dot, printable characters only, at most
    ``MAX_CASE_ID_LENGTH`` characters."""
    if not isinstance(case_id, str) or not case_id:
        return "it is empty or not a string"
    if "/" in case_id or "\\" in case_id:
        return "it contains a path separator"
    if ".." in case_id:
        return "it contains '..'"
    if case_id.startswith("."):
        return "it starts with '.' (a hidden file)"
    if not case_id.isprintable():
        return "it contains non-printable characters"
    if len(case_id) > MAX_CASE_ID_LENGTH:
        return f"it is longer than {MAX_CASE_ID_LENGTH} characters"
    return None


def validate_case_id(case_id: object, where: str) -> str:
    """``case_id`` if :func:`case_id_problem` finds nothing; else :class:`ManifestError` naming ``where``."""
    problem = case_id_problem(case_id)
    if problem:
        raise ManifestError(f"{where}: case id {case_id!r} is not usable as a file name ({problem}). Case ids may "
                            f"not contain '/', a backslash, '..' or control characters; rename the case.")
    return case_id


@dataclass(frozen=True)
class CaseInfo:
    source: str
    annotated: tuple  # 1-based class indices, sorted
    stage: Optional[int]
    subset: str


def make_entry(source: str, annotated: Iterable[str], stage: Optional[int] = None, subset: str = "train") -> dict:
    """One manifest entry, with class names validated and put in class order. ``stage`` defaults by source."""
    idx = sorted({class_index(n) for n in annotated})
    if stage is None:
        stage = SOURCE_STAGE.get(source)
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    return {"source": source, "annotated": [class_name(i) for i in idx], "stage": stage, "subset": subset}


def make_manifest(entries: Mapping[str, dict]) -> dict:
    return {"format": MANIFEST_FORMAT, "cases": {k: dict(v) for k, v in sorted(entries.items())}}


class Manifest:
    """Validated view of ``dataset_json["dsm_manifest"]``."""

    def __init__(self, cases: Dict[str, CaseInfo], where: str):
        self.cases = cases
        self.where = where

    def __contains__(self, case_id: str) -> bool:
        return case_id in self.cases

    def __getitem__(self, case_id: str) -> CaseInfo:
        try:
            return self.cases[str(case_id)]
        except KeyError:
            raise ManifestError(f"case {case_id!r} is not listed in the DSM manifest of {self.where}. Re-run "
                                f"nnUNetv2_dsm_convert / nnUNetv2_dsm_merge so that every case of imagesTr has an "
                                f"entry under '{MANIFEST_KEY}' -> 'cases'.") from None

    def annotated_mask(self, case_ids: Sequence[str], num_channels: int = NUM_CLASSES) -> np.ndarray:
        """(len(case_ids), num_channels) bool: True where the case annotates that class (channel = index - 1)."""
        mask = np.zeros((len(case_ids), num_channels), dtype=bool)
        for row, case in enumerate(case_ids):
            for idx in self[str(case)].annotated:
                if idx <= num_channels:
                    mask[row, idx - 1] = True
        return mask

    def training_cases(self, stage: int) -> List[str]:
        """Cases of the ``train`` subset whose first stage is <= ``stage`` (Stage 1: organ sources only)."""
        return sorted(k for k, c in self.cases.items()
                      if c.subset == "train" and c.stage is not None and c.stage <= stage)

    def sources(self) -> Dict[str, int]:
        """Number of cases per source."""
        out: Dict[str, int] = {}
        for c in self.cases.values():
            out[c.source] = out.get(c.source, 0) + 1
        return out


def load_manifest(dataset_json: Mapping, where: str = "dataset.json") -> Manifest:
    """Read and validate the manifest of a dataset.json dict. ``where`` names the file in error messages."""
    if MANIFEST_KEY not in dataset_json:
        raise ManifestError(
            f"{where} has no '{MANIFEST_KEY}' key, so DSM cannot tell which classes each case annotates. Create the "
            f"dataset with nnUNetv2_dsm_convert / nnUNetv2_dsm_merge, or add the key yourself (see "
            f"nnunetv2_dsm.manifest for its format), then re-run nnUNetv2_plan_and_preprocess so the preprocessed "
            f"dataset.json gets it too.")
    raw = dataset_json[MANIFEST_KEY]
    if not isinstance(raw, Mapping) or not isinstance(raw.get("cases"), Mapping):
        raise ManifestError(f"'{MANIFEST_KEY}' in {where} must be an object with a 'cases' object")
    if raw.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
        raise ManifestError(f"'{MANIFEST_KEY}' in {where} has format {raw.get('format')!r}; this version of "
                            f"nnunetv2_dsm reads format {MANIFEST_FORMAT}. Re-create it with nnUNetv2_dsm_merge.")
    cases: Dict[str, CaseInfo] = {}
    for case_id, entry in raw["cases"].items():
        validate_case_id(case_id, where)
        try:
            annotated = tuple(sorted({class_index(n) for n in entry["annotated"]}))
            source = str(entry["source"])
        except UnknownClassError as e:
            raise ManifestError(f"{where}: case {case_id!r} lists an unknown annotated class: {e}. Use the names "
                                f"of nnunetv2_dsm.labels.CLASS_NAMES.") from None
        except (KeyError, TypeError):
            raise ManifestError(f"{where}: manifest entry of case {case_id!r} needs 'source' and 'annotated' "
                                f"(a list of class names); got {entry!r}") from None
        subset = entry.get("subset", "train")
        if subset not in SUBSETS:
            raise ManifestError(f"{where}: case {case_id!r} has subset {subset!r}; use one of {SUBSETS}")
        stage = entry.get("stage", SOURCE_STAGE.get(source))
        if stage not in (None, 1, 2):
            raise ManifestError(f"{where}: case {case_id!r} has stage {stage!r}; use 1, 2 or null")
        cases[str(case_id)] = CaseInfo(source, annotated, stage, subset)
    return Manifest(cases, where)
