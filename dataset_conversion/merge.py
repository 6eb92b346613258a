"""``nnUNetv2_dsm_merge``: converted single-source datasets -> one DSM dataset with the paper's split.

Split (paper Table 1), reproducible from ``seed``:

* BTCV, LiTS, KiTS: per source, the case ids are sorted, shuffled with ``random.Random("dsm-split:<seed>:<source>")``
  and the first ``round(0.4 * n)`` go to ``train``, the rest to ``test`` (seen-tumour test set);
* MSD: ``inference`` (zero-shot set);
* every other source: ``train``.

Train cases go to imagesTr/labelsTr; test and inference cases to imagesTs/labelsTs (nnU-Net ignores labelsTs).
Every labelled case is listed in the merged manifest with its source, annotated classes, stage and subset; the
split parameters are recorded under ``dsm_split``. Unlabelled test images of the inputs (their imagesTs) are not
merged. Files are hard links to the converted datasets where the filesystem allows, else symlinks, else copies, so
the merge costs (almost) no disk. Re-running is idempotent; files are placed with ``os.replace``.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from nnunetv2_dsm.labels import dataset_json_labels, regions_class_order
from nnunetv2_dsm.manifest import MANIFEST_KEY, ManifestError, SUBSETS, load_manifest, make_entry, make_manifest

from .spec import InputError
from .writer import FILE_ENDING, atomic_write_text, dataset_folder, raw_root

LINK_MODES = ("auto", "hardlink", "symlink", "copy")
SPLIT_SOURCES = ("btcv", "lits", "kits")
INFERENCE_SOURCES = ("msd",)
STATE_DIR = ".dsm_merge"


@dataclass
class MergeSummary:
    """What a merge did: the subset of every case, its source, and how many files were linked or copied."""
    dataset_dir: Path
    subsets: Dict[str, str]                    # case id -> subset
    sources: Dict[str, str]                    # case id -> source
    links: Counter = field(default_factory=Counter)

    def counts(self) -> Dict[str, Counter]:
        out: Dict[str, Counter] = defaultdict(Counter)
        for cid, subset in self.subsets.items():
            out[self.sources[cid]][subset] += 1
        return out

    def table(self) -> str:
        """Per source: cases in train / test / inference."""
        c = self.counts()
        w = max([len(s) for s in c] + [6])
        lines = [f"nnUNetv2_dsm_merge -> {self.dataset_dir}", f"  {'source':<{w}}  " + "  ".join(f"{s:>9}" for s in SUBSETS)]
        lines += [f"  {s:<{w}}  " + "  ".join(f"{c[s][k]:>9}" for k in SUBSETS) for s in sorted(c)]
        lines.append(f"  {'total':<{w}}  " + "  ".join(f"{sum(c[s][k] for s in c):>9}" for k in SUBSETS))
        lines.append("  files: " + ", ".join(f"{n} {m}" for m, n in sorted(self.links.items())) if self.links else
                     "  files: all already in place")
        return "\n".join(lines)


def split_subsets(case_sources: Dict[str, str], seed: int = 0, train_fraction: float = 0.4) -> Dict[str, str]:
    """case id -> "train" | "test" | "inference" (see module docstring)."""
    by_source: Dict[str, List[str]] = defaultdict(list)
    for cid, src in case_sources.items():
        by_source[src].append(cid)
    out = {}
    for src, ids in by_source.items():
        if src in INFERENCE_SOURCES:
            out.update({c: "inference" for c in ids})
        elif src in SPLIT_SOURCES:
            ids = sorted(ids)
            random.Random(f"dsm-split:{seed}:{src}").shuffle(ids)
            n_train = int(math.floor(train_fraction * len(ids) + 0.5))
            out.update({c: ("train" if i < n_train else "test") for i, c in enumerate(ids)})
        else:
            out.update({c: "train" for c in ids})
    return out


def _load_dsm_dataset(folder: Path) -> dict:
    js = folder / "dataset.json"
    if not js.is_file():
        raise InputError(f"{folder} has no dataset.json: finish its conversion first (nnUNetv2_dsm_convert prints "
                         f"why it did not write one).")
    ds = json.loads(js.read_text())
    if ds.get("labels") != dataset_json_labels():
        raise InputError(f"{js} does not use the DSM label space (its 'labels' differ from "
                         f"nnunetv2_dsm.labels.dataset_json_labels()); convert the source with nnUNetv2_dsm_convert.")
    try:
        load_manifest(ds, str(js))
    except ManifestError as e:
        raise InputError(str(e)) from None
    return ds


def resolve_inputs(inputs: Sequence[str], sources: Sequence[str], root: Path) -> List[Path]:
    """Dataset folders from ids, names, paths (``inputs``) and SOURCE names (``sources``)."""
    out: List[Path] = []
    for item in inputs:
        p = Path(item)
        if str(item).isdigit():
            hits = sorted(root.glob(f"Dataset{int(item):03d}_*"))
            if len(hits) != 1:
                raise InputError(f"dataset id {item}: {'no' if not hits else len(hits)} folder(s) Dataset"
                                 f"{int(item):03d}_* in {root}")
            p = hits[0]
        elif not p.is_dir():
            p = root / item
        if not p.is_dir():
            raise InputError(f"input dataset {item!r} not found (neither a folder nor a dataset in {root})")
        out.append(p.resolve())
    for src in sources:
        hits = []
        for js in sorted(root.glob("Dataset*/dataset.json")):
            try:
                if json.loads(js.read_text()).get("dsm_conversion", {}).get("source") == src:
                    hits.append(js.parent.resolve())
            except ValueError:
                continue
        if len(hits) != 1:
            raise InputError(f"--sources {src}: found {len(hits)} converted {src} datasets in {root} "
                             f"({', '.join(h.name for h in hits) or 'none'}); convert it first, or name the dataset "
                             f"with -i.")
        out.append(hits[0])
    if len(set(out)) != len(out):
        raise InputError("the same dataset is given twice")
    return out


def _find(folder: Path, case_id: str, kind: str) -> Path:
    name = f"{case_id}_0000{FILE_ENDING}" if kind == "images" else f"{case_id}{FILE_ENDING}"
    for sub in (f"{kind}Tr", f"{kind}Ts"):
        if (folder / sub / name).is_file():
            return folder / sub / name
    raise InputError(f"{folder}/{kind}Tr/{name} is missing although dataset.json lists case {case_id}; re-run "
                     f"nnUNetv2_dsm_convert for that dataset.")


def place(src: Path, dst: Path, mode: str, tmp_dir: Path) -> Optional[str]:
    """Put ``src`` at ``dst`` as a hard link, symlink or copy (``auto``: the first that works). Returns the method
    used, or None if ``dst`` already is that file."""
    if dst.exists():
        if os.path.samefile(src, dst):
            return None
        if mode == "copy" and dst.stat().st_size == src.stat().st_size and dst.stat().st_mtime >= src.stat().st_mtime:
            return None
    tmp = tmp_dir / f"{os.getpid()}_{dst.name}"
    tmp.unlink(missing_ok=True)
    tries = {"auto": ("hardlink", "symlink", "copy")}.get(mode, (mode,))
    for how in tries:
        try:
            if how == "hardlink":
                os.link(src, tmp)
            elif how == "symlink":
                os.symlink(os.path.abspath(src), tmp)
            else:
                shutil.copy2(src, tmp)
            os.replace(tmp, dst)
            return how
        except OSError:
            tmp.unlink(missing_ok=True)
            if how == tries[-1]:
                raise
    return None


def merge(inputs: Sequence[str], dataset_id: int, sources: Sequence[str] = (), name: str = "DSMUniversal",
          raw_dir=None, seed: int = 0, train_fraction: float = 0.4, link: str = "auto") -> MergeSummary:
    """Merge converted DSM datasets into ``$nnUNet_raw/Dataset{id}_{name}``; returns the summary."""
    if link not in LINK_MODES:
        raise InputError(f"link must be one of {LINK_MODES}")
    if not 0 <= train_fraction <= 1:
        raise InputError("train fraction must be within 0..1")
    root = raw_root(raw_dir)
    out = dataset_folder(root, dataset_id, name)
    folders = resolve_inputs(inputs, sources, root)
    if out.resolve() in folders:
        raise InputError(f"{out} is both an input and the output; choose another -d")
    if not folders:
        raise InputError("nothing to merge: give datasets with -i or --sources")
    entries, files, origin = {}, {}, {}
    for folder in folders:
        ds = _load_dsm_dataset(folder)
        for cid, entry in ds[MANIFEST_KEY]["cases"].items():
            if cid in origin:
                raise InputError(f"case id {cid} is in both {origin[cid].name} and {folder.name}; each source must "
                                 f"be merged once (case ids carry the source prefix).")
            origin[cid] = folder
            entries[cid] = entry
            files[cid] = (_find(folder, cid, "images"), _find(folder, cid, "labels"))
    subsets = split_subsets({c: e["source"] for c, e in entries.items()}, seed, train_fraction)
    if out.is_dir() and any(out.iterdir()):
        js = out / "dataset.json"
        if not js.is_file() or "dsm_merge" not in json.loads(js.read_text()):
            raise InputError(f"{out} exists and is not a dataset written by nnUNetv2_dsm_merge; choose another -d.")
    tmp_dir = out / STATE_DIR / "tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    summary = MergeSummary(out, subsets, {c: e["source"] for c, e in entries.items()})
    wanted = set()
    for cid in sorted(entries):
        tr = "Tr" if subsets[cid] == "train" else "Ts"
        for kind, src in zip(("images", "labels"), files[cid]):
            dst = out / f"{kind}{tr}" / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            wanted.add(dst)
            how = place(src, dst, link, tmp_dir)
            if how:
                summary.links[how] += 1
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):      # from an earlier merge with another split
        for p in (out / sub).iterdir() if (out / sub).is_dir() else ():
            if p not in wanted:
                p.unlink()
    manifest = {c: make_entry(e["source"], e["annotated"], subset=subsets[c]) for c, e in entries.items()}
    counts = {s: dict(sorted(c.items())) for s, c in sorted(summary.counts().items())}
    ds = {
        "channel_names": {"0": "CT"},
        "labels": dataset_json_labels(),
        "regions_class_order": regions_class_order(),
        "numTraining": sum(s == "train" for s in subsets.values()),
        "file_ending": FILE_ENDING,
        "name": name,
        "description": "DSM universal CT dataset merged by nnUNetv2_dsm_merge (25 organs + 20 tumours, partial "
                       "labels per case; see dsm_manifest)",
        MANIFEST_KEY: make_manifest(manifest),
        "dsm_split": {"seed": seed, "train_fraction": train_fraction, "split_sources": list(SPLIT_SOURCES),
                      "inference_sources": list(INFERENCE_SOURCES),
                      "method": "per split source: sort case ids, shuffle with random.Random('dsm-split:<seed>:"
                                "<source>'), first floor(train_fraction*n+0.5) are train, the rest test; inference "
                                "sources are all inference; other sources all train",
                      "counts": counts},
        "dsm_merge": {"inputs": [f.name for f in folders]},
    }
    atomic_write_text(out / "dataset.json", json.dumps(ds, indent=2, sort_keys=False) + "\n", tmp_dir)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return summary
