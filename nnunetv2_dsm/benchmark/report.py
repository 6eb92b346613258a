"""The targets (ratios to nnU-Net measured in the same run) and the Markdown report."""
from __future__ import annotations

from typing import Dict, List, Optional

from .plans import LABELS, SSM_BATCH, TARGETS


# ------------------------------------------------------------------------------------------------------ targets
def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b, or None when either is missing or b is not positive."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def evaluate_targets(res: Dict) -> List[Dict]:
    """One row per target that the results allow to check: measured value, limit, pass/fail and a note."""
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
    """A number for a table cell: fewer decimals for large values, "–" for None."""
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
    """A target's result for the table: pass, **MISS**, or "–" when it could not be measured."""
    return "–" if p is None else ("pass" if p else "**MISS**")


def render_markdown(res: Dict) -> str:
    """The whole report: the run's machine, plans and settings, then one section per part that was measured."""
    sections = (_header_lines, _target_lines, _step_lines, _memory_lines, _predict_lines, _ssm_lines,
                _ssm_in_step_lines, _profile_lines)
    lines = [line for section in sections for line in section(res)]
    return "\n".join(lines) + "\n"


def _header_lines(res: Dict) -> List[str]:
    """Title, machine, plans and benchmark settings, one paragraph each."""
    machine, plans, settings = res["machine"], res["plans"], res["settings"]
    gpu = f" ({machine['gpu']}, CUDA {machine['cuda']})" if machine.get("gpu") else ""
    planned = plans["as_planned"]
    tiny = " **--tiny: narrow networks, not a comparison.**" if settings["tiny"] else ""
    return [
        "# DSM vs nnU-Net benchmark", "",
        f"Machine: {machine['cpu']}, {machine['cpu_count']} CPUs (affinity {machine['affinity']}), "
        f"{machine['memory_gib']} GiB; torch {machine['torch']} ({machine['torch_threads']} threads), nnunetv2 "
        f"{machine['nnunetv2']}, Python {machine['python']}; device **{machine['device']}**{gpu}; SSM scan backend "
        f"{machine.get('ssm_backend')}; load average at start {', '.join(f'{x:.2f}' for x in machine['loadavg_start'])}"
        f", at end {', '.join(f'{x:.2f}' for x in machine.get('loadavg_end', []))}.", "",
        f"Plans: {plans['source']}. Configuration `{plans['configuration']}`: patch {plans['patch_size']}, batch size "
        f"{plans['batch_size']}, spacing {plans['spacing']}, {plans['network']} with {plans['n_stages']} stages, "
        f"features {plans['features_per_stage']}, strides {plans['strides']} (as planned: patch "
        f"{planned['patch_size']}, batch {planned['batch_size']}, {planned['n_stages']} stages). DSM decoder widths: "
        f"{plans['dsm_architecture']}.", "",
        f"Settings: warm-up {settings['warmup']}, repetitions {settings['reps']} (prediction "
        f"{settings['predict_reps']}; medians; rounds alternate the networks in rotating order), "
        f"{settings['threads']} torch thread(s), {settings['started']} → {settings['finished']} "
        f"({settings['wall_seconds']:.0f} s).{tiny}", ""]


def _target_lines(res: Dict) -> List[str]:
    """The targets table (ratios to nnU-Net measured in the same run), if any target was evaluated."""
    targets = res.get("targets", [])
    if not targets:
        return []
    lines = ["## Targets (ratios to nnU-Net in the same run)", "", "| target | measured | limit | result | note |",
             "|---|---|---|---|---|"]
    for target in targets:
        times = target["unit"] == "×"
        value = "–" if target["value"] is None else \
            (f"{target['value']:.2f}×" if times else f"{100 * target['value']:.1f} %")
        limit = f"≤ {target['limit']}×" if times else f"≤ {100 * target['limit']:.0f} %"
        lines.append(f"| {target['target']} | {value} | {limit} | {_pass(target['pass'])} | {target['note']} |")
    return lines + [""]


