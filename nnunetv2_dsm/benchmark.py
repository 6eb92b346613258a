"""DSM against nnU-Net's default network on the same plans: training step, peak memory, sliding-window prediction,
the SSM alone, and a profile of the Stage 2 step. The CLI is ``scripts/benchmark.py`` (``main`` here).

Method (one process, alternating):

* **Plans.** ``--plans FILE -c CONFIG``, or by default realistic plans made by nnU-Net's own ``ExperimentPlanner``
  from a synthetic abdominal-CT fingerprint (100 CT scans of 512×512×300 voxels at 0.8×0.8×1.5 mm, one channel
  "CT") with DSM's dataset.json (45 regions, ``nnunetv2_dsm.labels``) in a temporary ``nnUNet_raw`` /
  ``nnUNet_preprocessed``. ``--patch`` re-plans the topology for another patch with nnU-Net's
  ``get_pool_and_conv_props`` (as the planner does), ``--batch-size`` overrides the batch size, ``--tiny`` narrows
  both the U-Net (8→64 features, one conv per stage) and the DSM decoders (``TINY_ARCHITECTURE``); every network
  is built from the same modified plans.
* **Networks and steps.** The real trainer classes are instantiated (``nnUNetTrainer``, ``nnUNetTrainerDSMStage1``,
  ``nnUNetTrainerDSMStage2``) and set up as ``initialize()`` does (network from ``build_network_architecture``,
  ``configure_optimizers``, ``_build_loss``; no dataset, no torch.compile on either side). The timed step is the
  trainers' own ``train_step`` on a synthetic batch (random image, random 45-region targets at each trainer's deep
  supervision scales, every class annotated): forward, loss, backward, gradient clipping and the optimiser step
  (SGD for nnU-Net, AdamW for DSM). Stage 2 gets random unit CLIP text embeddings.
* **Timing.** ``--warmup`` untimed rounds, then ``--reps`` rounds; each round runs every network once, the order
  rotating from round to round (A B C, B C A, C A B, ...) so that load from other processes hits all of them.
  Medians are reported, min and max too. CUDA is synchronised around every timed call.
* **Peak memory.** Each network's training step runs in a separate subprocess (``--memory-worker``): RSS before the
  first step (baseline: interpreter, torch, network, optimiser, batch), then two steps (the first allocates the
  optimiser state), then the RSS high-water mark (``VmHWM``; ``ru_maxrss`` where /proc is missing) and, on CUDA,
  ``torch.cuda.max_memory_allocated``. The target is judged on the step's own memory: peak − baseline (CPU) or
  max allocated (CUDA).
* **Prediction.** ``nnUNetPredictor.manual_initialization(network, plans_manager, configuration_manager,
  [state_dict], dataset_json, trainer_name, mirror_axes)`` with the network built for inference (no deep
  supervision, eval), then ``predict_sliding_window_return_logits`` of one random (C, X, Y, Z) volume: step 0.5,
  Gaussian weighting, mirroring off unless ``--mirroring``. Warm-up: one patch forward per network.
* **SSM.** ``VoxelSequenceSSM(25)`` (the organ-query SSM of a kMMM layer) on (2, 25, s, s, s) logits for
  ``--ssm-sizes``: forward without gradient and forward + backward. Its share of a Stage 2 step is measured inside
  the timed Stage 2 steps: forward hooks time the four calls, tensor hooks on their outputs and inputs time their
  backward (from the moment the output gradient is complete to the moment the input gradient is); cross-checked by
  timing the SSM alone at the four in-step shapes.
* **Profile.** One Stage 2 step under ``torch.profiler``: operators by self CPU time, and the same time attributed
  to modules — forward ops by the innermost module they run in, backward ops by the module whose forward op
  created their autograd node (matched by sequence number).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

SECTIONS = ("step", "memory", "predict", "ssm", "profile")
NETWORKS = ("nnunet", "dsm_stage1", "dsm_stage2")
LABELS = {"nnunet": "nnU-Net (nnUNetTrainer)", "dsm_stage1": "DSM Stage 1", "dsm_stage2": "DSM Stage 2"}
TARGETS = {"step": 1.5, "predict": 1.5, "memory": 1.5, "ssm_share": 0.10}
DATASET_NAME = "Dataset999_DSMBenchmark"
CASE_ID = "BENCH_0000"
DEFAULT_SSM_SIZES = (6, 12, 24, 48)
SSM_QUERIES = 25   # organ queries: the d_model of the kMMM layers' SSM
SSM_BATCH = 2
MEMORY_RESULT_TAG = "DSM_BENCHMARK_MEMORY "
# the synthetic abdominal CT collection the default plans are made for (array axis order z, y, x as SimpleITK)
SYNTH_CASES = 100
SYNTH_SPACING = (1.5, 0.8, 0.8)
SYNTH_SHAPE = (300, 512, 512)


def log(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


# ------------------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> Dict:
    from importlib.metadata import version
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
        if hasattr(os, "sysconf") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nnunetv2": version("nnunetv2"),
        "platform": platform.platform(),
        "device": device,
        "loadavg_start": list(os.getloadavg()),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        try:
            from nnunetv2_dsm.network.ssm import scan_backend
            info["ssm_backend"] = scan_backend(torch.device("cuda"))
        except Exception as e:  # pragma: no cover
            info["ssm_backend"] = f"unknown ({e})"
    else:
        info["ssm_backend"] = "torch"
    return info


# --------------------------------------------------------------------------------------------------------- plans
def dataset_json_for_benchmark(num_training: int = SYNTH_CASES) -> Dict:
    """dataset.json of the synthetic dataset: one CT channel, DSM's 45 regions, a manifest whose benchmark case
    annotates every class. The image files are named, never read (the planner only needs the fingerprint)."""
    from nnunetv2_dsm.labels import CLASS_NAMES, dataset_json_labels, regions_class_order
    from nnunetv2_dsm.manifest import make_entry, make_manifest
    cases = [CASE_ID] + [f"BENCH_{i:04d}" for i in range(1, num_training)]
    return {
        "channel_names": {"0": "CT"},
        "labels": dataset_json_labels(),
        "regions_class_order": regions_class_order(),
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "SimpleITKIO",
        "dataset": {c: {"images": [f"imagesTr/{c}_0000.nii.gz"], "label": f"labelsTr/{c}.nii.gz"} for c in cases},
        "dsm_manifest": make_manifest({c: make_entry("totalsegmentator", CLASS_NAMES, stage=1) for c in cases}),
    }


def synthetic_fingerprint(num_training: int = SYNTH_CASES) -> Dict:
    """nnU-Net's dataset_fingerprint.json for abdominal CT: every scan 512×512×300 at 0.8×0.8×1.5 mm (array axes
    z, y, x as SimpleITK reads them), not cropped, typical HU foreground statistics."""
    return {
        "spacings": [list(SYNTH_SPACING)] * num_training,
        "shapes_after_crop": [list(SYNTH_SHAPE)] * num_training,
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 3071.0, "mean": 99.5, "median": 101.0, "min": -1024.0, "percentile_00_5": -958.0,
            "percentile_99_5": 1252.0, "std": 137.0}},
        "median_relative_size_after_cropping": 1.0,
    }


@contextlib.contextmanager
def nnunet_environment(root: str):
    """nnUNet_raw / nnUNet_preprocessed / nnUNet_results under ``root`` for the duration (restored afterwards)."""
    keys = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    old = {k: os.environ.get(k) for k in keys}
    for k, sub in zip(keys, ("raw", "preprocessed", "results")):
        os.environ[k] = os.path.join(root, sub)
        os.makedirs(os.environ[k], exist_ok=True)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def plan_synthetic_dataset(root: str) -> Dict:
    """Run nnU-Net's ExperimentPlanner on the synthetic fingerprint (inside ``nnunet_environment(root)``)."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    raw = os.path.join(os.environ["nnUNet_raw"], DATASET_NAME)
    pre = os.path.join(os.environ["nnUNet_preprocessed"], DATASET_NAME)
    os.makedirs(raw, exist_ok=True)
    os.makedirs(pre, exist_ok=True)
    with open(os.path.join(raw, "dataset.json"), "w") as f:
        json.dump(dataset_json_for_benchmark(), f)
    with open(os.path.join(pre, "dataset_fingerprint.json"), "w") as f:
        json.dump(synthetic_fingerprint(), f)
    with contextlib.redirect_stdout(io.StringIO()):
        plans = ExperimentPlanner(DATASET_NAME).plan_experiment()
    with open(os.path.join(pre, "nnUNetPlans.json")) as f:  # the JSON-clean version the planner saved
        return json.load(f)


