"""The command line (``build_parser``) and ``main``: runs the sections, checkpoints after each, writes
OUT/benchmark.json and OUT/benchmark.md. ``--memory-worker`` is the subprocess entry point of the memory section."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from typing import Dict, Optional, Sequence

import torch

from .memory import bench_memory, memory_worker
from .plans import (DEFAULT_SSM_SIZES, LABELS, NETWORKS, SECTIONS, log, machine_info, nnunet_environment,
                    plans_summary, prepare_plans)
from .predict import bench_predict, default_volume
from .profiling import profile_stage2
from .report import evaluate_targets, render_markdown
from .steps import bench_ssm, bench_step, stage2_ssm_shapes


# ----------------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmark.py",
        description="DSM Stage 1/2 against nnU-Net's default network on the same plans: training step, peak "
                    "memory, sliding-window prediction, the SSM alone. Writes OUT_DIR/benchmark.md and "
                    "OUT_DIR/benchmark.json.")
    p.add_argument("--plans", help="an nnU-Net plans file (default: realistic plans made by nnU-Net's "
                                   "ExperimentPlanner for a synthetic abdominal CT dataset)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="configuration of the plans (3d_fullres)")
    p.add_argument("--patch", type=int, nargs="+", help="patch size override; the topology is re-planned for it")
    p.add_argument("--batch-size", type=int, help="batch size override")
    p.add_argument("--volume", type=int, nargs="+",
                   help="prediction volume in the plans' axis order (default: 256×256 in-plane × 160 along the "
                        "axis of largest spacing, i.e. a 256×256×160 CT)")
    p.add_argument("--reps", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--predict-reps", type=int,
                   help="timed prediction rounds (default: --reps; one volume takes minutes on a CPU)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                   help=f"run only these sections of {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    p.add_argument("--tiny", action="store_true",
                   help="narrow U-Net and DSM decoders (tests, smoke runs; not for comparisons)")
    p.add_argument("--mirroring", action="store_true", help="mirroring test-time augmentation in prediction")
    p.add_argument("--ssm-sizes", type=int, nargs="+", default=list(DEFAULT_SSM_SIZES),
                   help="edge lengths s of the (2, 25, s, s, s) SSM inputs (default 6 12 24 48)")
    p.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS),
                   help="networks to run (nnunet is always included: ratios refer to it)")
    p.add_argument("-o", "--out", default="benchmark_out", help="output folder (benchmark.md, benchmark.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-worker", nargs=2, metavar=("NETWORK", "SETUP_JSON"), help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = build_parser().parse_args(argv)
    if args.memory_worker:
        memory_worker(*args.memory_worker)
        return {}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reps < 1 or args.warmup < 0:
        raise SystemExit("--reps must be >= 1 and --warmup >= 0")
    sections = list(args.only or SECTIONS)
    names = ["nnunet"] + [n for n in NETWORKS[1:] if n in args.networks]
    started = time.time()
    workdir = tempfile.mkdtemp(prefix="dsm_benchmark_")
    res: Dict = {}
    try:
        with nnunet_environment(workdir):
            log(f"plans: {'reading ' + args.plans if args.plans else 'planning the synthetic abdominal CT dataset'}")
            setup = prepare_plans(args, workdir)
            res["machine"] = machine_info(args.device)
            res["plans"] = plans_summary(setup)
            pl = res["plans"]
            log(f"plans: {setup['configuration']} patch {pl['patch_size']} batch {pl['batch_size']} "
                f"{pl['n_stages']} stages features {pl['features_per_stage']}")
            volume = list(args.volume) if args.volume else default_volume(setup)
            res["settings"] = {"reps": args.reps, "warmup": args.warmup,
                               "predict_reps": args.predict_reps or args.reps, "sections": sections, "networks": names,
                               "volume": volume, "tiny": args.tiny, "threads": torch.get_num_threads(),
                               "ssm_sizes": list(args.ssm_sizes), "mirroring": args.mirroring,
                               "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))}
            os.makedirs(args.out, exist_ok=True)
            partial = os.path.join(args.out, "benchmark.partial.json")

            def checkpoint():  # what has been measured so far survives a crash (or an OOM kill) of a later section
                with open(partial, "w") as f:
                    json.dump(res, f, indent=1, default=float)

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
                res["predict"] = bench_predict(setup, names, volume, args.warmup, args.predict_reps or args.reps,
                                               args.mirroring)
                checkpoint()
            if "ssm" in sections:
                in_step = stage2_ssm_shapes(setup) if "dsm_stage2" in names else None
                res["ssm"] = bench_ssm(setup, args.ssm_sizes, args.warmup, args.reps, in_step)
                checkpoint()
            if "profile" in sections and "dsm_stage2" in train_names:
                res["profile"] = profile_stage2(setup, args.warmup)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["settings"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    res["settings"]["wall_seconds"] = time.time() - started
    res["targets"] = evaluate_targets(res)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmark.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    md = render_markdown(res)
    with open(os.path.join(args.out, "benchmark.md"), "w") as f:
        f.write(md)
    if os.path.exists(os.path.join(args.out, "benchmark.partial.json")):
        os.remove(os.path.join(args.out, "benchmark.partial.json"))
    log(f"wrote {os.path.join(args.out, 'benchmark.md')} and benchmark.json")
    print(md, flush=True)
    return res
