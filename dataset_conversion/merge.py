"""``nnUNetv2_dsm_merge``: converted single-source datasets -> one DSM dataset with the paper's split.

Split (paper Table 1), reproducible from ``seed``:

* BTCV, LiTS, KiTS: per source, the case ids are sorted, shuffled with ``random.Random("dsm-split:<seed>:<source>")``
  and the first ``round(0.4 * n)`` go to ``train``, the rest to ``test`` (seen-tumor test set);
* MSD: ``inference`` (zero-shot set);
* every other source: ``train``.

Train cases go to imagesTr/labelsTr; test and inference cases to imagesTs/labelsTs (nnU-Net ignores labelsTs).
Every labelled case is listed in the merged manifest with its source, annotated classes, stage and subset; the
split parameters are recorded under ``dsm_split``. Unlabelled test images of the inputs (their imagesTs) are not
merged. Files are hard links to the converted datasets where the filesystem allows, else symlinks, else copies, so
the merge costs (almost) no disk. Re-running is idempotent; files are placed with ``os.replace``
(:func:`nnunetv2_dsm.io_utils.atomic_target`).

Merge deletes or replaces only files it placed itself (recorded in ``<dataset>/.dsm_merge/written.json``); any other
file or folder in the merged imagesTr/labelsTr/imagesTs/labelsTs makes it refuse, naming it. One run at a time per
output folder (:func:`.outputs.output_lock`). Case ids come from the inputs' manifests, which are validated
(:func:`nnunetv2_dsm.manifest.validate_case_id`: no path separators or ``..``), so no file outside an input dataset
is ever linked.
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

from nnunetv2_dsm.errors import writable_dir
from nnunetv2_dsm.io_utils import atomic_save_json, atomic_target
from nnunetv2_dsm.labels import dataset_json_labels, regions_class_order
from nnunetv2_dsm.manifest import MANIFEST_KEY, ManifestError, SUBSETS, load_manifest, make_entry, make_manifest

from .outputs import WrittenRecord, foreign_entries, output_lock, refuse_foreign
from .spec import InputError
from .writer import FILE_ENDING, dataset_folder, raw_root

LINK_MODES = ("auto", "hardlink", "symlink", "copy")
SPLIT_SOURCES = ("btcv", "lits", "kits")
INFERENCE_SOURCES = ("msd",)
STATE_DIR = ".dsm_merge"
SUBFOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
PROG = "nnUNetv2_dsm_merge"


@dataclass
class MergeSummary:
    """What a merge did: the subset of every case, its source, and how many files were linked or copied."""
    dataset_dir: Path
    subsets: Dict[str, str]                    # case id -> subset
    sources: Dict[str, str]                    # case id -> source
    links: Counter = field(default_factory=Counter)

    def counts(self) -> Dict[str, Counter]:
        """Cases per source and subset."""
        out: Dict[str, Counter] = defaultdict(Counter)
        for cid, subset in self.subsets.items():
            out[self.sources[cid]][subset] += 1
        return out

    def table(self) -> str:
        """Per source: cases in train / test / inference."""
        counts = self.counts()
        width = max([len(s) for s in counts] + [6])
        lines = [f"nnUNetv2_dsm_merge -> {self.dataset_dir}",
                 f"  {'source':<{width}}  " + "  ".join(f"{s:>9}" for s in SUBSETS)]
        lines += [f"  {s:<{width}}  " + "  ".join(f"{counts[s][k]:>9}" for k in SUBSETS) for s in sorted(counts)]
        lines.append(f"  {'total':<{width}}  "
                     + "  ".join(f"{sum(counts[s][k] for s in counts):>9}" for k in SUBSETS))
        lines.append("  files: " + ", ".join(f"{count} {how}" for how, count in sorted(self.links.items()))
                     if self.links else "  files: all already in place")
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


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; a truncated or non-object file is an :class:`InputError` naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); it is truncated or damaged. Re-create it (re-run the "
                         f"command that wrote it).") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a JSON {type(data).__name__}, not an object; it is not an nnU-Net "
                         f"dataset.json. Re-create it (re-run the command that wrote it).")
    return data


def _load_dsm_dataset(folder: Path) -> dict:
    """An input's dataset.json, checked: present, in the DSM label space, with a valid manifest."""
    js = folder / "dataset.json"
    if not js.is_file():
        raise InputError(f"{folder} has no dataset.json: finish its conversion first (nnUNetv2_dsm_convert prints "
                         f"why it did not write one).")
    ds = read_json_object(js)
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
                conversion = read_json_object(js).get("dsm_conversion")
            except InputError:
                continue                          # not a usable dataset: cannot be the one asked for
            if isinstance(conversion, dict) and conversion.get("source") == src:
                hits.append(js.parent.resolve())
        if len(hits) != 1:
            raise InputError(f"--sources {src}: found {len(hits)} converted {src} datasets in {root} "
                             f"({', '.join(h.name for h in hits) or 'none'}); convert it first, or name the dataset "
                             f"with -i.")
        out.append(hits[0])
    if len(set(out)) != len(out):
        raise InputError("the same dataset is given twice")
    return out


