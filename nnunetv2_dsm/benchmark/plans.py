"""The benchmark's shared constants and logger, the machine description, and the plans every network is built
from: nnU-Net's ExperimentPlanner on a synthetic abdominal-CT fingerprint (or a plans file), with the ``--tiny``,
``--patch`` and ``--batch-size`` overrides applied (``prepare_plans``) and summarised for the report
(``plans_summary``)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from typing import Dict, List, Optional, Sequence

import torch
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_dsm.labels import CLASS_NAMES, dataset_json_labels, regions_class_order
from nnunetv2_dsm.manifest import make_entry, make_manifest
from nnunetv2_dsm.network.dsm import DSMArchitecture
from nnunetv2_dsm.network.dsm import TINY_ARCHITECTURE
from nnunetv2_dsm.training.nnUNetTrainerDSMBase import nnUNetTrainerDSMBase


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


# ------------------------------------------------------------------------------------------------------- machine
def cpuinfo_field(key: str, cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """The value of the first ``key`` line (the first CPU's) of ``cpuinfo``; None where it cannot be read."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.lower().startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else the platform's)."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


# SIMD instruction sets by which MKL and oneDNN choose their float kernels: machines that differ in them (or in the
# library versions) may sum in a different order, and a seeded training then drifts apart (docs/accuracy.md: seed 1
# on two machines)
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> List[str]:
    """The :data:`SIMD_FLAGS` the first CPU of ``cpuinfo`` lists, in that order; [] where it cannot be read."""
    present = set((cpuinfo_field("flags", cpuinfo) or "").split())
    return [flag for flag in SIMD_FLAGS if flag in present]


def package_version(name: str) -> Optional[str]:
    """The installed version of distribution ``name``, None when it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info(device: str) -> Dict:
    """What a measurement depends on besides the code: CPU (model, SIMD flags, cores), memory, library versions."""
    info = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
        if hasattr(os, "sysconf") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nnunetv2": version("nnunetv2"),
        "libraries": {name: package_version(name) for name in ("numpy", "scipy", "SimpleITK")},
        "platform": platform.platform(),
        "device": device,
        "loadavg_start": list(os.getloadavg()),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        try:
            from nnunetv2_dsm.network.ssm import scan_backend  # in the try: the CUDA kernels may fail to load
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
