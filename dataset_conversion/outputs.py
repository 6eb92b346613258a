"""What ``nnUNetv2_dsm_convert`` and ``nnUNetv2_dsm_merge`` may touch in their output dataset folder.

* :func:`output_lock`: one run per output folder. A second run on the same folder is refused with a clear message
  instead of wiping the first run's temporary files. The lock is an ``flock`` on ``<dataset>/.dsm_lock``, so the
  kernel releases it when its process ends, even by SIGKILL (no stale lock to remove by hand). The file is
  created once and never written, so a re-run that changes nothing leaves the folder byte- and mtime-identical.
* :class:`WrittenRecord`: the files a command placed in the folder (``<dataset>/<state dir>/written.json``). A
  command deletes or overwrites only files listed there; anything else in its subfolders makes it refuse, naming
  the file. The record is extended *before* a file is placed, so an interrupted run still knows its files.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Set

from nnunetv2_dsm.errors import OutputLockedError
from nnunetv2_dsm.io_utils import atomic_save_json

from .spec import InputError

try:  # POSIX; on other systems runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

LOCK_NAME = ".dsm_lock"


@contextmanager
def output_lock(folder: Path, prog: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if needed) for the ``with`` block; raise
    :class:`OutputLockedError` naming the holder if another process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputLockedError(
                    f"{prog}: {folder} is being written by another nnUNetv2_dsm_convert/merge run; two runs on one "
                    f"dataset would overwrite each other's files. Wait for it to finish, or write to another "
                    f"dataset id (-d).") from None
        yield
    finally:
        os.close(fd)                     # closing the descriptor releases the flock


class WrittenRecord:
    """The set of files (paths relative to the dataset folder) a command wrote, kept in a JSON file."""

    def __init__(self, dataset_dir: Path, state_dir: str):
        self.root = Path(dataset_dir)
        self.path = self.root / state_dir / "written.json"
        self.tmp_dir = self.root / state_dir / "tmp"
        self.names: Set[str] = set()
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, list):
                self.names = {str(n) for n in data}
        except (OSError, ValueError):
            pass                         # no record (a first run, or one that predates it): nothing is owned

    def owns(self, path: Path) -> bool:
        return self.rel(path) in self.names

    def rel(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def save(self, paths: Iterable[Path]) -> None:
        """Replace the record with ``paths`` (atomically)."""
        self.names = {self.rel(p) for p in paths}
        atomic_save_json(self.path, sorted(self.names), self.tmp_dir, indent=0, skip_unchanged=True)


def foreign_entries(folders: Iterable[Path], is_ours) -> list:
    """Entries of ``folders`` that ``is_ours(path)`` does not accept; sub-folders are always foreign (a command
    writes files only). Sorted, for a deterministic message."""
    out = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if (p.is_dir() and not p.is_symlink()) or not is_ours(p):
                out.append(p)
    return out


def refuse_foreign(foreign: list, out: Path, prog: str) -> None:
    """Raise an InputError naming the first foreign entry (see :func:`foreign_entries`), if any."""
    if not foreign:
        return
    first = foreign[0]
    what = "a folder" if first.is_dir() and not first.is_symlink() else "a file"
    more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
    raise InputError(f"{first} is {what} that {prog} did not write{more}; it neither deletes nor overwrites files "
                     f"it did not write. Move it out of {out} (your own cases belong in a dataset of their own) "
                     f"and run again, or choose another dataset id with -d.")