def _find(folder: Path, case_id: str, kind: str) -> Path:
    """A case's image or label file (``kind`` "images" or "labels") in the Tr or Ts folder of an input."""
    name = f"{case_id}_0000{FILE_ENDING}" if kind == "images" else f"{case_id}{FILE_ENDING}"
    for sub in (f"{kind}Tr", f"{kind}Ts"):
        if (folder / sub / name).is_file():
            return folder / sub / name
    raise InputError(f"{folder}/{kind}Tr/{name} is missing although dataset.json lists case {case_id}; re-run "
                     f"nnUNetv2_dsm_convert for that dataset.")


_PLACERS = {"hardlink": os.link,
            "symlink": lambda src, tmp: os.symlink(os.path.abspath(src), tmp),
            "copy": shutil.copy2}


def place(src: Path, dst: Path, mode: str, tmp_dir: Path) -> Optional[str]:
    """Put ``src`` at ``dst`` as a hard link, symlink or copy (``auto``: the first that works). Returns the method
    used, or None if ``dst`` already is that file."""
    if dst.exists():
        if os.path.samefile(src, dst):
            return None
        if mode == "copy" and dst.stat().st_size == src.stat().st_size and dst.stat().st_mtime >= src.stat().st_mtime:
            return None
    tries = {"auto": ("hardlink", "symlink", "copy")}.get(mode, (mode,))
    for how in tries:
        try:
            with atomic_target(dst, tmp_dir, fsync=how == "copy") as tmp:
                _PLACERS[how](src, tmp)
            return how
        except OSError:
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
    root = writable_dir(raw_root(raw_dir), "-o")
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
    wanted: Dict[Path, Path] = {}                                  # destination -> source file
    for cid in sorted(entries):
        half = "Tr" if subsets[cid] == "train" else "Ts"
        for kind, src in zip(("images", "labels"), files[cid]):
            wanted[out / f"{kind}{half}" / src.name] = src
    summary = MergeSummary(out, subsets, {c: e["source"] for c, e in entries.items()})
    with output_lock(out, PROG):
        _place_all(out, wanted, link, summary)
        _write_merged_json(out, name, folders, entries, subsets, summary, seed, train_fraction)
    return summary


def _check_ours(out: Path, record: WrittenRecord, wanted: Dict[Path, Path]) -> set:
    """Refuse (naming it) any file in the output that an earlier merge did not place: merge deletes and replaces
    only its own files. Returns the files that are its own: those in its record, and links to the input file of
    the same name (a merge written before the record existed; removing such a link loses nothing)."""
    visible = [p for p in out.iterdir() if not p.name.startswith(".")]
    js = out / "dataset.json"
    if js.is_file():
        mine = "dsm_merge" in read_json_object(js)
    else:
        mine = bool(record.names)                  # an interrupted merge: its record names its files
    if visible and not mine:
        raise InputError(f"{out} exists and is not a dataset written by {PROG} (no dataset.json with 'dsm_merge'); "
                         f"choose another -d.")

    by_name = {dst.name: src for dst, src in wanted.items()}
    subfolders = [out / s for s in SUBFOLDERS]

    def ours(p: Path) -> bool:
        if record.owns(p):
            return True
        try:
            return p.name in by_name and os.path.samefile(p, by_name[p.name])
        except OSError:
            return False
    refuse_foreign(foreign_entries(subfolders, ours), out, PROG)
    return {p for d in subfolders if d.is_dir() for p in d.iterdir()}


def _place_all(out: Path, wanted: Dict[Path, Path], link: str, summary: MergeSummary) -> None:
    """Place every wanted file and remove the files of an earlier merge that this one does not place."""
    record = WrittenRecord(out, STATE_DIR)
    previous = _check_ours(out, record, wanted) | {out / n for n in record.names}
    tmp_dir = out / STATE_DIR / "tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    record.save(previous | set(wanted))                      # claimed before placing: an interruption keeps them ours
    for dst, src in wanted.items():
        dst.parent.mkdir(parents=True, exist_ok=True)
        how = place(src, dst, link, tmp_dir)
        if how:
            summary.links[how] += 1
    for p in sorted(previous - set(wanted)):                 # ours, from an earlier merge with another split
        p.unlink(missing_ok=True)
    record.save(wanted)
    shutil.rmtree(tmp_dir, ignore_errors=True)


def _write_merged_json(out: Path, name: str, folders: List[Path], entries: dict, subsets: Dict[str, str],
                       summary: MergeSummary, seed: int, train_fraction: float) -> None:
    """The merged dataset.json: labels, the merged manifest and the split record."""
    manifest = {c: make_entry(e["source"], e["annotated"], subset=subsets[c]) for c, e in entries.items()}
    counts = {s: dict(sorted(c.items())) for s, c in sorted(summary.counts().items())}
    ds = {
        "channel_names": {"0": "CT"},
        "labels": dataset_json_labels(),
        "regions_class_order": regions_class_order(),
        "numTraining": sum(s == "train" for s in subsets.values()),
        "file_ending": FILE_ENDING,
        "name": name,
        "description": "DSM universal CT dataset merged by nnUNetv2_dsm_merge (25 organs + 20 tumors, partial "
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
    atomic_save_json(out / "dataset.json", ds, out / STATE_DIR / "tmp", indent=2, skip_unchanged=True)
    shutil.rmtree(out / STATE_DIR / "tmp", ignore_errors=True)
