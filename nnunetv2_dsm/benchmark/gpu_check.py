"""The GPU check of "training at scale" (run by scripts/gpu_check.sh on one GPU, offline, in minutes):

(a) mamba-ssm kernel = PyTorch scan: outputs and gradients, the scan alone in float32 and the Mamba block under
    autocast float16, at DSM's sequence lengths; plus the time of each (forward + backward);
(b) one Stage 2 training step of the real trainer (``train_step``: autocast + GradScaler) at the 80×160×160
    patch, batch 2, with each backend: finite loss, every gradient finite, the parameters without gradient;
(c) training-step time and peak memory of Stage 2 against ``nnUNetTrainer`` on the same plans, with the kernels
    and with the PyTorch scan, and (d) sliding-window prediction of a 300×512×512 CT against nnU-Net: both by
    the project's benchmark (``python -m nnunetv2_dsm.benchmark``) in subprocesses, one per backend;
(e) ``nnUNet_compile=1``: the Stage 2 network under torch.compile (Inductor), 3 train_steps, no recompiling.

Writes OUT/gpu_check.json and OUT/gpu_check.md (with the issue's targets: step ≤ 1.3×, memory ≤ 1.3×,
prediction ≤ 1.2× nnU-Net, a 512×512×300 CT in < 60 s) and OUT/{kernel,torch}/benchmark.{md,json}. Every
section is guarded: a failure is recorded and the next section runs. ``--budget`` seconds bound the whole run;
the subprocesses get what (a) and (b) leave, in this order: kernel benchmark, compile check, PyTorch-scan
benchmark. ``--dry-run`` runs everything on the CPU at toy sizes (the PyTorch scan stands in for the kernels
when mamba-ssm is absent): it checks the script, not the GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

import torch

from nnunetv2_dsm.benchmark.gpu_report import TARGETS, render_markdown, summarize_benchmark  # noqa: F401
from nnunetv2_dsm.io_utils import atomic_save_json, atomic_write_text
from nnunetv2_dsm.network import ssm_backend

BACKEND_ENV = ssm_backend.BACKEND_ENV
SECTIONS = ("kernels", "train_step", "bench_kernel", "compile", "bench_torch")  # the order they run in


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def guarded(res: Dict, key: str, fn: Callable[[], Dict]) -> None:
    """res[key] = fn(), or {"error": ...} with the traceback in the log: one failing section never stops the rest."""
    started = time.time()
    try:
        res[key] = fn()
    except Exception as e:  # noqa: BLE001 - the report says what failed
        traceback.print_exc()
        res[key] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"}
    res[key]["seconds"] = round(time.time() - started, 1)
    log(f"{key}: {'FAILED ' + res[key]['error'] if 'error' in res[key] else 'done'} ({res[key]['seconds']} s)")


@contextlib.contextmanager
def backend(name: str):
    """$nnUNet_dsm_ssm_backend = name for the duration (read by the network at every scan call)."""
    old = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = old


def row_or_error(fn: Callable[[], Dict], **ident) -> Dict:
    """fn() for one row of a table, or the row's error (with the traceback in the log): the other rows go on."""
    try:
        return {**ident, **fn()}
    except Exception as e:  # noqa: BLE001 - the report says what failed
        traceback.print_exc()
        return {**ident, "error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}",
                "pass": False}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------ (a) kernels vs torch
def load_kernels(dry_run: bool):
    """mamba-ssm's selective_scan_fn and how it was imported. The package import is tried first (what users get);
    if it fails, the interface module is imported without mamba_ssm/__init__ (which pulls in Mamba2/3,
    transformers, triton) so the kernels can still be measured. Dry run without mamba-ssm: the PyTorch scan."""
    try:
        import mamba_ssm  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        return selective_scan_fn, {"import": "package", "version": getattr(mamba_ssm, "__version__", "?")}
    except Exception as e:  # noqa: BLE001
        package_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    import importlib.util
    import types
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        if dry_run:
            from nnunetv2_dsm.network.ssm import selective_scan
            return selective_scan, {"import": "dry run: the PyTorch scan stands in", "package_error": package_error}
        raise RuntimeError(f"mamba_ssm not importable: {package_error}")
    for k in [k for k in sys.modules if k.split(".")[0] == "mamba_ssm"]:
        del sys.modules[k]
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["mamba_ssm"] = pkg
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    return selective_scan_fn, {"import": "interface module only (mamba_ssm/__init__ skipped)",
                               "package_error": package_error}


