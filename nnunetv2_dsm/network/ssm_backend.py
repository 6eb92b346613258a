"""Which selective scan runs: mamba-ssm's CUDA kernels or the pure-PyTorch scan of :mod:`nnunetv2_dsm.network.ssm`.

The kernels are used on CUDA when ``mamba_ssm.ops.selective_scan_interface`` imports, passes a first forward and
backward check against the PyTorch scan on each device, and runs. Any failure on that path (mamba-ssm 2.x imports
its whole package: Mamba2/3, transformers, triton; a build for another GPU; a missing libcudart) falls back to the
PyTorch scan with one warning line on stderr naming the reason; the kernels then stay off for the process.
``$nnUNet_dsm_ssm_backend`` (``auto``, the default; ``mamba``: the kernels or an error; ``torch``) forces a
backend. :func:`backend_description` gives the line the trainers log. :func:`run_scan` is excluded from
torch.compile graphs (``torch.compiler.disable``): the PyTorch scan's Python loops and custom autograd Function,
and the kernels' extension call, would otherwise break the graph or recompile.

mamba_ssm is never imported at module import time (it hard-imports compiled CUDA modules).
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Optional

import torch

BACKEND_ENV = "nnUNet_dsm_ssm_backend"       # auto (default) | mamba | torch
LEGACY_BACKEND_ENV = "NNUNETV2_DSM_SSM_BACKEND"  # the earlier name, still read
BACKENDS = ("auto", "mamba", "torch")
_kernel_failure: Optional[str] = None  # why the mamba-ssm kernels are not used (set once, with the warning)
_probed_devices: set = set()           # CUDA devices on which the kernels passed the first check


def requested_backend() -> str:
    """The backend $nnUNet_dsm_ssm_backend (or the legacy $NNUNETV2_DSM_SSM_BACKEND) asks for: auto (default),
    mamba or torch. Raises ValueError for anything else."""
    value = (os.environ.get(BACKEND_ENV) or os.environ.get(LEGACY_BACKEND_ENV) or "auto").strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def _kernels_failed(reason: str) -> None:
    """Record that the kernels cannot be used: one warning line on stderr (the first time), or an error when
    $nnUNet_dsm_ssm_backend=mamba forces them."""
    global _kernel_failure
    if requested_backend() == "mamba":
        raise RuntimeError(f"{BACKEND_ENV}=mamba but the mamba-ssm kernels cannot be used: {reason}")
    if _kernel_failure is None:
        _kernel_failure = reason
        print(f"WARNING nnunetv2_dsm: mamba-ssm kernels not used ({reason}); using the PyTorch selective scan",
              file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=None)
def _mamba_selective_scan_fn():
    """mamba_ssm's ``selective_scan_fn``, or None (after the warning of :func:`_kernels_failed`) when importing it
    raises anything. Imported lazily on first use and cached."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # ImportError, OSError (libcudart), AttributeError, triton/transformers errors, ...
        _kernels_failed(f"import mamba_ssm failed: {_one_line(e)}")
        return None
    return selective_scan_fn


def scan_backend(x) -> str:
    """Backend for a tensor (or torch.device) ``x``: "mamba_ssm" for CUDA when the kernels import and have not
    failed, unless $nnUNet_dsm_ssm_backend=torch; else "torch" (always on CPU)."""
    device = x if isinstance(x, torch.device) else x.device
    if device.type != "cuda" or requested_backend() == "torch":
        return "torch"
    if _mamba_selective_scan_fn() is None or _kernel_failure is not None:
        if requested_backend() == "mamba":  # forced after an earlier (cached) failure: the same error again
            raise RuntimeError(f"{BACKEND_ENV}=mamba but the mamba-ssm kernels cannot be used: {_kernel_failure}")
        return "torch"
    return "mamba_ssm"


def _probe(fn, device: torch.device) -> None:
    """Forward and backward of the kernels on a small problem, compared with the PyTorch scan; raises when they
    fail or disagree (a build for another GPU architecture, a broken install)."""
    from nnunetv2_dsm.network.ssm import selective_scan
    g = torch.Generator().manual_seed(0)
    b, d, n, L = 2, 8, 4, 67
    shapes = dict(u=(b, d, L), delta=(b, d, L), B=(b, n, L), C=(b, n, L), z=(b, d, L), D=(d,), delta_bias=(d,))
    ins = {k: torch.randn(*v, generator=g).to(device).requires_grad_() for k, v in shapes.items()}
    A = -torch.rand(d, n, generator=g).add(0.5).to(device)
    with torch.autocast(device.type, enabled=False), torch.enable_grad():
        results = []
        for scan in (fn, selective_scan):
            y = scan(ins["u"], ins["delta"], A, ins["B"], ins["C"], ins["D"], z=ins["z"],
                     delta_bias=ins["delta_bias"], delta_softplus=True)
            grads = torch.autograd.grad(y.square().sum(), list(ins.values()))
            results.append(torch.cat([y.detach().flatten()] + [t.flatten() for t in grads]))
    err = float((results[0] - results[1]).norm() / results[1].norm())
    if not err < 1e-3:
        raise RuntimeError(f"kernel output/gradients differ from the PyTorch scan (relative error {err:.2g})")


def _kernels_ready(device: torch.device) -> bool:
    """True when the mamba-ssm kernels are to run on ``device``: selected by :func:`scan_backend` and, on CUDA,
    checked once per device by :func:`_probe`."""
    if _kernel_failure is not None or scan_backend(device) != "mamba_ssm":
        return False
    if device.type == "cuda" and device not in _probed_devices:
        try:
            _probe(_mamba_selective_scan_fn(), device)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:
            _kernels_failed(f"first check on {device} failed: {_one_line(e)}")
            return False
        _probed_devices.add(device)
    return True


def backend_description(device) -> str:
    """One line for the training log: which selective scan runs on ``device`` and why (on CUDA this imports and
    checks the kernels now, so the line is true from the first step)."""
    device = torch.device(device)
    requested = requested_backend()
    if _kernels_ready(device):
        try:
            from importlib.metadata import version
            release = f" {version('mamba-ssm')}"
        except Exception:
            release = ""
        return f"SSM selective scan: mamba-ssm{release} CUDA kernels ({BACKEND_ENV}={requested})"
    if device.type != "cuda":
        why = f"device {device.type}: the mamba-ssm kernels are CUDA-only"
    elif requested == "torch":
        why = f"forced by {BACKEND_ENV}=torch"
    else:
        why = _kernel_failure or "mamba-ssm kernels unavailable"
    return f"SSM selective scan: PyTorch chunked scan ({why})"


@torch.compiler.disable
def run_scan(u, delta, A, B, C, D, z, delta_bias):
    """Mamba.forward's selective scan (delta_softplus on) on the selected backend, in mamba_ssm's layout:
    u, delta, z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d,) → (b, d, l). A kernel call that raises
    falls back to the PyTorch scan (one warning; the kernels stay off), or raises when forced."""
    from nnunetv2_dsm.network.ssm import selective_scan
    if _kernels_ready(u.device):
        try:
            return _mamba_selective_scan_fn()(u, delta, A, B.contiguous(), C.contiguous(),
                                              D if D.dtype == torch.float64 else D.float(), z=z,
                                              delta_bias=delta_bias, delta_softplus=True)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:
            _kernels_failed(f"kernel call failed: {_one_line(e)}")
    return selective_scan(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True)