def replan_topology(cfg: Dict, patch: Sequence[int]) -> None:
    """Topology for another patch size the way the ExperimentPlanner derives it (in place)."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    spacing = cfg["spacing"]
    if len(patch) != len(spacing):
        raise SystemExit(f"--patch needs {len(spacing)} values for this configuration, got {list(patch)}")
    _, strides, kernels, patch_size, _ = get_pool_and_conv_props(spacing, list(patch), 4, 999999)
    n = len(strides)
    kw = cfg["architecture"]["arch_kwargs"]
    base = kw["features_per_stage"][0]
    cap = max(kw["features_per_stage"])
    kw.update(n_stages=n, strides=[list(s) for s in strides], kernel_sizes=[list(k) for k in kernels],
              features_per_stage=[min(cap, base * 2 ** i) for i in range(n)],
              n_conv_per_stage=[kw["n_conv_per_stage"][0]] * n,
              n_conv_per_stage_decoder=[kw["n_conv_per_stage_decoder"][0]] * (n - 1))
    cfg["patch_size"] = [int(i) for i in patch_size]


def prepare_plans(args, root: str) -> Dict:
    """The plans every network is built from, with the one configuration resolved and the overrides applied.
    Returns a 'setup' dict (JSON-serialisable: it is also handed to the memory subprocesses)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_dsm.training.trainers import TINY_ARCHITECTURE
    if args.plans:
        with open(args.plans) as f:
            plans = json.load(f)
        source = f"plans file {os.path.abspath(args.plans)}"
    else:
        plans = plan_synthetic_dataset(root)
        source = ("nnU-Net ExperimentPlanner (default, 8 GB GPU target) on a synthetic abdominal CT fingerprint: "
                  f"{SYNTH_CASES} scans of {SYNTH_SHAPE[2]}×{SYNTH_SHAPE[1]}×{SYNTH_SHAPE[0]} voxels at "
                  f"{SYNTH_SPACING[2]}×{SYNTH_SPACING[1]}×{SYNTH_SPACING[0]} mm, 45 regions")
    cfg = PlansManager(plans)._internal_resolve_configuration_inheritance(args.configuration)
    cfg.pop("inherits_from", None)
    planned = {"patch_size": list(cfg["patch_size"]), "batch_size": cfg["batch_size"],
               "n_stages": cfg["architecture"]["arch_kwargs"]["n_stages"]}
    if args.tiny:
        kw = cfg["architecture"]["arch_kwargs"]
        kw["features_per_stage"] = [min(8 * 2 ** i, 64) for i in range(kw["n_stages"])]
        kw["n_conv_per_stage"] = [1] * kw["n_stages"]
        kw["n_conv_per_stage_decoder"] = [1] * (kw["n_stages"] - 1)
        cfg["dsm_architecture"] = asdict(TINY_ARCHITECTURE)
    if args.patch:
        replan_topology(cfg, args.patch)
    if args.batch_size:
        cfg["batch_size"] = int(args.batch_size)
    plans["configurations"][args.configuration] = cfg
    return {"plans": plans, "configuration": args.configuration, "dataset_json": dataset_json_for_benchmark(),
            "source": source, "planned": planned, "device": args.device, "threads": args.threads,
            "seed": args.seed}


