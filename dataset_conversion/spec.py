"""The declarative side of a converter: label maps, case lists, the ``Source`` record and the errors.

A source module (``sources/<name>.py``) declares

* ``LABELS``: a map from the source's label ids (or mask names) to DSM classes, *by name*::

      {1: "Spleen",                        # one organ
       2: "Kidney",                        # a LATERAL_PAIRS key: split into Right/Left Kidney by position
       3: ("Kidney", "Kidney Tumor"),      # organ + tumor: the organ contains its tumor
       4: "Lung Tumor",                    # tumor alone: its host organ is not annotated in this source
       5: None}                            # dropped (written as background, not annotated)

  Every class named in the map is *annotated* for every case of the source (a lateral key annotates both
  sides), whether or not the case contains it.
* ``find_cases(root, notes)``: the files of each case as distributed, and
* the reading quirks it needs (``read_image`` / ``read_label``); :mod:`.readers` has the defaults.

Everything else (alignment, mapping, left/right split, writing, resume, summary) is shared: :mod:`.writer`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from nnunetv2_dsm.errors import UserError
from nnunetv2_dsm.labels import LATERAL_PAIRS, NUM_ORGANS, TUMOR_HOSTS, class_index, class_name

ClassSpec = Union[None, str, Tuple[str, ...]]
LabelMap = Mapping[Union[int, str], ClassSpec]


class ConversionError(UserError):
    """Base class: the message names the offending file and says what to do (a command exits 2 with it)."""


class InputError(ConversionError):
    """The input folder as a whole is unusable (empty, wrong source, duplicate case ids): nothing is written."""


class CaseError(ConversionError):
    """One case cannot be converted (corrupt file, unknown label value, geometry mismatch ...)."""


@dataclass(frozen=True)
class Target:
    """What one source label id becomes: an organ (or a lateral pair key) and/or a tumor."""
    organ: Optional[str] = None
    tumor: Optional[str] = None

    @property
    def lateral(self) -> bool:
        return self.organ in LATERAL_PAIRS

    def classes(self) -> List[str]:
        """The DSM class names this target annotates (a lateral organ annotates both sides)."""
        out = list(LATERAL_PAIRS[self.organ]) if self.lateral else ([self.organ] if self.organ else [])
        return out + ([self.tumor] if self.tumor else [])


def parse_target(spec: ClassSpec, where: str = "label map") -> Optional[Target]:
    """One label-map value -> :class:`Target` (None = dropped). Validates names and tumor hosts."""
    if spec is None:
        return None
    names = (spec,) if isinstance(spec, str) else tuple(spec)
    organ = tumor = None
    for n in names:
        if n in LATERAL_PAIRS or class_index(n) <= NUM_ORGANS:
            if organ is not None:
                raise ValueError(f"{where}: {spec!r} names two organs; a voxel has at most one")
            organ = n if n in LATERAL_PAIRS else _canonical(n)
        else:
            if tumor is not None:
                raise ValueError(f"{where}: {spec!r} names two tumors; a voxel has at most one")
            tumor = _canonical(n)
    if organ and tumor:
        sides = LATERAL_PAIRS[organ] if organ in LATERAL_PAIRS else (organ,)
        if not set(sides) <= set(TUMOR_HOSTS[tumor]):
            raise ValueError(f"{where}: {tumor!r} cannot lie in {organ!r}; its hosts are {TUMOR_HOSTS[tumor]}")
    return Target(organ, tumor)


def _canonical(name: str) -> str:
    return class_name(class_index(name))


def parse_label_map(label_map: LabelMap, where: str = "label map") -> Dict[Union[int, str], Optional[Target]]:
    """Validate a whole label map; keys are kept as given."""
    return {k: parse_target(v, f"{where}[{k!r}]") for k, v in label_map.items()}


def annotated_classes(label_map: LabelMap) -> List[str]:
    """Every DSM class the map labels, in class order."""
    names = {n for t in parse_label_map(label_map).values() if t for n in t.classes()}
    return sorted(names, key=class_index)


@dataclass
class CaseFiles:
    """The files of one case as found in the distributed layout.

    ``image`` is a file, or a list of DICOM files; ``label`` is a file, a list of per-slice files, a
    ``{mask name: file}`` dict, or None for an unlabelled (test) image, which goes to imagesTs.
    ``label_map`` overrides the source's map for this case (MSD task, TotalSegmentator version).
    """
    case_id: str
    image: Union[Path, Sequence[Path]]
    label: object = None
    label_map: Optional[LabelMap] = None
    info: dict = field(default_factory=dict)

    @property
    def test(self) -> bool:
        return self.label is None

    def input_files(self) -> List[Path]:
        """Every input file of the case (for the resume fingerprint and messages)."""
        out: List[Path] = []
        for part in (self.image, self.label):
            if part is None:
                continue
            if isinstance(part, (str, os.PathLike)):
                out.append(Path(part))
            elif isinstance(part, Mapping):
                out.extend(Path(p) for p in part.values())
            else:
                out.extend(Path(p) for p in part)
        return out


class Notes:
    """Warnings and documented skips collected while finding and converting cases (shown in the summary)."""

    def __init__(self):
        self.skipped: List[Tuple[str, str]] = []   # (what, why)
        self.warnings: List[str] = []

    def skip(self, what: Union[str, Path], why: str) -> None:
        self.skipped.append((str(what), why))

    def warn(self, message: str) -> None:
        self.warnings.append(message)


@dataclass(frozen=True)
class Source:
    """One source dataset: its label map, how to find its cases, and its reading quirks."""
    name: str                      # SOURCE on the command line, and "source" in the manifest
    title: str                     # default dataset name: Dataset<ID>_<title>
    labels: LabelMap
    find_cases: Callable[[Path, Notes], List[CaseFiles]]
    looks_like: Callable[[Path], bool]
    expected_layout: str           # shown when no case is found
    read_image: Optional[Callable] = None    # (case) -> SimpleITK image; default readers.read_nifti
    read_label: Optional[Callable] = None    # (case, image, ctx) -> int array on the image grid
    label_grid: str = "same"       # "same": label must share the image grid; "physical": resample into it
    reference: str = ""
    licence: str = ""


# ---------------------------------------------------------------------------------------------------------------
# helpers for find_cases

def walk_files(root: Path) -> Iterable[Path]:
    """All non-junk files below ``root`` (junk folders are not entered), sorted for determinism. Symlinked folders
    are followed once: a link back to a folder already entered (a loop, or a second link to the same folder) is an
    :class:`InputError` naming the link, not a flood of duplicate case ids."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        stat = os.stat(dirpath)
        key = (stat.st_dev, stat.st_ino)
        if key in seen:
            dirnames[:] = []
            raise InputError(f"{dirpath} leads back to {seen[key]} (a symbolic link loop or a second link to the "
                             f"same folder): remove the link ({_first_link(Path(dirpath), Path(root))}) and run "
                             f"again.")
        seen[key] = dirpath
        dirnames[:] = sorted(d for d in dirnames if not (d.startswith(".") or d == "__MACOSX"))
        for f in sorted(filenames):
            if not f.startswith("."):
                yield Path(dirpath) / f


