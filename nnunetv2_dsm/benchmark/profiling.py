"""One Stage 2 training step under ``torch.profiler``: operators by self CPU time, and that time attributed to
modules (forward ops by the innermost labelled module, backward ops by the module whose forward created their
autograd node)."""
from __future__ import annotations

import gc
from typing import Dict, Optional

import torch
from torch.profiler import ProfilerActivity, profile

from .plans import log
from .runner import make_batch, make_trainer, timed


# ------------------------------------------------------------------------------------------------------ profile
MOD_PREFIX = "mod::"
BWD_PREFIX = "autograd::engine::evaluate_function: "


def _module_label(path: str) -> Optional[str]:
    """Module paths with at most two named parts are labelled (indices become *): 'kmmm.*.ssm',
    'tumor.diffusion.*', 'backbone.encoder'; deeper modules count towards their labelled ancestor."""
    if path == "":
        return "network (glue: mask logits, k-means assignment, anomaly prompt, ...)"
    parts = path.split(".")
    named = [part for part in parts if not part.isdigit()]
    if len(named) > 2:
        return None
    label = ".".join("*" if part.isdigit() else part for part in parts)
    return {"backbone.decoder_stages": "backbone.decoder", "backbone.decoder_transpconvs": "backbone.decoder"}.get(
        label, label)


def _install_labels(network: torch.nn.Module, loss: torch.nn.Module):
    """Wrap every labelled module's forward (and the loss) in a ``mod::<label>`` profiler range; returns the hook
    handles to remove."""
    stack, handles = [], []

    def pre(label):
        def hook(module, args):
            record = torch.profiler.record_function(MOD_PREFIX + label)
            record.__enter__()
            stack.append(record)
        return hook

    def post(module, args, out):
        stack.pop().__exit__(None, None, None)

    modules = [(path, module) for path, module in network.named_modules()] + [("<loss>", loss)]
    for path, module in modules:
        label = "loss" if path == "<loss>" else _module_label(path)
        if label is None:
            continue
        handles.append(module.register_forward_pre_hook(pre(label)))
        handles.append(module.register_forward_hook(post))
    return handles


def _forward_label(event) -> Optional[str]:
    """The innermost ``mod::`` range around a forward event; None inside a backward node or outside any module."""
    parent = event
    while parent is not None:
        if parent.name.startswith(MOD_PREFIX):
            return parent.name[len(MOD_PREFIX):]
        if parent.name.startswith(BWD_PREFIX):
            return None
        parent = parent.cpu_parent
    return None


def _enclosing_backward(event):
    """The autograd node evaluation an event runs in (itself included), or None for a forward event."""
    parent = event
    while parent is not None:
        if parent.name.startswith(BWD_PREFIX):
            return parent
        parent = parent.cpu_parent
    return None


def _profiled_step(setup: Dict, warmup: int):
    """Build DSM Stage 2, warm up, and profile one training step with module labels; returns (events, operator
    averages, wall seconds of the step). The trainer is released before returning."""
    device = setup["device"]
    log("profile: building DSM Stage 2")
    trainer = make_trainer("dsm_stage2", setup)
    batch = make_batch(trainer, setup, setup["seed"])
    for _ in range(max(warmup, 1)):
        trainer.train_step(batch)
    handles = _install_labels(trainer.network, trainer.loss)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    log("profile: one profiled Stage 2 step")
    with profile(activities=activities) as prof:
        wall = timed(lambda: trainer.train_step(batch), device)
    for handle in handles:
        handle.remove()
    del trainer
    gc.collect()
    return list(prof.events()), prof.key_averages(), wall


def _creator_labels(events) -> Dict[int, str]:
    """Sequence number -> label of the forward op that created the autograd node (the last op started with it)."""
    seq_label, seq_start = {}, {}
    for event in events:
        if event.sequence_nr is None or event.sequence_nr < 0 or event.name.startswith((MOD_PREFIX, BWD_PREFIX)):
            continue
        if _enclosing_backward(event) is not None:
            continue
        label = _forward_label(event)
        start = event.time_range.start
        if label is not None and start >= seq_start.get(event.sequence_nr, -1):
            seq_label[event.sequence_nr], seq_start[event.sequence_nr] = label, start
    return seq_label


def _attribute_self_time(events, seq_label: Dict[int, str]):
    """Self CPU seconds by module and phase, and by (module, phase, operator); returns (by_module, by_module_op,
    total). Forward ops count for their innermost module, backward ops for the module whose forward created their
    node; the ``mod::`` ranges' own self time (Python between ops) counts for that module's forward."""
    other = "optimiser step, gradient clipping, other (outside the network)"
    unattributed_bwd = "backward: gradient accumulation and unattributed nodes"
    by_module: Dict[str, Dict[str, float]] = {}
    by_module_op: Dict[tuple, float] = {}
    total = 0.0
    for event in events:
        if event.name.startswith(MOD_PREFIX):
            continue
        self_time = event.self_cpu_time_total / 1e6
        total += self_time
        backward = _enclosing_backward(event)
        if backward is not None:
            label, phase = seq_label.get(backward.sequence_nr, unattributed_bwd), "backward"
        else:
            label, phase = _forward_label(event) or other, "forward"
        by_module.setdefault(label, {"forward": 0.0, "backward": 0.0})[phase] += self_time
        op = event.name[len(BWD_PREFIX):] if event.name.startswith(BWD_PREFIX) else event.name
        by_module_op[(label, phase, op)] = by_module_op.get((label, phase, op), 0.0) + self_time
    for event in events:
        if event.name.startswith(MOD_PREFIX):
            self_time = event.self_cpu_time_total / 1e6
            total += self_time
            by_module.setdefault(event.name[len(MOD_PREFIX):], {"forward": 0.0, "backward": 0.0})["forward"] += \
                self_time
    return by_module, by_module_op, total


def _operator_rows(averages, total: float, top: int) -> list:
    """The ``top`` operators by self CPU time (module ranges left out), with their share of ``total``."""
    rows = []
    for average in sorted(averages, key=lambda a: -a.self_cpu_time_total):
        if average.key.startswith(MOD_PREFIX):
            continue
        rows.append({"operator": average.key, "self_cpu": average.self_cpu_time_total / 1e6, "calls": average.count,
                     "share": average.self_cpu_time_total / 1e6 / total})
        if len(rows) >= top:
            break
    return rows


def profile_stage2(setup: Dict, warmup: int, top: int = 15) -> Dict:
    """Profile one Stage 2 training step: self CPU time by module (forward/backward), by operator (the ``top``),
    by module × operator, and the SSM modules' share."""
    events, averages, wall = _profiled_step(setup, warmup)
    by_module, by_module_op, total = _attribute_self_time(events, _creator_labels(events))
    modules = sorted(({"module": k, "forward": v["forward"], "backward": v["backward"],
                       "total": v["forward"] + v["backward"], "share": (v["forward"] + v["backward"]) / total}
                      for k, v in by_module.items()), key=lambda r: -r["total"])
    pairs = sorted(({"module": k[0], "phase": k[1], "operator": k[2], "self_cpu": v, "share": v / total}
                    for k, v in by_module_op.items()), key=lambda r: -r["self_cpu"])[:top]
    ssm = [row for row in modules if row["module"].endswith(".ssm")]
    return {"wall_seconds": wall, "profiled_self_cpu_seconds": total, "modules": modules,
            "operators": _operator_rows(averages, total, top), "module_operators": pairs,
            "ssm_share_profiled": sum(row["total"] for row in ssm) / total if total else None}
