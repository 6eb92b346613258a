"""Peak memory of a training step: one subprocess per network (``python -m nnunetv2_dsm.benchmark
--memory-worker NETWORK SETUP_JSON``, see ``__main__.py``) reports its RSS baseline and high-water mark (and CUDA
peaks) after two training steps."""
from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from typing import Dict, Sequence

import torch

from .plans import LABELS, MEMORY_RESULT_TAG, log
from .runner import make_batch, make_trainer, sync


# ------------------------------------------------------------------------------------------------------- memory
def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory in MB from /proc/self/status (``VmRSS`` now, ``VmHWM`` its peak); the
    getrusage peak where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def memory_worker(name: str, setup_path: str) -> None:
    """Runs in its own process: two training steps of one network; prints the memory figures as JSON."""
    with open(setup_path) as f:
        setup = json.load(f)
    if setup.get("threads"):
        torch.set_num_threads(setup["threads"])
    device = setup["device"]
    trainer = make_trainer(name, setup)
    batch = make_batch(trainer, setup, setup["seed"])
    gc.collect()
    result = {"baseline_rss_mb": rss_mb("VmRSS"), "hwm_before_steps_mb": rss_mb("VmHWM")}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result["cuda_baseline_mb"] = torch.cuda.memory_allocated() / 2 ** 20
    for _ in range(2):
        trainer.train_step(batch)
    sync(device)
    result["peak_rss_mb"] = rss_mb("VmHWM")
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result["delta_rss_mb"] = result["peak_rss_mb"] - result["baseline_rss_mb"]
    if device == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        result["cuda_max_reserved_mb"] = torch.cuda.max_memory_reserved() / 2 ** 20
    print(MEMORY_RESULT_TAG + json.dumps(result), flush=True)


def bench_memory(setup: Dict, names: Sequence[str], workdir: str) -> Dict:
    """Peak memory of two training steps per network, each measured in a subprocess of its own (a fresh
    high-water mark; an out-of-memory kill takes only that process)."""
    path = os.path.join(workdir, "setup.json")
    with open(path, "w") as f:
        json.dump(setup, f)
    out = {"networks": {}, "method": "one subprocess per network; baseline = RSS after building network, optimiser "
                                      "and batch; peak = VmHWM after two training steps"}
    for n in names:
        log(f"memory: {LABELS[n]} in a subprocess")
        proc = subprocess.run([sys.executable, "-m", "nnunetv2_dsm.benchmark", "--memory-worker", n, path],
                              capture_output=True, text=True, env=dict(os.environ))
        lines = [l for l in proc.stdout.splitlines() if l.startswith(MEMORY_RESULT_TAG)]
        if proc.returncode != 0 or not lines:
            why = "killed by SIGKILL (out of memory?)" if proc.returncode == -9 else f"exit code {proc.returncode}"
            log(f"memory: {LABELS[n]}: worker failed, {why}\n{proc.stderr[-2000:]}")
            out["networks"][n] = {"error": why, "returncode": proc.returncode}
            continue
        out["networks"][n] = json.loads(lines[-1][len(MEMORY_RESULT_TAG):])
        r = out["networks"][n]
        log(f"memory: {LABELS[n]}: peak {r['peak_rss_mb']:.0f} MB, baseline {r['baseline_rss_mb']:.0f} MB, "
            f"step {r['delta_rss_mb']:.0f} MB")
    return out