def _first_link(path: Path, root: Path) -> Path:
    """The first symbolic link on the way from ``root`` down to ``path`` (``path`` itself if none is found)."""
    cur = root
    for part in path.relative_to(root).parts:
        cur = cur / part
        if cur.is_symlink():
            return cur
    return path


def match_files(root: Path, pattern: str, files: Optional[Iterable[Path]] = None) -> Dict[str, Path]:
    """``{id: file}`` for files whose *name* fully matches ``pattern`` (first group = id), anywhere below root.

    The same id found twice is an :class:`InputError` naming both files.
    """
    regex = re.compile(pattern)
    found: Dict[str, Path] = {}
    for f in (walk_files(root) if files is None else files):
        match = regex.fullmatch(f.name)
        if match:
            key = match.group(1)
            if key in found:
                raise InputError(f"two files for the same case id {key!r}: {found[key]} and {f}. Remove the "
                                 f"duplicate copy (e.g. an extra unpacked archive) and run again.")
            found[key] = f
    return found


def natural_key(text: str):
    """Sort key that orders embedded numbers numerically (volume-2 before volume-10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text))]


def pair_cases(images: Mapping[str, Path], labels: Mapping[str, Path], notes: Notes, make_id: Callable[[str], str],
               label_required: bool = True) -> List[CaseFiles]:
    """Pair images and labels by id. Image without label: documented skip (or a test case if not required);
    label without image: documented skip."""
    cases = []
    for key in sorted(images, key=natural_key):
        if key in labels:
            cases.append(CaseFiles(make_id(key), images[key], labels[key]))
        elif label_required:
            where = images[key] if isinstance(images[key], (str, os.PathLike)) else Path(images[key][0]).parent
            notes.skip(where, "image without label: not converted (put the label file next to the others if it "
                              "exists)")
        else:
            cases.append(CaseFiles(make_id(key), images[key], None))
    for key in sorted(set(labels) - set(images), key=natural_key):
        notes.skip(labels[key], "label without image: not converted (the image is missing from the download)")
    return cases


def in_folder(files: Iterable[Path], *folders: str) -> List[Path]:
    """Files whose parent folders end with ``folders`` (e.g. ``in_folder(fs, "Training", "img")``)."""
    n = len(folders)
    return [f for f in files if tuple(f.parent.parts[-n:]) == folders]


def any_file(root: Path, pattern: str, limit: int = 20000) -> bool:
    """True if a file whose name fully matches ``pattern`` is among the first ``limit`` files below ``root``."""
    rx = re.compile(pattern)
    for i, f in enumerate(walk_files(root)):
        if i >= limit:
            return False
        if rx.fullmatch(f.name):
            return True
    return False
