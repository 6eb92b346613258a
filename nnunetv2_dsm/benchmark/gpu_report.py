"""The GPU check's report: the figures the issue asks for from a benchmark.json (``summarize_benchmark``) and
OUT/gpu_check.md (``render_markdown``), with the issue's targets."""
from __future__ import annotations

from typing import Dict, List

TARGETS = {"step": 1.3, "memory": 1.3, "predict": 1.2, "ct_seconds": 60.0}


def summarize_benchmark(res: Dict) -> Dict:
    """The figures the issue asks for, from a benchmark.json: medians, ratios to nnU-Net, the targets."""
    out: Dict = {"ssm_backend": res.get("machine", {}).get("ssm_backend")}
    step = res.get("step", {}).get("networks", {})
    if "dsm_stage2" in step and "nnunet" in step:
        s, n = step["dsm_stage2"]["seconds"]["median"], step["nnunet"]["seconds"]["median"]
        out["step"] = {"stage2_s": s, "nnunet_s": n, "ratio": s / n, "target": TARGETS["step"]}
    mem = res.get("memory", {}).get("networks", {})
    if "dsm_stage2" in mem and "nnunet" in mem:
        key = "cuda_max_allocated_mb" if "cuda_max_allocated_mb" in mem["nnunet"] else "delta_rss_mb"
        s, n = mem["dsm_stage2"].get(key), mem["nnunet"].get(key)
        out["memory"] = {"measure": key, "stage2_mb": s, "nnunet_mb": n, "ratio": s / n if s and n else None,
                         "target": TARGETS["memory"], "error": mem["dsm_stage2"].get("error")}
    pred = res.get("predict", {})
    if "dsm_stage2" in pred.get("networks", {}) and "nnunet" in pred.get("networks", {}):
        s = pred["networks"]["dsm_stage2"]["seconds"]["median"]
        n = pred["networks"]["nnunet"]["seconds"]["median"]
        out["predict"] = {"volume": pred.get("volume"), "tiles": pred.get("tiles"), "stage2_s": s, "nnunet_s": n,
                          "ratio": s / n, "target": TARGETS["predict"], "ct_target_s": TARGETS["ct_seconds"]}
    return out


# ----------------------------------------------------------------------------------------------------- report
def _ok(flag) -> str:
    return "–" if flag is None else ("PASS" if flag else "FAIL")


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None else (f"{x:.{digits}g}" if isinstance(x, float) else str(x))


def _header_lines(res: Dict) -> List[str]:
    """Title, dry-run note, failed sections and the build line."""
    lines: List[str] = []
    lines += [f"# GPU check ({res['machine'].get('gpu', 'no GPU')}, torch {res['machine']['torch']}, "
             f"{res['started']})", ""]
    if res.get("dry_run"):
        lines += ["**Dry run on the CPU at toy sizes: these figures check the script, not the GPU.**", ""]
    for key in ("build", "kernels", "train_step", "bench_kernel", "bench_torch", "compile"):
        if "error" in res.get(key, {}):
            lines.append(f"- **{key} failed**: {res[key]['error']}")
    bld = res.get("build", {})
    if "arch" in bld and "error" not in bld:
        lines.append(f"- build: selective_scan_cuda for sm_{str(bld['arch']).replace('.', '')} in {bld.get('seconds')} s; "
                     f"`import mamba_ssm`: {bld.get('package_import')}"
                     + (f"; __init__ cut down, kernels: {bld.get('kernels_import_after_trim')}"
                        if bld.get("init_trimmed") else ""))
    return lines


def _kernel_lines(res: Dict) -> List[str]:
    """(a) the kernel vs the PyTorch scan, fp32 and autocast fp16."""
    lines: List[str] = []
    k = res.get("kernels", {})
    if "scan_fp32" in k:
        lines += ["", f"## (a) mamba-ssm kernel vs PyTorch scan (import: {k['import'].get('import')})", "",
                  "| check | length | output rel. err | max grad rel. err | kernel ms | torch ms | |",
                  "|---|---|---|---|---|---|---|"]
        for r in k["scan_fp32"]:
            if "error" in r:
                lines.append(f"| scan fp32 | {r['shape_b_d_n_L'][3]} | {r['error']} | | | | FAIL |")
                continue
            lines.append(f"| scan fp32 | {r['shape_b_d_n_L'][3]} | {_fmt(r['output_rel_err'])} | "
                         f"{_fmt(r['grad_rel_err'])} | {r['kernel_ms']} | {r['torch_ms']} | {_ok(r['pass'])} |")
        for r in k.get("mamba_block_autocast_fp16", []):
            if "error" in r:
                lines.append(f"| Mamba block {r['autocast']} | {r['L']} | {r['error']} | | | | FAIL |")
                continue
            lines.append(f"| Mamba block {r['autocast']} | {r['L']} | {_fmt(r['output_rel_err'])} | "
                         f"{_fmt(r['grad_rel_err'])} | | | {_ok(r['pass'])} |")
    return lines