def _scan_inputs(b: int, d: int, n: int, L: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ins = dict(u=r(b, d, L), delta=0.5 * r(b, d, L), B=r(b, n, L), C=r(b, n, L), z=r(b, d, L), D=r(d),
               delta_bias=r(d) - 2.0)
    ins = {k: v.to(device).requires_grad_() for k, v in ins.items()}
    A = -torch.exp(torch.randn(d, n, generator=g) * 0.5).to(device).requires_grad_()
    return ins, A


def _fwd_bwd(scan, ins, A, timed: bool, device):
    sync(device)
    t = time.perf_counter()
    y = scan(ins["u"], ins["delta"], A, ins["B"], ins["C"], ins["D"], z=ins["z"], delta_bias=ins["delta_bias"],
             delta_softplus=True)
    grads = torch.autograd.grad(y.float().square().mean(), [*ins.values(), A])
    sync(device)
    return y.detach(), grads, (time.perf_counter() - t) if timed else None


def check_kernels(device: torch.device, lengths: Sequence[int], dry_run: bool, d_inner: int = 50,
                  d_state: int = 16, batch: int = 2) -> Dict:
    from nnunetv2_dsm.network.ssm import Mamba, selective_scan
    kernel, how = load_kernels(dry_run)
    out = {"import": how, "scan_fp32": [], "mamba_block_autocast_fp16": [], "tolerance": {"fp32": 1e-3,
                                                                                          "fp16": 2e-2}}
    def scan_row(L: int) -> Dict:
        ins, A = _scan_inputs(batch, d_inner, d_state, L, device)
        runs = {}
        for name, scan in (("kernel", kernel), ("torch", selective_scan)):
            _fwd_bwd(scan, ins, A, False, device)  # warm-up
            runs[name] = _fwd_bwd(scan, ins, A, True, device)
        (yk, gk, tk), (yt, gt, tt) = runs["kernel"], runs["torch"]
        row = dict(output_rel_err=rel(yk, yt), grad_rel_err=max(rel(a, b) for a, b in zip(gk, gt)),
                   kernel_ms=round(tk * 1e3, 2), torch_ms=round(tt * 1e3, 2))
        row["pass"] = row["output_rel_err"] < 1e-3 and row["grad_rel_err"] < 1e-3
        return row

    for L in lengths:
        out["scan_fp32"].append(row_or_error(lambda: scan_row(L), shape_b_d_n_L=[batch, d_inner, d_state, L]))
        log(f"(a) scan fp32 L={L}: {out['scan_fp32'][-1]}")
    # the Mamba block as the network runs it, under autocast fp16, kernels through ssm_backend vs the torch scan
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    def block_row(L: int) -> Dict:
        torch.manual_seed(0)
        block = Mamba(d_inner // 2).to(device)
        x = torch.randn(batch, L, d_inner // 2, device=device)
        results = {}
        for name in ("mamba", "torch"):  # "mamba" forces the kernels: an error here names why they fail
            with backend(name if not (dry_run and name == "mamba") else "auto"):
                block.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=dtype):
                    y = block(x)
                y.float().square().mean().backward()
                results[name] = (y.detach().float(), [p.grad.detach().clone() for p in block.parameters()],
                                 ssm_backend.backend_description(device))
        (yk, gk, dk), (yt, gt, _) = results["mamba"], results["torch"]
        row = {"backend": dk, "output_rel_err": rel(yk, yt), "grad_rel_err": max(rel(a, b) for a, b in zip(gk, gt)),
               "finite": bool(torch.isfinite(yk).all()) and all(bool(torch.isfinite(g).all()) for g in gk)}
        row["pass"] = row["finite"] and row["output_rel_err"] < 2e-2 and row["grad_rel_err"] < 2e-2
        return row

    for L in lengths[:2]:
        out["mamba_block_autocast_fp16"].append(row_or_error(lambda: block_row(L), L=L, autocast=str(dtype)))
        log(f"(a) Mamba block autocast L={L}: {out['mamba_block_autocast_fp16'][-1]}")
    return out


# ------------------------------------------------------------------------------------------ (b) one training step
def check_train_step(device: torch.device, patch: Sequence[int], batch_size: int, tiny: bool) -> Dict:
    from .plans import nnunet_environment, prepare_plans
    from .runner import make_batch, make_trainer
    out = {"patch": list(patch), "batch_size": batch_size}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir, nnunet_environment(workdir):
        args = SimpleNamespace(plans=None, configuration="3d_fullres", tiny=tiny, patch=list(patch),
                               batch_size=batch_size, device=device.type, threads=None, seed=0)
        setup = prepare_plans(args, workdir)
        def step_row() -> Dict:
            tr = make_trainer("dsm_stage2", setup)
            batch = make_batch(tr, setup, 0)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            scale = tr.grad_scaler.get_scale() if tr.grad_scaler is not None else None
            loss = float(tr.train_step(batch)["loss"])
            params = [(n, p) for n, p in tr.network.named_parameters() if p.requires_grad]
            row = {"backend": ssm_backend.backend_description(device), "loss": loss,
                   "loss_finite": bool(torch.isfinite(torch.tensor(loss))),
                   "grads_finite": all(bool(torch.isfinite(p.grad).all()) for _, p in params if p.grad is not None),
                   "params_without_grad": [n for n, p in params if p.grad is None],
                   "grad_scaler": None if scale is None else {"before": scale, "after": tr.grad_scaler.get_scale()},
                   "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                   if device.type == "cuda" else None}
            row["pass"] = row["loss_finite"] and row["grads_finite"] and not row["params_without_grad"]
            return row

        for name in ("mamba", "torch"):  # "mamba": auto (the kernels if they work; the row says what ran)
            with backend("auto" if name == "mamba" else "torch"):
                out[name] = row_or_error(step_row)
            log(f"(b) Stage 2 train_step ({name}): {out[name]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------ nnUNet_compile=1 (item 4)
COMPILE_TAG = "DSM_GPU_CHECK_COMPILE "


def check_compile(device: torch.device, patch: Sequence[int], steps: int = 3) -> Dict:
    """The path of ``nnUNet_compile=1``: the Stage 2 network under torch.compile as nnUNetTrainer.initialize()
    wraps it (Inductor on CUDA; narrow decoders keep its compile time short), ``steps`` real train_steps; the
    graphs Dynamo has compiled after each step (no recompiling: constant after the first) and the step times."""
    import torch._dynamo
    from .plans import nnunet_environment, prepare_plans
    from .runner import make_batch, make_trainer
    counters = torch._dynamo.utils.counters
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir, nnunet_environment(workdir):
        setup = prepare_plans(SimpleNamespace(plans=None, configuration="3d_fullres", tiny=True, patch=list(patch),
                                              batch_size=2, device=device.type, threads=None, seed=0), workdir)
        tr = make_trainer("dsm_stage2", setup)
        tr.network = torch.compile(tr.network, backend="inductor" if device.type == "cuda" else "eager")
        batch = make_batch(tr, setup, 0)
        graphs, seconds, losses = [], [], []
        for _ in range(steps):
            sync(device)
            t = time.perf_counter()
            losses.append(float(tr.train_step(batch)["loss"]))
            sync(device)
            seconds.append(round(time.perf_counter() - t, 3))
            graphs.append(int(counters["stats"]["unique_graphs"]))
    breaks = sorted({reason.splitlines()[0][:120] for reason in counters["graph_break"]})
    return {"patch": list(patch), "graphs_after_each_step": graphs, "step_seconds": seconds, "losses": losses,
            "graph_breaks": breaks, "backend": ssm_backend.backend_description(device),
            "pass": graphs[0] > 0 and len(set(graphs)) == 1 and all(map(math.isfinite, losses))}


def run_compile_check(device: torch.device, patch: Sequence[int], timeout: float) -> Dict:
    """check_compile in a subprocess (a fresh Dynamo cache, and a hang or crash cannot take the report down)."""
    if timeout < 30:
        return {"error": "skipped: no time left in --budget"}
    cmd = [sys.executable, "-m", "nnunetv2_dsm.benchmark.gpu_check", "--compile-only", device.type,
           *map(str, patch)]
    log(f"compile check (≤ {timeout:.0f} s): {' '.join(cmd[1:])}")
    try:
        proc = subprocess.run(cmd, timeout=timeout, stdout=subprocess.PIPE, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (Inductor compiling)"}
    print(proc.stdout, end="", flush=True)
    tagged = [line[len(COMPILE_TAG):] for line in proc.stdout.splitlines() if line.startswith(COMPILE_TAG)]
    return json.loads(tagged[-1]) if tagged else {"error": f"exit code {proc.returncode}, no result"}


# --------------------------------------------------------------------------------- (c), (d) the benchmark runs
def run_benchmark(out_dir: str, backend_name: str, sections: Sequence[str], bench_args: Sequence[str],
                  timeout: float) -> Dict:
    """``python -m nnunetv2_dsm.benchmark`` in a subprocess with $nnUNet_dsm_ssm_backend = backend_name."""
    if timeout < 30:
        return {"error": "skipped: no time left in --budget"}
    cmd = [sys.executable, "-m", "nnunetv2_dsm.benchmark", "--only", *sections, "--networks", "dsm_stage2",
           "-o", out_dir, *bench_args]
    log(f"benchmark ({BACKEND_ENV}={backend_name}, ≤ {timeout:.0f} s): {' '.join(cmd[1:])}")
    env = dict(os.environ, **{BACKEND_ENV: backend_name})
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "partial": _load(out_dir, "benchmark.partial.json")}
    res = _load(out_dir, "benchmark.json")
    if proc.returncode != 0 or res is None:
        return {"error": f"exit code {proc.returncode}", "partial": _load(out_dir, "benchmark.partial.json")}
    return summarize_benchmark(res)


def _load(folder: str, name: str) -> Optional[Dict]:
    try:
        with open(os.path.join(folder, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(prog="python -m nnunetv2_dsm.benchmark.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--out", default="gpu_check_out")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks the script, not the GPU")
    p.add_argument("--budget", type=float, default=400.0,
                   help="seconds for this whole run (default 400): the subprocesses after (a) and (b) (the kernel "
                        "benchmark, the compile check, the PyTorch-scan benchmark) share what (a) and (b) leave")
    p.add_argument("--build-json", help="the build step's result (JSON) to include in the report")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="run these sections only (default: all, in this order); the time shares of --budget apply "
                        "among the chosen subprocess sections, so e.g. `--only compile` gives the compile check "
                        "all of it")
    p.add_argument("--compile-only", nargs="+", metavar=("DEVICE", "PATCH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compile_only:  # the subprocess of run_compile_check
        res = {}
        guarded(res, "compile", lambda: check_compile(torch.device(args.compile_only[0]),
                                                      [int(v) for v in args.compile_only[1:]]))
        print(COMPILE_TAG + json.dumps(res["compile"], default=str), flush=True)
        return res
    started = time.time()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --dry-run on a CPU)")
    patch, batch, volume = ([32, 48, 48], 2, [40, 64, 64]) if args.dry_run else ([80, 160, 160], 2, [300, 512, 512])
    lengths = [300, 2000] if args.dry_run else [500, 4000, 32000]
    os.makedirs(args.out, exist_ok=True)
    res: Dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": args.dry_run,
                 "machine": {"torch": torch.__version__, "cuda": torch.version.cuda,
                             "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}}
    if args.build_json:
        res["build"] = _load(os.path.dirname(args.build_json) or ".", os.path.basename(args.build_json)) or \
            {"error": f"no build result at {args.build_json}"}

    def save():   # after every section: a run cut short by the time limit keeps what it measured
        atomic_save_json(os.path.join(args.out, "gpu_check.json"), res, default=str)
        atomic_write_text(os.path.join(args.out, "gpu_check.md"), render_markdown(res))

    res["sections"] = list(args.only)
    common = ["--device", device.type, "--patch", *map(str, patch), "--batch-size", str(batch),
              "--volume", *map(str, volume), "--reps", "1" if args.dry_run else "3", "--warmup", "1",
              "--predict-reps", "1"] + (["--tiny", "--threads", "1"] if args.dry_run else [])
    deadline = started + args.budget  # priorities: (c)+(d) with the kernels, the compile check, (c) with torch
    def share(key: str, fraction: float = 1.0, cap: float = math.inf) -> float:
        """Seconds for section ``key``: ``fraction`` of what is left (at most ``cap``) when a chosen section follows
        it, else all that is left but 5 s."""
        left = deadline - time.time()
        later = any(k in args.only for k in SECTIONS[SECTIONS.index(key) + 1:])
        return min(cap, left * fraction) if later else left - 5

    runs = {"kernels": lambda: check_kernels(device, lengths, args.dry_run),
            "train_step": lambda: check_train_step(device, patch, batch, tiny=args.dry_run),
            "bench_kernel": lambda: run_benchmark(os.path.join(args.out, "kernel"), "auto",
                                                  ["memory", "step", "predict"], common, share("bench_kernel", 0.6)),
            "compile": lambda: run_compile_check(device, [32, 64, 64] if args.dry_run else [64, 128, 128],
                                                 share("compile", 0.5, cap=180.0)),
            "bench_torch": lambda: run_benchmark(os.path.join(args.out, "torch"), "torch", ["memory", "step"],
                                                 common, share("bench_torch"))}
    for key in SECTIONS:
        if key in args.only:
            guarded(res, key, runs[key])
            save()
    res["wall_seconds"] = round(time.time() - started, 1)
    save()
    print(render_markdown(res), flush=True)
    return res


if __name__ == "__main__":
    main()