def plans_summary(setup: Dict) -> Dict:
    from nnunetv2_dsm.network.dsm import DSMArchitecture
    from nnunetv2_dsm.training.trainers import nnUNetTrainerDSMBase
    cfg = setup["plans"]["configurations"][setup["configuration"]]
    kw = cfg["architecture"]["arch_kwargs"]
    return {
        "source": setup["source"],
        "configuration": setup["configuration"],
        "as_planned": setup["planned"],
        "patch_size": list(cfg["patch_size"]),
        "batch_size": cfg["batch_size"],
        "spacing": [round(float(s), 4) for s in cfg["spacing"]],
        "median_image_size_in_voxels": [float(s) for s in cfg.get("median_image_size_in_voxels", [])],
        "network": cfg["architecture"]["network_class_name"].rsplit(".", 1)[-1],
        "n_stages": kw["n_stages"],
        "strides": kw["strides"],
        "features_per_stage": list(kw["features_per_stage"]),
        "n_conv_per_stage": list(kw["n_conv_per_stage"]),
        "dsm_architecture": asdict(DSMArchitecture.from_plans(cfg, nnUNetTrainerDSMBase.dsm_architecture)),
    }


# ------------------------------------------------------------------------------------------ trainers and batches
def trainer_class(name: str):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2_dsm.training.stage2 import nnUNetTrainerDSMStage2
    from nnunetv2_dsm.training.trainers import nnUNetTrainerDSMStage1
    return {"nnunet": nnUNetTrainer, "dsm_stage1": nnUNetTrainerDSMStage1, "dsm_stage2": nnUNetTrainerDSMStage2}[name]


def text_embeddings(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(45, 512, generator=g), dim=-1)


def num_input_channels(setup: Dict) -> int:
    return len(setup["dataset_json"]["channel_names"])


def make_trainer(name: str, setup: Dict):
    """The trainer, set up as nnUNetTrainer.initialize() does it (minus the dataset and torch.compile)."""
    cls = trainer_class(name)
    plans = copy.deepcopy(setup["plans"])
    plans["continue_training"] = False
    device = torch.device(setup["device"])
    torch.manual_seed(setup["seed"])
    with contextlib.redirect_stdout(io.StringIO()):
        tr = cls(plans, setup["configuration"], 0, copy.deepcopy(setup["dataset_json"]), device=device)
    n_in = num_input_channels(setup)
    tr.num_input_channels = n_in
    tr.network = tr.build_network_architecture(tr.plans_manager, tr.configuration_manager, n_in,
                                               tr.label_manager.num_segmentation_heads,
                                               tr.enable_deep_supervision).to(device)
    if name == "dsm_stage2":
        tr.network.alignment.set_text_embeddings(text_embeddings(setup["seed"]))
    tr.optimizer, tr.lr_scheduler = tr.configure_optimizers()
    tr.loss = tr._build_loss()
    tr.network.train()
    return tr


def make_batch(tr, setup: Dict, seed: int) -> Dict:
    """A training batch like nnU-Net's data loader gives it: data (B, C, *patch), one bool region target per deep
    supervision scale (rounded as DownsampleSegForDSTransform does), the case keys."""
    cm = tr.configuration_manager
    bs, patch = cm.batch_size, list(cm.patch_size)
    g = torch.Generator().manual_seed(seed)
    data = torch.randn((bs, num_input_channels(setup), *patch), generator=g)
    heads = tr.label_manager.num_segmentation_heads
    scales = tr._get_deep_supervision_scales() or [[1.0] * len(patch)]
    target = [torch.rand((bs, heads, *[round(p * s) for p, s in zip(patch, sc)]), generator=g) > 0.9
              for sc in scales]
    if len(target) == 1 and not tr.enable_deep_supervision:
        target = target[0]
    return {"data": data, "target": target, "keys": np.array([CASE_ID] * bs)}


def release_memory(device: str = "cpu") -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc malloc_trim) between timed calls, so one
    network's freed activations do not stay resident, fragmented, under the next one (outside the timings)."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if device == "cuda":
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def rotated(names: Sequence[str], r: int) -> List[str]:
    k = r % len(names)
    return list(names[k:]) + list(names[:k])


def stats(values: Sequence[float]) -> Dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": list(values)}


