"""The timed training steps of every network (``bench_step``), with the SSM's share of a Stage 2 step measured
inside them (``SSMTimer``), and the SSM timed alone (``bench_ssm``), also at the four in-step shapes."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Dict, List, Sequence

import numpy as np
import torch

from nnunetv2_dsm.network.backbone import kmmm_stage_indices, stage_scales
from nnunetv2_dsm.network.kmeans_layer import VoxelSequenceSSM

from .memory import rss_mb
from .plans import LABELS, SSM_BATCH, SSM_QUERIES, log
from .runner import make_batch, make_trainer, release_memory, rotated, stats, sync, timed


# ----------------------------------------------------------------------------------------------------- SSM timer
class SSMTimer:
    """Times the VoxelSequenceSSM calls inside a training step: forward by module hooks; backward from the moment
    the gradient of the SSM's output is complete (tensor hook on the output) to the moment the gradient of its input
    is (tensor hook on the input)."""

    def __init__(self, modules: Sequence[torch.nn.Module], device: str):
        self.device = device
        self.handles = []
        self.reset()
        for module in modules:
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(self._post))

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
    """Median seconds of a full training step per network (rounds in rotating order), and the SSM's share of
    the Stage 2 step measured with hooks inside the timed steps."""
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
        trainer = trainers[n]
        out["networks"][n] = {
            "seconds": stats(times[n]),
            "parameters": sum(p.numel() for p in trainer.network.parameters()),
            "optimizer": type(trainer.optimizer).__name__,
            "loss": type(trainer.loss).__name__
            + (f"({type(trainer.loss.loss).__name__})" if hasattr(trainer.loss, "loss") else ""),
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


# ---------------------------------------------------------------------------------------------------------- SSM
def _ssm_times(shape: Sequence[int], device: str, warmup: int, reps: int, seed: int) -> Dict:
    """Median seconds of VoxelSequenceSSM on one input ``shape``: forward without gradient, forward + backward."""
    torch.manual_seed(seed)
    module = VoxelSequenceSSM(shape[1]).to(device)
    x = torch.randn(*shape, device=device)
    w = torch.randn(*shape, device=device)

    def fwd():
        with torch.no_grad():
            module(x)

    def fwd_bwd():
        xi = x.detach().requires_grad_()
        (module(xi) * w).sum().backward()

    f = [timed(fwd, device) for _ in range(warmup + reps)][warmup:]
    fb = [timed(fwd_bwd, device) for _ in range(warmup + reps)][warmup:]
    return {"shape": list(shape), "tokens": int(np.prod(shape[2:])), "forward": stats(f), "forward_backward": stats(fb)}


def bench_ssm(setup: Dict, sizes: Sequence[int], warmup: int, reps: int, in_step_shapes=None) -> Dict:
    """The SSM alone on (2, 25, s, s, s) inputs for each size, and at the Stage 2 step's own input shapes."""
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
    cfg = setup["plans"]["configurations"][setup["configuration"]]
    strides = cfg["architecture"]["arch_kwargs"]["strides"]
    scales = stage_scales(strides)
    patch = cfg["patch_size"]
    return [[cfg["batch_size"], SSM_QUERIES, *[int(round(p * s)) for p, s in zip(patch, scales[i])]]
            for i in kmmm_stage_indices(len(strides))]