def _train_step_lines(res: Dict) -> List[str]:
    """(b) one Stage 2 train_step per backend."""
    lines: List[str] = []
    t = res.get("train_step", {})
    if "mamba" in t:
        lines += ["", f"## (b) one Stage 2 train_step, patch {t['patch']}, batch {t['batch_size']}", "",
                  "| backend | loss | finite loss / grads | params without grad | GradScaler scale | peak GiB | |",
                  "|---|---|---|---|---|---|---|"]
        for name in ("mamba", "torch"):
            r = t[name]
            if "error" in r:
                lines.append(f"| {name} | {r['error']} | | | | | FAIL |")
                continue
            lines.append(f"| {r['backend']} | {_fmt(r['loss'], 5)} | {r['loss_finite']} / {r['grads_finite']} | "
                         f"{len(r['params_without_grad'])} | {r['grad_scaler']} | {r['peak_allocated_gib']} | "
                         f"{_ok(r['pass'])} |")
    return lines


def _benchmark_rows(res: Dict) -> List[str]:
    """(c), (d): step time, step memory and prediction against nnUNetTrainer, per SSM backend."""
    rows = []
    for key, label in (("bench_kernel", "kernels"), ("bench_torch", "PyTorch scan")):
        b = res.get(key, {})
        label = f"{label}; ran: {b.get('ssm_backend')}"  # the benchmark's own record of the backend it used
        if "step" in b:
            rows.append(f"| Stage 2 step ({label}) | {_fmt(b['step']['stage2_s'])} s | {_fmt(b['step']['nnunet_s'])} s"
                        f" | {_fmt(b['step']['ratio'])}× | ≤ {TARGETS['step']}× | {_ok(b['step']['ratio'] <= TARGETS['step'])} |")
        if b.get("memory", {}).get("ratio") is not None:
            m = b["memory"]
            rows.append(f"| Stage 2 step memory ({label}, {m['measure']}) | {_fmt(m['stage2_mb'])} MB | "
                        f"{_fmt(m['nnunet_mb'])} MB | {_fmt(m['ratio'])}× | ≤ {TARGETS['memory']}× | "
                        f"{_ok(m['ratio'] <= TARGETS['memory'])} |")
        if "predict" in b:
            p = b["predict"]
            rows.append(f"| prediction {p['volume']} ({label}, {p['tiles']} tiles) | {_fmt(p['stage2_s'])} s | "
                        f"{_fmt(p['nnunet_s'])} s | {_fmt(p['ratio'])}× | ≤ {TARGETS['predict']}×, < "
                        f"{TARGETS['ct_seconds']:.0f} s | {_ok(p['ratio'] <= TARGETS['predict'] and p['stage2_s'] < TARGETS['ct_seconds'])} |")
    return rows


def _compile_lines(res: Dict) -> List[str]:
    """(e) nnUNet_compile=1: graphs per step, step times, graph breaks."""
    lines: List[str] = []
    c = res.get("compile", {})
    if "graphs_after_each_step" in c:
        lines += ["", f"## nnUNet_compile=1: Stage 2 (narrow decoders) under torch.compile, patch {c['patch']}", "",
                  f"- graphs compiled after each train_step: {c['graphs_after_each_step']} (no recompiling: "
                  f"constant) — {_ok(c['pass'])}",
                  f"- step seconds: {c['step_seconds']} (the first includes compiling); {c['backend']}",
                  f"- graph breaks: {len(c['graph_breaks'])} kinds" + (f", e.g. {c['graph_breaks'][0]}"
                                                                       if c["graph_breaks"] else "")]
    return lines


def render_markdown(res: Dict) -> str:
    """The GPU check as Markdown (docs/performance.md's GPU section is copied from it)."""
    lines = _header_lines(res) + _kernel_lines(res) + _train_step_lines(res) + _compile_lines(res)
    rows = _benchmark_rows(res)
    if rows:
        lines += ["", "## (c), (d) against nnUNetTrainer on the same plans", "",
                  "| measure | DSM Stage 2 | nnU-Net | ratio | target | |", "|---|---|---|---|---|---|", *rows]
    return "\n".join(lines) + "\n"