# ----------------------------------------------------------------------------------------------------- SSM timer
class SSMTimer:
    """Times the VoxelSequenceSSM calls inside a training step: forward by module hooks; backward from the moment
    the gradient of the SSM's output is complete (tensor hook on the output) to the moment the gradient of its input
    is (tensor hook on the input)."""

    def __init__(self, modules: Sequence[torch.nn.Module], device: str):
        self.device = device
        self.handles = []
        self.reset()
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))

    def reset(self) -> None:
        self.forward = self.backward = 0.0
        self.calls = 0
        self.shapes: List[List[int]] = []
        self._t0 = 0.0
        self._bwd_start: Dict[int, float] = {}

    def _now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def _pre(self, module, args):
        x = args[0]
        self.shapes.append(list(x.shape))
        key = self.calls
        self.calls += 1
        if x.requires_grad:
            x.register_hook(lambda g, key=key: self._bwd_end(key))
        self._key = key
        self._t0 = self._now()

    def _post(self, module, args, out):
        self.forward += self._now() - self._t0
        if out.requires_grad:
            key = self._key
            out.register_hook(lambda g, key=key: self._bwd_begin(key))

    def _bwd_begin(self, key):
        self._bwd_start[key] = self._now()

    def _bwd_end(self, key):
        t0 = self._bwd_start.pop(key, None)
        if t0 is not None:
            self.backward += self._now() - t0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------------------------------------- step
def bench_step(setup: Dict, names: Sequence[str], warmup: int, reps: int) -> Dict:
    device = setup["device"]
    trainers, batches = {}, {}
    for n in names:
        log(f"step: building {LABELS[n]}")
        trainers[n] = make_trainer(n, setup)
        batches[n] = make_batch(trainers[n], setup, setup["seed"])
    timer = SSMTimer([layer.ssm for layer in trainers["dsm_stage2"].network.kmmm], device) \
        if "dsm_stage2" in trainers else None
    times = {n: [] for n in names}
    ssm_in_step = []
    for r in range(warmup + reps):
        for n in rotated(names, r):
            if timer is not None:
                timer.reset()
            release_memory(device)
            t = timed(lambda: trainers[n].train_step(batches[n]), device)
            trainers[n].optimizer.zero_grad(set_to_none=True)  # train_step does this first anyway: frees memory early
            kind = "warm-up" if r < warmup else "rep"
            log(f"step: {kind} {r + 1 - (warmup if r >= warmup else 0)} {LABELS[n]}: {t:.3f} s "
                f"(RSS {rss_mb():.0f} MB, high-water {rss_mb('VmHWM'):.0f} MB)")
            if r >= warmup:
                times[n].append(t)
                if n == "dsm_stage2" and timer is not None:
                    ssm_in_step.append({"step": t, "forward": timer.forward, "backward": timer.backward,
                                        "calls": timer.calls, "shapes": timer.shapes})
    out = {"networks": {}}
    for n in names:
        tr = trainers[n]
        out["networks"][n] = {
            "seconds": stats(times[n]),
            "parameters": sum(p.numel() for p in tr.network.parameters()),
            "optimizer": type(tr.optimizer).__name__,
            "loss": type(tr.loss).__name__ + (f"({type(tr.loss.loss).__name__})" if hasattr(tr.loss, "loss") else ""),
            "deep_supervision_outputs": len(batches[n]["target"]) if isinstance(batches[n]["target"], list) else 1,
        }
    if ssm_in_step:
        shares = [(s["forward"] + s["backward"]) / s["step"] for s in ssm_in_step]
        out["ssm_in_stage2_step"] = {
            "forward": statistics.median(s["forward"] for s in ssm_in_step),
            "backward": statistics.median(s["backward"] for s in ssm_in_step),
            "total": statistics.median(s["forward"] + s["backward"] for s in ssm_in_step),
            "share": statistics.median(shares), "shares": shares,
            "calls_per_step": ssm_in_step[0]["calls"], "shapes": ssm_in_step[0]["shapes"],
        }
    if timer is not None:
        timer.remove()
    del trainers, batches
    gc.collect()
    return out


# ------------------------------------------------------------------------------------------------------- memory
def rss_mb(field: str = "VmRSS") -> float:
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
    tr = make_trainer(name, setup)
    batch = make_batch(tr, setup, setup["seed"])
    gc.collect()
    result = {"baseline_rss_mb": rss_mb("VmRSS"), "hwm_before_steps_mb": rss_mb("VmHWM")}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result["cuda_baseline_mb"] = torch.cuda.memory_allocated() / 2 ** 20
    for _ in range(2):
        tr.train_step(batch)
    sync(device)
    result["peak_rss_mb"] = rss_mb("VmHWM")
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result["delta_rss_mb"] = result["peak_rss_mb"] - result["baseline_rss_mb"]
    if device == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        result["cuda_max_reserved_mb"] = torch.cuda.max_memory_reserved() / 2 ** 20
    print(MEMORY_RESULT_TAG + json.dumps(result), flush=True)


def bench_memory(setup: Dict, names: Sequence[str], workdir: str) -> Dict:
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


# ------------------------------------------------------------------------------------------------------ predict
def default_volume(setup: Dict) -> List[int]:
    """A 256×256×160 CT in the plans' axes: 160 along the axis of largest spacing, 256 along the others."""
    cfg = setup["plans"]["configurations"][setup["configuration"]]
    spacing = list(cfg["spacing"])
    if len(spacing) != 3:
        return [256] * len(spacing)
    vol = [256, 256, 256]
    vol[int(np.argmax(spacing))] = 160
    return vol


