"""Loading nnU-Net checkpoints without running code from them.

A ``.pth`` file is a pickle: ``torch.load(weights_only=False)`` (what nnU-Net itself uses) runs whatever a crafted
file asks for. :func:`load_checkpoint` loads with ``weights_only=True`` instead, which rebuilds only tensors and
plain containers, plus the few numpy objects nnU-Net v2.8 checkpoints really hold:

* ``network_weights`` / ``optimizer_state`` / ``grad_scaler_state``: tensors, dicts, lists, numbers;
* ``logging``: lists of Python and numpy floats (``np.float64`` from ``np.nanmean``) and numpy arrays;
* ``_best_ema``: a numpy float; ``init_args``: plans and dataset.json dicts, strings, ints, a ``torch.device``;
* ``trainer_name`` and ``inference_allowed_mirroring_axes``.

The allow-list is :func:`numpy_globals`: numpy's scalar and array reconstructors and ``numpy.dtype`` (under the
numpy 1 and numpy 2 module names), none of which calls anything but numpy's own constructors. A file that needs
anything else is refused, naming the objects; a truncated or non-checkpoint file is refused naming the file.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import List, Union

from nnunetv2_dsm.errors import UserError


class CheckpointError(UserError):
    """A checkpoint file that cannot be loaded safely: the message names the file and the fix."""


def numpy_globals() -> List:
    """``torch.serialization.safe_globals`` entries for the numpy objects found in nnU-Net checkpoints."""
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    scalar, reconstruct = core.multiarray.scalar, core.multiarray._reconstruct
    out: List = [np.dtype, np.ndarray, scalar, reconstruct,
                 (scalar, "numpy.core.multiarray.scalar"), (reconstruct, "numpy.core.multiarray._reconstruct"),
                 (scalar, "numpy._core.multiarray.scalar"), (reconstruct, "numpy._core.multiarray._reconstruct")]
    out += sorted({type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"}, key=lambda t: t.__name__)  # numpy.dtypes.*DType
    return out


def load_checkpoint(path: Union[str, os.PathLike], what: str = "checkpoint") -> dict:
    """The checkpoint dict in ``path``, loaded with ``weights_only=True`` and the numpy allow-list, on the CPU.
    It must hold ``network_weights`` (a dict of tensors). Raises :class:`CheckpointError` otherwise."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist or is not a file")
    try:
        with torch.serialization.safe_globals(numpy_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds for a damaged file (RuntimeError, KeyError, EOFError...)
        unsafe = _unsafe_globals(path) if isinstance(e, pickle.UnpicklingError) else ""
        if unsafe:
            raise CheckpointError(f"{what} {path} holds Python objects other than tensors, numbers, strings and "
                                  f"numpy values ({unsafe}); it is not loaded because unpickling them could run "
                                  f"code. Use a checkpoint written by nnU-Net training, or re-save only its "
                                  f"tensors.") from None
        raise CheckpointError(f"{what} {path} is truncated or not a PyTorch checkpoint ({_first_line(e)}); copy it "
                              f"again, or train again to re-create it.") from None
    weights = ckpt.get("network_weights") if isinstance(ckpt, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{what} {path} is not an nnU-Net checkpoint (no 'network_weights' dict of tensors); "
                              f"point to a checkpoint_final.pth written by nnU-Net training.")
    return ckpt


def _unsafe_globals(path: Path) -> str:
    """The globals of ``path`` outside the allow-list, for the message (empty if torch cannot tell)."""
    import torch
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # an old torch, or a file torch cannot even list
        return ""
    allowed = {f"{g.__module__}.{g.__qualname__}" if not isinstance(g, tuple) else g[1] for g in numpy_globals()}
    return ", ".join(g for g in found if g not in allowed)[:300]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0].split(". ")[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
