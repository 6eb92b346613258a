"""The targets (ratios to nnU-Net measured in the same run) and the Markdown report."""
from __future__ import annotations

from typing import Dict, List, Optional

from .plans import LABELS, SSM_BATCH, TARGETS


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
