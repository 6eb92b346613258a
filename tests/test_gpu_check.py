"""The GPU check's CPU-testable parts: the one-architecture build plan of mamba-ssm's selective scan, the
package-import repair of a built copy, and the report's ratios against the issue's targets."""
import io
import json
import os
import sys
import tarfile

import pytest

from nnunetv2_dsm.benchmark import gpu_check, mamba_build


def _fake_sdist(tmp_path, init="__version__ = '9.9'\n"):
    """A mamba-ssm-shaped sdist: setup.py, pyproject.toml, csrc/selective_scan sources, mamba_ssm/ with ops."""
    files = {"setup.py": "raise SystemExit('never run')\n", "pyproject.toml": "[project]\nname='x'\n",
             "csrc/selective_scan/selective_scan.cpp": "", "csrc/selective_scan/selective_scan_fwd_fp32.cu": "",
             "csrc/selective_scan/selective_scan_bwd_fp16_real.cu": "", "csrc/selective_scan/static_switch.h": "",
             "mamba_ssm/__init__.py": init, "mamba_ssm/ops/__init__.py": "",
             "mamba_ssm/ops/selective_scan_interface.py": "selective_scan_fn = 'kernels'\n"}
    path = tmp_path / "mamba_ssm-9.9.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"mamba_ssm-9.9/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_build_plan_compiles_the_selective_scan_sources_for_one_architecture(tmp_path):
    work = tmp_path / "work"
    plan = mamba_build.build(str(_fake_sdist(tmp_path)), str(tmp_path / "site"), arch="9.0", dry_run=True,
                             workdir=str(work))
    assert plan["sources"] == ["csrc/selective_scan/selective_scan.cpp",
                               "csrc/selective_scan/selective_scan_bwd_fp16_real.cu",
                               "csrc/selective_scan/selective_scan_fwd_fp32.cu"]
    flags = plan["nvcc_flags"]
    assert [flags[i + 1] for i, f in enumerate(flags) if f == "-gencode"] == ["arch=compute_90,code=sm_90"]
    assert sum(f.startswith("-std=c++") for f in flags) == 1
    setup = (work / "build_selective_scan" / "setup.py").read_text()  # outside the sdist (its pyproject.toml)
    compile(setup, "setup.py", "exec")
    assert "selective_scan_fwd_fp32.cu" in setup and "packages=[]" in setup
    with pytest.raises(SystemExit, match="compute capability"):
        mamba_build.gencode("sm90")


def test_a_broken_package_init_is_cut_down_so_the_kernels_import(tmp_path):
    site = tmp_path / "site"
    (site / "mamba_ssm" / "ops").mkdir(parents=True)
    (site / "mamba_ssm" / "__init__.py").write_text("__version__ = '9.9'\nimport transformers_that_is_missing\n")
    (site / "mamba_ssm" / "ops" / "__init__.py").write_text("")
    (site / "mamba_ssm" / "ops" / "selective_scan_interface.py").write_text("selective_scan_fn = 1\n")
    out = mamba_build.check_package_import(str(site), trim_if_broken=True)
    assert "transformers_that_is_missing" in out["package_import"] and out["init_trimmed"]
    assert out["kernels_import_after_trim"] == "ok"
    assert (site / "mamba_ssm" / "__init__.py").read_text().startswith("__version__ = '9.9'\n")
    assert mamba_build.check_package_import(str(site), trim_if_broken=True) == {"package_import": "ok"}


def _bench(stage2_step, memory, predict):
    return {"machine": {"ssm_backend": "mamba_ssm"},
            "step": {"networks": {"nnunet": {"seconds": {"median": 1.0}}, "dsm_stage2": {"seconds": {"median": stage2_step}}}},
            "memory": {"networks": {"nnunet": {"cuda_max_allocated_mb": 1000.0},
                                    "dsm_stage2": {"cuda_max_allocated_mb": memory}}},
            "predict": {"volume": [300, 512, 512], "tiles": 252,
                        "networks": {"nnunet": {"seconds": {"median": 20.0}}, "dsm_stage2": {"seconds": {"median": predict}}}}}


def test_report_ratios_and_targets():
    good, bad = gpu_check.summarize_benchmark(_bench(1.2, 1250.0, 23.0)), gpu_check.summarize_benchmark(_bench(1.4, 1400.0, 61.0))
    assert good["step"]["ratio"] == pytest.approx(1.2) and good["memory"]["ratio"] == pytest.approx(1.25)
    assert good["predict"]["ratio"] == pytest.approx(1.15) and good["ssm_backend"] == "mamba_ssm"
    res = {"machine": {"torch": "x", "gpu": "H200"}, "started": "now", "bench_kernel": good, "bench_torch": bad}
    md = gpu_check.render_markdown(res).splitlines()
    kernel_rows = [line for line in md if "kernels; ran: mamba_ssm" in line]
    torch_rows = [line for line in md if "PyTorch scan; ran: mamba_ssm" in line]
    assert len(kernel_rows) == 3 and all(line.endswith("| PASS |") for line in kernel_rows)
    assert len(torch_rows) == 3 and all(line.endswith("| FAIL |") for line in torch_rows)  # 1.4×, 1.4×, 61 s


def test_only_runs_the_named_sections_and_gives_them_the_whole_budget(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(gpu_check, "check_kernels", lambda *a, **k: calls.append(("kernels",)) or {})
    monkeypatch.setattr(gpu_check, "check_train_step", lambda *a, **k: calls.append(("train_step",)) or {})
    monkeypatch.setattr(gpu_check, "run_compile_check",
                        lambda device, patch, timeout: calls.append(("compile", timeout)) or {"pass": True})
    monkeypatch.setattr(gpu_check, "run_benchmark",
                        lambda out, name, sections, args, timeout: calls.append((name, timeout)) or {})
    gpu_check.main(["--dry-run", "-o", str(tmp_path / "a"), "--only", "compile", "--budget", "100"])
    assert [c[0] for c in calls] == ["compile"] and 90 < calls[0][1] <= 95   # alone: all of the budget
    saved = json.loads((tmp_path / "a" / "gpu_check.json").read_text())
    assert saved["sections"] == ["compile"] and "compile" in saved and "kernels" not in saved
    calls.clear()
    gpu_check.main(["--dry-run", "-o", str(tmp_path / "b"), "--budget", "1000"])
    assert [c[0] for c in calls] == ["kernels", "train_step", "auto", "compile", "torch"]
    timeouts = dict((c[0], c[1]) for c in calls if len(c) == 2)
    assert 590 < timeouts["auto"] <= 600 and timeouts["compile"] <= 180   # shares when later sections follow
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "-o", str(tmp_path / "c"), "--only", "bogus"])