def bench_predict(setup: Dict, names: Sequence[str], volume: Sequence[int], warmup: int, reps: int,
                  mirroring: bool) -> Dict:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    device = setup["device"]
    pm = PlansManager(copy.deepcopy(setup["plans"]))
    cm = pm.get_configuration(setup["configuration"])
    n_in = num_input_channels(setup)
    heads = pm.get_label_manager(setup["dataset_json"]).num_segmentation_heads
    mirror_axes = tuple(range(len(cm.patch_size))) if mirroring else None
    predictors = {}
    for n in names:
        log(f"predict: building {LABELS[n]} for inference")
        cls = trainer_class(n)
        torch.manual_seed(setup["seed"])
        net = cls.build_network_architecture(pm, cm, n_in, heads, False).to(torch.device(device))
        if n == "dsm_stage2":
            net.alignment.set_text_embeddings(text_embeddings(setup["seed"]).to(device))
        net.eval()
        with contextlib.redirect_stdout(io.StringIO()):
            p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=device == "cuda", device=torch.device(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
            p.manual_initialization(net, pm, cm, [net.state_dict()], setup["dataset_json"], cls.__name__,
                                    mirror_axes)
        predictors[n] = p
    g = torch.Generator().manual_seed(setup["seed"])
    image = torch.randn((n_in, *volume), generator=g)
    padded = [max(v, p) for v, p in zip(volume, cm.patch_size)]
    tiles = len(next(iter(predictors.values()))._internal_get_sliding_window_slicers(padded))
    patch = torch.randn((1, n_in, *cm.patch_size), generator=g).to(device)
    for n in names:  # warm-up: one patch forward each (and, with warmup > 1, whole volumes)
        with torch.inference_mode():
            timed(lambda: predictors[n].network(patch), device)
    times = {n: [] for n in names}
    for r in range(max(warmup - 1, 0) + reps):
        for n in rotated(names, r):
            release_memory(device)
            t = timed(lambda: predictors[n].predict_sliding_window_return_logits(image), device)
            if r >= max(warmup - 1, 0):
                times[n].append(t)
            log(f"predict: {'rep' if r >= max(warmup - 1, 0) else 'warm-up'} {LABELS[n]}: {t:.2f} s ({tiles} tiles)")
    del predictors
    gc.collect()
    return {"volume": list(volume), "tiles": tiles, "step_size": 0.5, "gaussian": True, "mirroring": mirroring,
            "networks": {n: {"seconds": stats(times[n]), "seconds_per_tile": statistics.median(times[n]) / tiles}
                         for n in names}}


# ---------------------------------------------------------------------------------------------------------- SSM
def _ssm_times(shape: Sequence[int], device: str, warmup: int, reps: int, seed: int) -> Dict:
    from nnunetv2_dsm.network.kmeans_layer import VoxelSequenceSSM
    torch.manual_seed(seed)
    m = VoxelSequenceSSM(shape[1]).to(device)
    x = torch.randn(*shape, device=device)
    w = torch.randn(*shape, device=device)

    def fwd():
        with torch.no_grad():
            m(x)

    def fwd_bwd():
        xi = x.detach().requires_grad_()
        (m(xi) * w).sum().backward()

    f = [timed(fwd, device) for _ in range(warmup + reps)][warmup:]
    fb = [timed(fwd_bwd, device) for _ in range(warmup + reps)][warmup:]
    return {"shape": list(shape), "tokens": int(np.prod(shape[2:])), "forward": stats(f), "forward_backward": stats(fb)}


def bench_ssm(setup: Dict, sizes: Sequence[int], warmup: int, reps: int, in_step_shapes=None) -> Dict:
    device = setup["device"]
    out = {"module": f"VoxelSequenceSSM({SSM_QUERIES}) = LayerNorm + Mamba(d_model={SSM_QUERIES}, d_state=16, "
                     f"d_conv=4, expand=2) + residual", "sizes": []}
    for s in sizes:
        shape = (SSM_BATCH, SSM_QUERIES, s, s, s)
        r = _ssm_times(shape, device, warmup, reps, setup["seed"])
        out["sizes"].append({"s": s, **r})
        log(f"ssm: {s}^3 = {r['tokens']} tokens: forward {r['forward']['median']:.4f} s, "
            f"forward+backward {r['forward_backward']['median']:.4f} s")
    if in_step_shapes:
        out["in_step"] = []
        for shape in in_step_shapes:
            r = _ssm_times(shape, device, warmup, reps, setup["seed"])
            out["in_step"].append(r)
            log(f"ssm: in-step shape {shape}: forward+backward {r['forward_backward']['median']:.4f} s")
    return out


def stage2_ssm_shapes(setup: Dict) -> List[List[int]]:
    """The four (B, 25, *S) SSM inputs of a Stage 2 training step: one per kMMM scale, coarse → fine."""
    from nnunetv2_dsm.network.backbone import kmmm_stage_indices, stage_scales
    cfg = setup["plans"]["configurations"][setup["configuration"]]
    strides = cfg["architecture"]["arch_kwargs"]["strides"]
    scales = stage_scales(strides)
    patch = cfg["patch_size"]
    return [[cfg["batch_size"], SSM_QUERIES, *[int(round(p * s)) for p, s in zip(patch, scales[i])]]
            for i in kmmm_stage_indices(len(strides))]


# ------------------------------------------------------------------------------------------------------ profile
MOD_PREFIX = "mod::"
BWD_PREFIX = "autograd::engine::evaluate_function: "


def _module_label(path: str) -> Optional[str]:
    """Module paths with at most two named parts are labelled (indices become *): 'kmmm.*.ssm',
    'tumour.diffusion.*', 'backbone.encoder'; deeper modules count towards their labelled ancestor."""
    if path == "":
        return "network (glue: mask logits, k-means assignment, anomaly prompt, ...)"
    parts = path.split(".")
    named = [p for p in parts if not p.isdigit()]
    if len(named) > 2:
        return None
    label = ".".join("*" if p.isdigit() else p for p in parts)
    return {"backbone.decoder_stages": "backbone.decoder", "backbone.decoder_transpconvs": "backbone.decoder"}.get(
        label, label)


def _install_labels(network: torch.nn.Module, loss: torch.nn.Module):
    stack, handles = [], []

    def pre(label):
        def hook(module, args):
            rf = torch.profiler.record_function(MOD_PREFIX + label)
            rf.__enter__()
            stack.append(rf)
        return hook

    def post(module, args, out):
        stack.pop().__exit__(None, None, None)

    modules = [(path, m) for path, m in network.named_modules()] + [("<loss>", loss)]
    for path, m in modules:
        label = "loss" if path == "<loss>" else _module_label(path)
        if label is None:
            continue
        handles.append(m.register_forward_pre_hook(pre(label)))
        handles.append(m.register_forward_hook(post))
    return handles


def profile_stage2(setup: Dict, warmup: int, top: int = 15) -> Dict:
    from torch.profiler import ProfilerActivity, profile
    device = setup["device"]
    log("profile: building DSM Stage 2")
    tr = make_trainer("dsm_stage2", setup)
    batch = make_batch(tr, setup, setup["seed"])
    for _ in range(max(warmup, 1)):
        tr.train_step(batch)
    handles = _install_labels(tr.network, tr.loss)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    log("profile: one profiled Stage 2 step")
    with profile(activities=activities) as prof:
        wall = timed(lambda: tr.train_step(batch), device)
    for h in handles:
        h.remove()
    events = list(prof.events())

    def fwd_label(e) -> Optional[str]:
        p = e
        while p is not None:
            if p.name.startswith(MOD_PREFIX):
                return p.name[len(MOD_PREFIX):]
            if p.name.startswith(BWD_PREFIX):
                return None
            p = p.cpu_parent
        return None

    def enclosing_bwd(e):
        p = e
        while p is not None:
            if p.name.startswith(BWD_PREFIX):
                return p
            p = p.cpu_parent
        return None

    # sequence number → label of the forward op that created the autograd node (the last op started with it)
    seq_label, seq_start = {}, {}
    for e in events:
        if e.sequence_nr is None or e.sequence_nr < 0 or e.name.startswith((MOD_PREFIX, BWD_PREFIX)):
            continue
        if enclosing_bwd(e) is not None:
            continue
        lbl = fwd_label(e)
        start = e.time_range.start
        if lbl is not None and start >= seq_start.get(e.sequence_nr, -1):
            seq_label[e.sequence_nr], seq_start[e.sequence_nr] = lbl, start
    other = "optimiser step, gradient clipping, other (outside the network)"
    unattributed_bwd = "backward: gradient accumulation and unattributed nodes"
    by_module: Dict[str, Dict[str, float]] = {}
    by_module_op: Dict[tuple, float] = {}
    total = 0.0
    for e in events:
        if e.name.startswith(MOD_PREFIX):
            continue
        self_t = e.self_cpu_time_total / 1e6
        total += self_t
        b = enclosing_bwd(e)
        if b is not None:
            lbl = seq_label.get(b.sequence_nr, unattributed_bwd)
            phase = "backward"
        else:
            lbl = fwd_label(e) or other
            phase = "forward"
        d = by_module.setdefault(lbl, {"forward": 0.0, "backward": 0.0})
        d[phase] += self_t
        op = e.name[len(BWD_PREFIX):] if e.name.startswith(BWD_PREFIX) else e.name
        by_module_op[(lbl, phase, op)] = by_module_op.get((lbl, phase, op), 0.0) + self_t
    # the mod:: ranges' own self time (Python between ops inside a module) counts for that module's forward
    for e in events:
        if e.name.startswith(MOD_PREFIX):
            self_t = e.self_cpu_time_total / 1e6
            total += self_t
            d = by_module.setdefault(e.name[len(MOD_PREFIX):], {"forward": 0.0, "backward": 0.0})
            d["forward"] += self_t
    modules = sorted(({"module": k, "forward": v["forward"], "backward": v["backward"],
                       "total": v["forward"] + v["backward"], "share": (v["forward"] + v["backward"]) / total}
                      for k, v in by_module.items()), key=lambda r: -r["total"])
    ops = []
    for a in sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total):
        if a.key.startswith(MOD_PREFIX):
            continue
        ops.append({"operator": a.key, "self_cpu": a.self_cpu_time_total / 1e6, "calls": a.count,
                    "share": a.self_cpu_time_total / 1e6 / total})
        if len(ops) >= top:
            break
    pairs = sorted(({"module": k[0], "phase": k[1], "operator": k[2], "self_cpu": v, "share": v / total}
                    for k, v in by_module_op.items()), key=lambda r: -r["self_cpu"])[:top]
    ssm = [m for m in modules if m["module"].endswith(".ssm")]
    del tr
    gc.collect()
    return {"wall_seconds": wall, "profiled_self_cpu_seconds": total, "modules": modules, "operators": ops,
            "module_operators": pairs,
            "ssm_share_profiled": sum(m["total"] for m in ssm) / total if total else None}


