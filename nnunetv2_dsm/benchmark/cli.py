"""The command line (``build_parser``) and ``main``: runs the sections, checkpoints after each, writes
OUT/benchmark.json and OUT/benchmark.md. ``--memory-worker`` is the subprocess entry point of the memory section."""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch

from nnunetv2_dsm.io_utils import atomic_save_json, atomic_write_text

from .memory import bench_memory, memory_worker
from .plans import (DEFAULT_SSM_SIZES, LABELS, NETWORKS, SECTIONS, log, machine_info, nnunet_environment,
                    plans_summary, prepare_plans)
from .predict import bench_predict, default_volume
from .profiling import profile_stage2
from .report import evaluate_targets, render_markdown
from .steps import bench_ssm, bench_step, stage2_ssm_shapes

PARTIAL = "benchmark.partial.json"


# ----------------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command line (scripts/benchmark.py, python -m nnunetv2_dsm.benchmark)."""
    parser = argparse.ArgumentParser(
        prog="benchmark.py",
        description="DSM Stage 1/2 against nnU-Net's default network on the same plans: training step, peak "
                    "memory, sliding-window prediction, the SSM alone. Writes OUT_DIR/benchmark.md and "
                    "OUT_DIR/benchmark.json.")
    parser.add_argument("--plans", help="an nnU-Net plans file (default: realistic plans made by nnU-Net's "
                                        "ExperimentPlanner for a synthetic abdominal CT dataset)")
    parser.add_argument("-c", "--configuration", default="3d_fullres", help="configuration of the plans (3d_fullres)")
    parser.add_argument("--patch", type=int, nargs="+", help="patch size override; the topology is re-planned for it")
    parser.add_argument("--batch-size", type=int, help="batch size override")
    parser.add_argument("--volume", type=int, nargs="+",
                        help="prediction volume in the plans' axis order (default: 256×256 in-plane × 160 along the "
                             "axis of largest spacing, i.e. a 256×256×160 CT)")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--predict-reps", type=int,
                        help="timed prediction rounds (default: --reps; one volume takes minutes on a CPU)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                        help=f"run only these sections of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--tiny", action="store_true",
                        help="narrow U-Net and DSM decoders (tests, smoke runs; not for comparisons)")
    parser.add_argument("--mirroring", action="store_true", help="mirroring test-time augmentation in prediction")
    parser.add_argument("--ssm-sizes", type=int, nargs="+", default=list(DEFAULT_SSM_SIZES),
                        help="edge lengths s of the (2, 25, s, s, s) SSM inputs (default 6 12 24 48)")
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS),
                        help="networks to run (nnunet is always included: ratios refer to it)")
    parser.add_argument("-o", "--out", default="benchmark_out", help="output folder (benchmark.md, benchmark.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-worker", nargs=2, metavar=("NETWORK", "SETUP_JSON"), help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the benchmark (or, with ``--memory-worker``, one memory measurement) and write OUT/benchmark.json and
    OUT/benchmark.md; returns the results."""
    args = build_parser().parse_args(argv)
    if args.memory_worker:
        memory_worker(*args.memory_worker)
        return {}
    _check_args(args)
    sections = list(args.only or SECTIONS)
    names = ["nnunet"] + [n for n in NETWORKS[1:] if n in args.networks]
    started = time.time()
    workdir = tempfile.mkdtemp(prefix="dsm_benchmark_")
    res: Dict = {}
    try:
        with nnunet_environment(workdir):
            setup = _prepare(args, workdir, res, sections, names, started)
            _run_sections(args, setup, workdir, res, sections, names)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["settings"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    res["settings"]["wall_seconds"] = time.time() - started
    res["targets"] = evaluate_targets(res)
    md = _write_results(res, args.out)
    print(md, flush=True)
    return res


def _check_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot run (no CUDA device, non-positive repetitions); apply ``--threads``."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reps < 1 or args.warmup < 0:
        raise SystemExit("--reps must be >= 1 and --warmup >= 0")


def _prepare(args: argparse.Namespace, workdir: str, res: Dict, sections: List[str], names: List[str],
             started: float) -> Dict:
    """Make (or read) the plans and record the machine, the plans and the settings in ``res``; returns the setup
    the sections run on."""
    log(f"plans: {'reading ' + args.plans if args.plans else 'planning the synthetic abdominal CT dataset'}")
    setup = prepare_plans(args, workdir)
    res["machine"] = machine_info(args.device)
    res["plans"] = plans = plans_summary(setup)
    log(f"plans: {setup['configuration']} patch {plans['patch_size']} batch {plans['batch_size']} "
        f"{plans['n_stages']} stages features {plans['features_per_stage']}")
    volume = list(args.volume) if args.volume else default_volume(setup)
    res["settings"] = {"reps": args.reps, "warmup": args.warmup,
                       "predict_reps": args.predict_reps or args.reps, "sections": sections, "networks": names,
                       "volume": volume, "tiny": args.tiny, "threads": torch.get_num_threads(),
                       "ssm_sizes": list(args.ssm_sizes), "mirroring": args.mirroring,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))}
    os.makedirs(args.out, exist_ok=True)
    return setup


def _run_sections(args: argparse.Namespace, setup: Dict, workdir: str, res: Dict, sections: List[str],
                  names: List[str]) -> None:
    """Run the chosen sections into ``res``: memory first, then step, predict, ssm and profile. After each the
    results so far are written to OUT/benchmark.partial.json, so they survive a crash (or an OOM kill) of a later
    section."""
    def checkpoint():
        atomic_save_json(os.path.join(args.out, PARTIAL), res, indent=1, default=float)

    if "memory" in sections:  # first: a network that does not fit fails here, in its own process, early
        res["memory"] = bench_memory(setup, names, workdir)
        checkpoint()
    oom = [n for n, r in res.get("memory", {}).get("networks", {}).items() if r.get("returncode") == -9]
    if oom:  # a training step that was killed for memory on its own would take this process down too
        res["settings"]["skipped_training"] = oom
        log(f"skipping the training step and profile of {', '.join(LABELS[n] for n in oom)}: killed for "
            f"memory in the memory section")
    train_names = [n for n in names if n not in oom]
    if "step" in sections:
        res["step"] = bench_step(setup, train_names, args.warmup, args.reps)
        checkpoint()
    if "predict" in sections:
        res["predict"] = bench_predict(setup, names, res["settings"]["volume"], args.warmup,
                                       args.predict_reps or args.reps, args.mirroring)
        checkpoint()
    if "ssm" in sections:
        in_step = stage2_ssm_shapes(setup) if "dsm_stage2" in names else None
        res["ssm"] = bench_ssm(setup, args.ssm_sizes, args.warmup, args.reps, in_step)
        checkpoint()
    if "profile" in sections and "dsm_stage2" in train_names:
        res["profile"] = profile_stage2(setup, args.warmup)


def _write_results(res: Dict, out: str) -> str:
    """Write OUT/benchmark.json and OUT/benchmark.md (atomically) and remove the partial results; returns the
    Markdown."""
    atomic_save_json(os.path.join(out, "benchmark.json"), res, indent=1, default=float)
    md = render_markdown(res)
    atomic_write_text(os.path.join(out, "benchmark.md"), md)
    if os.path.exists(os.path.join(out, PARTIAL)):
        os.remove(os.path.join(out, PARTIAL))
    log(f"wrote {os.path.join(out, 'benchmark.md')} and benchmark.json")
    return md
