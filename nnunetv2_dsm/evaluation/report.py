"""Writing a folder evaluation (``evaluate.evaluate_folder``'s summary): nnU-Net's ``summary.json``, DSM's
``dsm_summary.json`` and ``metrics.csv``, and the console table."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import List, Tuple

import numpy as np

from nnunetv2_dsm.evaluation.nnunet_summary import write_nnunet_summary
from nnunetv2_dsm.io_utils import atomic_write_text

METRICS = ("DSC", "AUROC", "FPR95")
DSM_SUMMARY = "dsm_summary.json"   # the DSM figures; summary.json is nnU-Net's structure (evaluation.nnunet_summary)


def _jsonable(x):
    """NaN -> None (strict JSON has no NaN: undefined values are null), numpy scalars -> Python."""
    x = x.item() if isinstance(x, np.generic) else x
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def metrics_rows(summary: dict) -> List[Tuple[str, str, str, float]]:
    """Long format: (case, class, metric, value) for every DSC / AUROC / FPR95 computed."""
    return [(case, name, m, rec[m]) for case, recs in summary["cases"].items() for name, rec in recs.items()
            for m in METRICS if m in rec]


def write_outputs(summary: dict, output_dir) -> Tuple[Path, Path]:
    """Write, atomically into ``output_dir``: ``summary.json`` in nnU-Net's structure (``nnunet_summary``: annotated
    classes only, read by nnU-Net's tools), ``dsm_summary.json`` (this summary: DSC, AUROC, FPR95, per source; NaN as
    null) and ``metrics.csv`` (NaN as ``nan``). Returns (summary.json, metrics.csv)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, cs = out / "summary.json", out / "metrics.csv"
    atomic_write_text(out / DSM_SUMMARY, json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n")
    write_nnunet_summary(summary, str(js))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("case", "class", "metric", "value"))
    w.writerows((c, n, m, repr(float(v))) for c, n, m, v in metrics_rows(summary))
    atomic_write_text(cs, buf.getvalue())
    return js, cs


def format_table(summary: dict) -> str:
    """The per-class summary table: class | n cases | mean DSC | AUROC | FPR95 ('-' where not computed)."""
    def fmt(entry, m):
        v = entry.get(m)
        return "-" if v is None or math.isnan(v) else f"{v:.4f}"
    rows = [(n, str(e["n_cases"]), fmt(e, "DSC"), fmt(e, "AUROC"), fmt(e, "FPR95"))
            for n, e in summary["mean"].items()]
    head = ("class", "n cases", "mean DSC", "AUROC", "FPR95")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    line = lambda r: " | ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
    return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows])
