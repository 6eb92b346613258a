"""The error contract of every ``nnUNetv2_dsm_*`` command.

* bad input or a bad path: exit 2 and one line ``<prog>: error: <what, which file, the fix>`` on stderr, no
  traceback (set ``NNUNETV2_DSM_DEBUG=1`` or pass ``--debug`` to see it);
* documented partial failures (some cases failed, the rest were written): exit 1;
* Ctrl-C: exit 130.

Commands raise :class:`UserError` (or a subclass) for bad input and wrap their ``main`` in :func:`cli_entry`. An
``OSError`` that reaches the wrapper (an output path that is a file, a read-only folder, a full disk) is a bad path
too: exit 2 with the file and the system's reason. :func:`writable_dir` checks an output folder up front.
"""
from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

EXIT_USER_ERROR = 2
EXIT_PARTIAL_FAILURE = 1
EXIT_INTERRUPTED = 130
DEBUG_ENV = "NNUNETV2_DSM_DEBUG"


class UserError(Exception):
    """Bad input or a bad path: the message names the file and the fix; the command exits 2 without a traceback."""


class OutputLockedError(UserError):
    """Another process is writing to the same output folder."""


def writable_dir(path, flag: str = "-o") -> Path:
    """Create ``path`` (and its parents) if needed and check that files can be created in it; returns it as a
    ``Path``. A path that is a file, lies below a file, or is read-only is a :class:`UserError` naming it."""
    p = Path(os.fspath(path))
    blocker = next((q for q in (p, *p.parents) if q.exists() and not q.is_dir()), None)
    if blocker is not None:
        raise UserError(f"output folder {p} cannot be created: {blocker} is a file. Pass another {flag} (or move "
                        f"the file away).")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {p}: {e.strerror}. Pass a writable {flag}.") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"output folder {p} is not writable. Fix its permissions or pass another {flag}.")
    return p


def os_error_line(e: OSError) -> str:
    """An ``OSError`` as one line naming the file(s): the fix is about the path."""
    files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or type(e).__name__
    return (f"{what}: {files}" if files else f"{what}: {e}") + ". Check the path and its permissions, or pass " \
        "another path."


def debug_requested(argv: Optional[Sequence[str]] = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def one_line(message: object) -> str:
    """The message on one line (newlines folded), so a shell log keeps one error per line."""
    return " ".join(str(message).split())


def cli_entry(prog: str, user_errors=()) -> Callable:
    """Decorator for a command's ``main(argv=None)``: maps :class:`UserError` (and ``user_errors``, e.g. a module's
    own exception classes, or a function returning them so heavy modules are imported only when the command runs)
    and ``OSError`` to exit 2 with one line, KeyboardInterrupt to 130; returns main's int (or 0)."""

    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(argv: Optional[Sequence[str]] = None) -> int:
            caught = (UserError, *(user_errors() if callable(user_errors) else user_errors))
            try:
                code = main(argv)
                return 0 if code is None else int(code)
            except caught as e:
                if debug_requested(argv):
                    traceback.print_exc()
                print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
                return EXIT_USER_ERROR
            except OSError as e:                      # a bad path met while writing: still one line
                if debug_requested(argv):
                    traceback.print_exc()
                print(f"{prog}: error: {one_line(os_error_line(e))}", file=sys.stderr)
                return EXIT_USER_ERROR
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return EXIT_INTERRUPTED
        return run
    return wrap