# ------------------------------------------------------------------------------------------------------ targets
def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def evaluate_targets(res: Dict) -> List[Dict]:
    out = []

    def add(name, value, limit, unit="×", note=""):
        out.append({"target": name, "value": value, "limit": limit, "unit": unit,
                    "pass": None if value is None else value <= limit, "note": note})

    step = res.get("step", {}).get("networks", {})
    if "dsm_stage2" in step and "nnunet" in step:
        add("Stage 2 training step / nnU-Net", ratio(step["dsm_stage2"]["seconds"]["median"],
                                                     step["nnunet"]["seconds"]["median"]), TARGETS["step"])
    pred = res.get("predict", {}).get("networks", {})
    if "nnunet" in pred:
        for n in ("dsm_stage1", "dsm_stage2"):
            if n in pred:
                add(f"{LABELS[n]} prediction / nnU-Net", ratio(pred[n]["seconds"]["median"],
                                                               pred["nnunet"]["seconds"]["median"]), TARGETS["predict"])
    mem = res.get("memory", {}).get("networks", {})
    if "dsm_stage2" in mem and "nnunet" in mem:
        key = "cuda_max_allocated_mb" if "cuda_max_allocated_mb" in mem["nnunet"] else "delta_rss_mb"
        if "error" in mem["dsm_stage2"]:
            out.append({"target": "Stage 2 step memory / nnU-Net", "value": None, "limit": TARGETS["memory"],
                        "unit": "×", "pass": False, "note": f"the Stage 2 step failed: {mem['dsm_stage2']['error']}"})
        else:
            add("Stage 2 step memory / nnU-Net", ratio(mem["dsm_stage2"].get(key), mem["nnunet"].get(key)),
                TARGETS["memory"], note="CUDA max allocated" if key.startswith("cuda") else
                "RSS peak − baseline of the step")
    s = res.get("step", {}).get("ssm_in_stage2_step")
    if s:
        add("SSM share of a Stage 2 step", s["share"], TARGETS["ssm_share"], unit="",
            note="four VoxelSequenceSSM calls, forward + backward, timed inside the step")
    return out


