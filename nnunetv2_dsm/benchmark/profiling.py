"""One Stage 2 training step under ``torch.profiler``: operators by self CPU time, and that time attributed to
modules (forward ops by the innermost labelled module, backward ops by the module whose forward created their
autograd node)."""
from __future__ import annotations

import gc
from typing import Dict, Optional

import torch

from .plans import log
from .runner import make_batch, make_trainer, timed


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