def _step_lines(res: Dict) -> List[str]:
    """The training step table: time per network and its ratio to nnU-Net."""
    if "step" not in res:
        return []
    networks = res["step"]["networks"]
    base = networks.get("nnunet", {}).get("seconds", {}).get("median")
    lines = ["## Training step (forward + loss + backward + clipping + optimiser step)", "",
             "| network | median s | min s | max s | ratio to nnU-Net | parameters | optimiser | loss | DS outputs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in networks.items():
        seconds = row["seconds"]
        lines.append(f"| {LABELS[name]} | {_f(seconds['median'])} | {_f(seconds['min'])} | {_f(seconds['max'])} | "
                     f"{_f(ratio(seconds['median'], base), 2)}× | {row['parameters'] / 1e6:.2f} M | "
                     f"{row['optimizer']} | {row['loss']} | {row['deep_supervision_outputs']} |")
    return lines + [""]


def _memory_lines(res: Dict) -> List[str]:
    """Peak memory of a training step per network (RSS, and CUDA's max allocated on a GPU)."""
    if "memory" not in res:
        return []
    networks = res["memory"]["networks"]
    base = networks.get("nnunet", {})
    cuda = "cuda_max_allocated_mb" in base
    lines = ["## Peak memory of a training step (one subprocess per network)", "",
             "| network | peak RSS MB | baseline RSS MB | step (peak − baseline) MB | ratio peak | ratio step |"
             + (" CUDA max allocated MB | ratio |" if cuda else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if cuda else "")]
    for name, row in networks.items():
        if "error" in row:
            lines.append(f"| {LABELS[name]} | failed: {row['error']} | | | | |" + (" | |" if cuda else ""))
            continue
        line = (f"| {LABELS[name]} | {_f(row['peak_rss_mb'])} | {_f(row['baseline_rss_mb'])} | "
                f"{_f(row['delta_rss_mb'])} | {_f(ratio(row['peak_rss_mb'], base.get('peak_rss_mb')), 2)}× | "
                f"{_f(ratio(row['delta_rss_mb'], base.get('delta_rss_mb')), 2)}× |")
        if cuda:
            line += (f" {_f(row['cuda_max_allocated_mb'])} | "
                     f"{_f(ratio(row['cuda_max_allocated_mb'], base['cuda_max_allocated_mb']), 2)}× |")
        lines.append(line)
    return lines + [""]


def _predict_lines(res: Dict) -> List[str]:
    """Sliding-window prediction of one volume per network."""
    if "predict" not in res:
        return []
    predict = res["predict"]
    base = predict["networks"].get("nnunet", {}).get("seconds", {}).get("median")
    lines = [f"## Sliding-window prediction of one {'×'.join(map(str, predict['volume']))} volume", "",
             f"nnUNetPredictor.predict_sliding_window_return_logits, {predict['tiles']} tiles, step "
             f"{predict['step_size']}, Gaussian {'on' if predict['gaussian'] else 'off'}, mirroring "
             f"{'on' if predict['mirroring'] else 'off'}.", "",
             "| network | median s | min s | max s | s per tile | ratio to nnU-Net |", "|---|---|---|---|---|---|"]
    for name, row in predict["networks"].items():
        seconds = row["seconds"]
        lines.append(f"| {LABELS[name]} | {_f(seconds['median'])} | {_f(seconds['min'])} | {_f(seconds['max'])} | "
                     f"{_f(row['seconds_per_tile'])} | {_f(ratio(seconds['median'], base), 2)}× |")
    return lines + [""]


def _ssm_lines(res: Dict) -> List[str]:
    """The SSM module alone, per input size."""
    if "ssm" not in res:
        return []
    ssm = res["ssm"]
    lines = ["## The SSM alone", "", f"{ssm['module']}, input (2, 25, s, s, s).", "",
             "| s | tokens | forward s (no grad) | forward + backward s | µs per token (fwd+bwd) |",
             "|---|---|---|---|---|"]
    for size in ssm["sizes"]:
        both = size["forward_backward"]["median"]
        tokens = size["tokens"] * SSM_BATCH
        lines.append(f"| {size['s']} | {tokens} ({SSM_BATCH}×{size['tokens']}) | "
                     f"{_f(size['forward']['median'], 4)} | {_f(both, 4)} | {_f(1e6 * both / tokens, 3)} |")
    return lines + [""]


def _ssm_in_step_lines(res: Dict) -> List[str]:
    """The SSM's share of a Stage 2 training step: hooks in the timed steps, the SSM alone, the profiler."""
    inside = res.get("step", {}).get("ssm_in_stage2_step")
    if not inside:
        return []
    lines = ["## The SSM inside a Stage 2 training step", "",
             f"{inside['calls_per_step']} calls per step, inputs {inside['shapes']}.", "",
             "| measured | forward s | backward s | total s | share of the step |", "|---|---|---|---|---|",
             f"| hooks inside the timed steps (median) | {_f(inside['forward'], 4)} | {_f(inside['backward'], 4)} | "
             f"{_f(inside['total'], 4)} | {100 * inside['share']:.1f} % |"]
    alone = res.get("ssm", {}).get("in_step")
    if alone and "step" in res:
        total = sum(r["forward_backward"]["median"] for r in alone)
        step_seconds = res["step"]["networks"]["dsm_stage2"]["seconds"]["median"]
        lines.append(f"| the SSM alone at the same shapes (sum) | – | – | {_f(total, 4)} | "
                     f"{100 * total / step_seconds:.1f} % |")
    profile = res.get("profile")
    if profile and profile.get("ssm_share_profiled") is not None:
        lines.append(f"| torch.profiler (one step, profiler overhead included) | – | – | – | "
                     f"{100 * profile['ssm_share_profiled']:.1f} % |")
    return lines + [""]


def _profile_lines(res: Dict) -> List[str]:
    """The profile of one Stage 2 step: by module, by operator and module × operator hotspots."""
    if "profile" not in res:
        return []
    profile = res["profile"]
    lines = ["## Profile of one Stage 2 training step", "",
             f"torch.profiler, CPU; the step took {profile['wall_seconds']:.2f} s under the profiler, "
             f"{profile['profiled_self_cpu_seconds']:.2f} s of self CPU time in total (shares below are of that).", "",
             "### By module (forward: ops inside the module; backward: autograd nodes its forward created)", "",
             "| module | forward s | backward s | total s | share |", "|---|---|---|---|---|"]
    lines += [f"| {r['module']} | {_f(r['forward'])} | {_f(r['backward'])} | {_f(r['total'])} | "
              f"{100 * r['share']:.1f} % |" for r in profile["modules"][:20]]
    lines += ["", "### Operators by self CPU time", "", "| operator | calls | self CPU s | share |",
              "|---|---|---|---|"]
    lines += [f"| `{r['operator']}` | {r['calls']} | {_f(r['self_cpu'])} | {100 * r['share']:.1f} % |"
              for r in profile["operators"]]
    lines += ["", "### Hotspots: module × operator by self CPU time", "",
              "| module | phase | operator | self CPU s | share |", "|---|---|---|---|---|"]
    lines += [f"| {r['module']} | {r['phase']} | `{r['operator']}` | {_f(r['self_cpu'])} | {100 * r['share']:.1f} % |"
              for r in profile["module_operators"]]
    return lines + [""]