# ------------------------------------------------------------------------------------------------------ markdown
def _f(x, digits=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.{digits}f}"
    return str(x)


def _pass(p) -> str:
    return "–" if p is None else ("pass" if p else "**MISS**")


def render_markdown(res: Dict) -> str:
    m, pl, st = res["machine"], res["plans"], res["settings"]
    L = ["# DSM vs nnU-Net benchmark", ""]
    L.append(f"Machine: {m['cpu']}, {m['cpu_count']} CPUs (affinity {m['affinity']}), {m['memory_gib']} GiB; "
             f"torch {m['torch']} ({m['torch_threads']} threads), nnunetv2 {m['nnunetv2']}, Python {m['python']}; "
             f"device **{m['device']}**" + (f" ({m['gpu']}, CUDA {m['cuda']})" if m.get("gpu") else "") +
             f"; SSM scan backend {m.get('ssm_backend')}; load average at start "
             f"{', '.join(f'{x:.2f}' for x in m['loadavg_start'])}, at end "
             f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_end', []))}.")
    L.append("")
    L.append(f"Plans: {pl['source']}. Configuration `{pl['configuration']}`: patch {pl['patch_size']}, batch size "
             f"{pl['batch_size']}, spacing {pl['spacing']}, {pl['network']} with {pl['n_stages']} stages, features "
             f"{pl['features_per_stage']}, strides {pl['strides']} "
             f"(as planned: patch {pl['as_planned']['patch_size']}, "
             f"batch {pl['as_planned']['batch_size']}, {pl['as_planned']['n_stages']} stages). DSM decoder widths: "
             f"{pl['dsm_architecture']}.")
    L.append("")
    L.append(f"Settings: warm-up {st['warmup']}, repetitions {st['reps']} (prediction {st['predict_reps']}; medians; "
             f"rounds alternate the networks in rotating order), {st['threads']} torch thread(s), "
             f"{st['started']} → {st['finished']} ({st['wall_seconds']:.0f} s)." +
             (" **--tiny: narrow networks, not a comparison.**" if st["tiny"] else ""))
    L.append("")
    targets = res.get("targets", [])
    if targets:
        L += ["## Targets (ratios to nnU-Net in the same run)", "", "| target | measured | limit | result | note |",
              "|---|---|---|---|---|"]
        for t in targets:
            v = "–" if t["value"] is None else \
                (f"{t['value']:.2f}×" if t["unit"] == "×" else f"{100 * t['value']:.1f} %")
            lim = f"≤ {t['limit']}×" if t["unit"] == "×" else f"≤ {100 * t['limit']:.0f} %"
            L.append(f"| {t['target']} | {v} | {lim} | {_pass(t['pass'])} | {t['note']} |")
        L.append("")
    if "step" in res:
        s = res["step"]["networks"]
        base = s.get("nnunet", {}).get("seconds", {}).get("median")
        L += ["## Training step (forward + loss + backward + clipping + optimiser step)", "",
              "| network | median s | min s | max s | ratio to nnU-Net | parameters | optimiser | loss | DS outputs |",
              "|---|---|---|---|---|---|---|---|---|"]
        for n, r in s.items():
            L.append(f"| {LABELS[n]} | {_f(r['seconds']['median'])} | {_f(r['seconds']['min'])} | "
                     f"{_f(r['seconds']['max'])} | {_f(ratio(r['seconds']['median'], base), 2)}× | "
                     f"{r['parameters'] / 1e6:.2f} M | {r['optimizer']} | {r['loss']} | "
                     f"{r['deep_supervision_outputs']} |")
        L.append("")
    if "memory" in res:
        s = res["memory"]["networks"]
        b = s.get("nnunet", {})
        cuda = "cuda_max_allocated_mb" in b
        L += ["## Peak memory of a training step (one subprocess per network)", "",
              "| network | peak RSS MB | baseline RSS MB | step (peak − baseline) MB | ratio peak | ratio step |"
              + (" CUDA max allocated MB | ratio |" if cuda else ""),
              "|---|---|---|---|---|---|" + ("---|---|" if cuda else "")]
        for n, r in s.items():
            if "error" in r:
                L.append(f"| {LABELS[n]} | failed: {r['error']} | | | | |" + (" | |" if cuda else ""))
                continue
            row = (f"| {LABELS[n]} | {_f(r['peak_rss_mb'])} | {_f(r['baseline_rss_mb'])} | {_f(r['delta_rss_mb'])} | "
                   f"{_f(ratio(r['peak_rss_mb'], b.get('peak_rss_mb')), 2)}× | "
                   f"{_f(ratio(r['delta_rss_mb'], b.get('delta_rss_mb')), 2)}× |")
            if cuda:
                row += (f" {_f(r['cuda_max_allocated_mb'])} | "
                        f"{_f(ratio(r['cuda_max_allocated_mb'], b['cuda_max_allocated_mb']), 2)}× |")
            L.append(row)
        L.append("")
    if "predict" in res:
        p = res["predict"]
        base = p["networks"].get("nnunet", {}).get("seconds", {}).get("median")
        L += [f"## Sliding-window prediction of one {'×'.join(map(str, p['volume']))} volume", "",
              f"nnUNetPredictor.predict_sliding_window_return_logits, {p['tiles']} tiles, step {p['step_size']}, "
              f"Gaussian {'on' if p['gaussian'] else 'off'}, mirroring {'on' if p['mirroring'] else 'off'}.", "",
              "| network | median s | min s | max s | s per tile | ratio to nnU-Net |", "|---|---|---|---|---|---|"]
        for n, r in p["networks"].items():
            L.append(f"| {LABELS[n]} | {_f(r['seconds']['median'])} | {_f(r['seconds']['min'])} | "
                     f"{_f(r['seconds']['max'])} | {_f(r['seconds_per_tile'])} | "
                     f"{_f(ratio(r['seconds']['median'], base), 2)}× |")
        L.append("")
    if "ssm" in res:
        s = res["ssm"]
        L += ["## The SSM alone", "", f"{s['module']}, input (2, 25, s, s, s).", "",
              "| s | tokens | forward s (no grad) | forward + backward s | µs per token (fwd+bwd) |",
              "|---|---|---|---|---|"]
        for r in s["sizes"]:
            fb = r["forward_backward"]["median"]
            L.append(f"| {r['s']} | {r['tokens'] * SSM_BATCH} ({SSM_BATCH}×{r['tokens']}) | "
                     f"{_f(r['forward']['median'], 4)} | {_f(fb, 4)} | {_f(1e6 * fb / (r['tokens'] * SSM_BATCH), 3)} |")
        L.append("")
    ins = res.get("step", {}).get("ssm_in_stage2_step")
    if ins:
        L += ["## The SSM inside a Stage 2 training step", "",
              f"{ins['calls_per_step']} calls per step, inputs {ins['shapes']}.", "",
              "| measured | forward s | backward s | total s | share of the step |", "|---|---|---|---|---|",
              f"| hooks inside the timed steps (median) | {_f(ins['forward'], 4)} | {_f(ins['backward'], 4)} | "
              f"{_f(ins['total'], 4)} | {100 * ins['share']:.1f} % |"]
        alone = res.get("ssm", {}).get("in_step")
        if alone and "step" in res:
            tot = sum(r["forward_backward"]["median"] for r in alone)
            st2 = res["step"]["networks"]["dsm_stage2"]["seconds"]["median"]
            L.append(f"| the SSM alone at the same shapes (sum) | – | – | {_f(tot, 4)} | {100 * tot / st2:.1f} % |")
        prof = res.get("profile")
        if prof and prof.get("ssm_share_profiled") is not None:
            L.append(f"| torch.profiler (one step, profiler overhead included) | – | – | – | "
                     f"{100 * prof['ssm_share_profiled']:.1f} % |")
        L.append("")
    if "profile" in res:
        p = res["profile"]
        L += ["## Profile of one Stage 2 training step", "",
              f"torch.profiler, CPU; the step took {p['wall_seconds']:.2f} s under the profiler, "
              f"{p['profiled_self_cpu_seconds']:.2f} s of self CPU time in total (shares below are of that).", "",
              "### By module (forward: ops inside the module; backward: autograd nodes its forward created)", "",
              "| module | forward s | backward s | total s | share |", "|---|---|---|---|---|"]
        for r in p["modules"][:20]:
            L.append(f"| {r['module']} | {_f(r['forward'])} | {_f(r['backward'])} | {_f(r['total'])} | "
                     f"{100 * r['share']:.1f} % |")
        L += ["", "### Operators by self CPU time", "", "| operator | calls | self CPU s | share |",
              "|---|---|---|---|"]
        for r in p["operators"]:
            L.append(f"| `{r['operator']}` | {r['calls']} | {_f(r['self_cpu'])} | {100 * r['share']:.1f} % |")
        L += ["", "### Hotspots: module × operator by self CPU time", "",
              "| module | phase | operator | self CPU s | share |", "|---|---|---|---|---|"]
        for r in p["module_operators"]:
            L.append(f"| {r['module']} | {r['phase']} | `{r['operator']}` | {_f(r['self_cpu'])} | "
                     f"{100 * r['share']:.1f} % |")
        L.append("")
    return "\n".join(L) + "\n"


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


if __name__ == "__main__":
    main()
