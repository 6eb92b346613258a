"""scripts/benchmark.py runs end to end on a tiny configuration and writes its Markdown table and JSON.

Not a timing test: it only checks that every section ran, the figures are positive and the ratios are there.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "benchmark.py"
TINY = ["--tiny", "--threads", "1", "--patch", "32", "32", "32", "--batch-size", "1", "--volume", "48", "48", "48",
        "--reps", "1", "--warmup", "0", "--ssm-sizes", "6", "12"]
NETS = ("nnunet", "dsm_stage1", "dsm_stage2")


@pytest.mark.slow  # ~135 s on 2 cores: every section of the benchmark on every network
def test_benchmark_script_writes_table_and_json_on_a_tiny_configuration(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "-o", str(out)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "benchmark.json").read_text())
    md = (out / "benchmark.md").read_text()

    # machine and plans
    m = res["machine"]
    assert m["cpu"] and m["torch"] and m["nnunetv2"] and m["device"] == "cpu" and len(m["loadavg_start"]) == 3
    assert res["plans"]["patch_size"] == [32, 32, 32] and res["plans"]["batch_size"] == 1
    assert res["plans"]["as_planned"]["batch_size"] >= 2 and res["plans"]["n_stages"] >= 4

    # every section, every network, positive figures
    for n in NETS:
        assert res["step"]["networks"][n]["seconds"]["median"] > 0
        assert res["memory"]["networks"][n]["peak_rss_mb"] > res["memory"]["networks"][n]["baseline_rss_mb"] > 0
        assert res["predict"]["networks"][n]["seconds"]["median"] > 0
    assert res["step"]["networks"]["nnunet"]["optimizer"] == "SGD"
    assert res["step"]["networks"]["dsm_stage2"]["optimizer"] == "AdamW"
    assert res["predict"]["tiles"] == 8 and res["predict"]["volume"] == [48, 48, 48]
    assert [r["s"] for r in res["ssm"]["sizes"]] == [6, 12]
    assert all(r["forward"]["median"] > 0 and r["forward_backward"]["median"] > 0 for r in res["ssm"]["sizes"])
    ins = res["step"]["ssm_in_stage2_step"]
    assert ins["calls_per_step"] == 4 and ins["forward"] > 0 and ins["backward"] > 0 and 0 < ins["share"] < 1
    assert res["profile"]["operators"] and any(r["module"] == "kmmm.*.ssm" for r in res["profile"]["modules"])

    # targets and the Markdown table
    assert {t["target"] for t in res["targets"]} >= {"Stage 2 training step / nnU-Net",
                                                     "DSM Stage 2 prediction / nnU-Net",
                                                     "Stage 2 step memory / nnU-Net", "SSM share of a Stage 2 step"}
    assert all(t["value"] > 0 and isinstance(t["pass"], bool) for t in res["targets"])
    for heading in ("## Targets", "## Training step", "## Peak memory", "## Sliding-window prediction",
                    "## The SSM alone", "## The SSM inside a Stage 2 training step", "## Profile of one Stage 2"):
        assert heading in md
    assert "ratio to nnU-Net" in md and "ratio step" in md and "| DSM Stage 2 |" in md
    assert m["cpu"] in md
