"""The one way this package writes a file: atomically.

Every writer goes through :func:`atomic_target`: the bytes go to a temporary file next to the target (or in
``tmp_dir``, a folder on the same file system that the caller cleans, e.g. the converter's ``.dsm_convert/tmp``),
are flushed to disk (``fsync``) and then moved over the target with ``os.replace``. Readers therefore see the old
file or the new one, never a partial one, and a crash or an exception leaves the target untouched and removes the
temporary file. The temporary name keeps the target's ending (``.nii.gz``, ``.npz``, ``.json``...) because
SimpleITK, nibabel and numpy pick the format from it, and starts with a dot so that a folder listing of
``*.nii.gz`` never picks up a half-written file.

* :func:`atomic_target` -- a temporary path for writers that want a file name (SimpleITK, nibabel, links);
* :func:`atomic_open` -- an open temporary file (``torch.save``, ``np.savez``, csv);
* :func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_save_json` -- the usual payloads.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import IO, Iterator, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

COMPOUND_ENDINGS = (".nii.gz", ".tar.gz")


def _ending(name: str) -> str:
    """The file ending a writer would look at: ``.nii.gz`` for ``x.nii.gz``, ``.json`` for ``x.json``."""
    for ending in COMPOUND_ENDINGS:
        if name.endswith(ending):
            return ending
    return os.path.splitext(name)[1]


def _temporary_name(path: Path, tmp_dir: Optional[Path]) -> Path:
    """A fresh hidden name for ``path``'s temporary file, with ``path``'s ending, in ``tmp_dir`` or next to it.

    Not created here (``os.link`` and ``os.symlink`` need a free name); the process id and a random token keep two
    writers -- processes or threads -- apart."""
    ending = _ending(path.name)
    stem = path.name[: len(path.name) - len(ending)]
    folder = Path(tmp_dir) if tmp_dir is not None else path.parent
    return folder / f".{stem}.{os.getpid()}.{secrets.token_hex(4)}.partial{ending}"


def _fsync_file(path: Path) -> None:
    """Flush a closed file's data to disk (a symbolic link has none of its own)."""
    if path.is_symlink() or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_target(path: PathLike, tmp_dir: Optional[PathLike] = None, fsync: bool = True) -> Iterator[str]:
    """Yield a temporary path (a ``str``, with ``path``'s ending) to write ``path``'s new content to.

    When the block ends without an exception the temporary file is flushed to disk (unless ``fsync`` is False) and
    replaces ``path`` with ``os.replace``; otherwise (exception, ``KeyboardInterrupt``) it is removed and ``path``
    keeps its old content. ``tmp_dir`` must be on ``path``'s file system (``os.replace`` is only atomic there);
    the folders of both are created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path, Path(tmp_dir) if tmp_dir is not None else None)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield str(tmp)
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", tmp_dir: Optional[PathLike] = None,
                **open_kwargs) -> Iterator[IO]:
    """Yield a file opened for writing (``mode`` "wb" or "w") whose content replaces ``path`` when the block ends
    without an exception (see :func:`atomic_target`); ``open_kwargs`` go to :func:`open` (``encoding``,
    ``newline``)."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes a new file: mode must be 'w' or 'wb', not {mode!r}")
    with atomic_target(path, tmp_dir, fsync=False) as tmp:
        with open(tmp, "x" + mode[1:], **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_bytes(path: PathLike, data: bytes, tmp_dir: Optional[PathLike] = None) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb", tmp_dir) as handle:
        handle.write(data)


def atomic_write_text(path: PathLike, text: str, tmp_dir: Optional[PathLike] = None,
                      skip_unchanged: bool = False) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically.

    With ``skip_unchanged`` a file that already holds exactly ``text`` is left alone, mtime included (the
    converter relies on this so that a re-run changes nothing)."""
    data = text.encode("utf-8")
    if skip_unchanged:
        try:
            if Path(path).read_bytes() == data:
                return
        except OSError:
            pass
    atomic_write_bytes(path, data, tmp_dir)


def atomic_save_json(path: PathLike, obj, tmp_dir: Optional[PathLike] = None, indent: Optional[int] = 1,
                     skip_unchanged: bool = False, **dumps_kwargs) -> None:
    """``json.dumps(obj, indent=indent, **dumps_kwargs)`` plus a final newline, written to ``path`` atomically
    (``skip_unchanged`` as in :func:`atomic_write_text`)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n", tmp_dir, skip_unchanged)


__all__ = ["atomic_target", "atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_save_json"]
