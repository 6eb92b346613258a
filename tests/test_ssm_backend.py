"""Selective-scan backend selection (nnunetv2_dsm.network.ssm_backend): mamba-ssm's kernels when they import,
pass the first check and run, else the PyTorch scan with one warning line; $nnUNet_dsm_ssm_backend forces one;
the scan stays out of torch.compile graphs. CPU only: the "kernels" here are stand-in packages on sys.path."""
import sys
import textwrap

import pytest
import torch

from nnunetv2_dsm.network import ssm, ssm_backend
from nnunetv2_dsm.network.ssm import Mamba, selective_scan_reference

CUDA = torch.device("cuda")
LOADER = ssm_backend._mamba_selective_scan_fn  # the cached import (tests may monkeypatch the module attribute)


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """No mamba_ssm module, no recorded failure, no backend variable, before and after each test."""
    for name in (ssm_backend.BACKEND_ENV, ssm_backend.LEGACY_BACKEND_ENV):
        monkeypatch.delenv(name, raising=False)

    def reset():
        LOADER.cache_clear()
        ssm_backend._kernel_failure = None
        ssm_backend._probed_devices.clear()
        for k in [k for k in sys.modules if k.split(".")[0] == "mamba_ssm"]:
            del sys.modules[k]
    reset()
    yield
    reset()


def _fake_mamba_ssm(tmp_path, monkeypatch, package_init="", interface="from nnunetv2_dsm.network.ssm import "
                    "selective_scan_reference as selective_scan_fn\n"):
    """A mamba_ssm package on sys.path: its __init__ runs ``package_init``; ops.selective_scan_interface defines
    selective_scan_fn (by default the float64 reference scan)."""
    ops = tmp_path / "mamba_ssm" / "ops"
    ops.mkdir(parents=True)
    (tmp_path / "mamba_ssm" / "__init__.py").write_text(package_init)
    (ops / "__init__.py").write_text("")
    (ops / "selective_scan_interface.py").write_text(interface)
    monkeypatch.syspath_prepend(str(tmp_path))


def _warnings(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if "mamba-ssm kernels not used" in line]


def test_cpu_uses_the_pytorch_scan_without_importing_mamba_ssm(tmp_path, monkeypatch, capsys):
    _fake_mamba_ssm(tmp_path, monkeypatch, package_init="raise RuntimeError('must not be imported')\n")
    assert ssm_backend.scan_backend(torch.zeros(1)) == "torch"
    assert "CUDA-only" in ssm_backend.backend_description("cpu")
    assert "mamba_ssm" not in sys.modules and not _warnings(capsys)


@pytest.mark.parametrize("error", ["OSError('libcudart.so.13: cannot open shared object file')",
                                   "ImportError('selective_scan_cuda')", "AttributeError('half built')",
                                   "RuntimeError('triton: no GPU found')", "ValueError('transformers too old')"])
def test_any_import_failure_falls_back_with_one_warning_line_naming_it(tmp_path, monkeypatch, capsys, error):
    _fake_mamba_ssm(tmp_path, monkeypatch, package_init=f"raise {error}\n")
    assert ssm_backend.scan_backend(CUDA) == "torch"
    assert ssm_backend.scan_backend(CUDA) == "torch"  # asked again: no second warning
    message = eval(error).args[0]
    lines = _warnings(capsys)
    assert len(lines) == 1 and message in lines[0] and type(eval(error)).__name__ in lines[0]
    description = ssm_backend.backend_description(CUDA)
    assert description.startswith("SSM selective scan: PyTorch") and message in description


def test_working_kernels_are_selected_on_cuda_only(tmp_path, monkeypatch, capsys):
    _fake_mamba_ssm(tmp_path, monkeypatch)
    assert ssm_backend.scan_backend(CUDA) == "mamba_ssm"
    assert ssm_backend.scan_backend(torch.device("cpu")) == "torch"
    assert not _warnings(capsys)


def test_the_variable_forces_a_backend(tmp_path, monkeypatch):
    _fake_mamba_ssm(tmp_path, monkeypatch)
    monkeypatch.setenv(ssm_backend.BACKEND_ENV, "torch")
    assert ssm_backend.scan_backend(CUDA) == "torch"
    assert "forced by nnUNet_dsm_ssm_backend=torch" in ssm_backend.backend_description(CUDA)
    monkeypatch.setenv(ssm_backend.BACKEND_ENV, "Mamba")
    assert ssm_backend.scan_backend(CUDA) == "mamba_ssm"
    monkeypatch.setenv(ssm_backend.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="auto, mamba, torch"):
        ssm_backend.scan_backend(CUDA)
    monkeypatch.delenv(ssm_backend.BACKEND_ENV)
    monkeypatch.setenv(ssm_backend.LEGACY_BACKEND_ENV, "torch")  # the earlier name still works
    assert ssm_backend.scan_backend(CUDA) == "torch"


def test_forcing_broken_kernels_is_an_error_naming_the_reason(tmp_path, monkeypatch):
    _fake_mamba_ssm(tmp_path, monkeypatch, package_init="raise OSError('libcudart.so.13 missing')\n")
    monkeypatch.setenv(ssm_backend.BACKEND_ENV, "mamba")
    with pytest.raises(RuntimeError, match="nnUNet_dsm_ssm_backend=mamba.*libcudart.so.13 missing"):
        ssm_backend.scan_backend(CUDA)
    monkeypatch.setenv(ssm_backend.BACKEND_ENV, "auto")  # falls back (the failure is cached) ...
    assert ssm_backend.scan_backend(CUDA) == "torch"
    monkeypatch.setenv(ssm_backend.BACKEND_ENV, "mamba")  # ... and forcing it afterwards still fails loudly
    with pytest.raises(RuntimeError, match="libcudart.so.13 missing"):
        ssm_backend.scan_backend(CUDA)


def _select_kernels(monkeypatch, fn):
    """Make run_scan use ``fn`` as the kernels on CPU tensors (the first check runs on CUDA devices only)."""
    monkeypatch.setattr(ssm_backend, "scan_backend", lambda device: "mamba_ssm")
    monkeypatch.setattr(ssm_backend, "_mamba_selective_scan_fn", lambda: fn)


def test_mamba_block_calls_the_kernels_with_mamba_ssm_arguments(monkeypatch):
    calls = []

    def kernels(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        calls.append((u.shape, delta.shape, A.shape, B.shape, C.shape, D.dtype, B.is_contiguous(), delta_softplus))
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    torch.manual_seed(0)
    m, x = Mamba(12), torch.randn(2, 10, 12)
    expected = m(x)
    _select_kernels(monkeypatch, kernels)
    torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=1e-5)
    assert calls == [((2, 24, 10), (2, 24, 10), (24, 16), (2, 16, 10), (2, 16, 10), torch.float32, True, True)]


def test_a_kernel_that_raises_falls_back_once_and_stays_off(monkeypatch, capsys):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore detail")

    torch.manual_seed(0)
    m, x = Mamba(12), torch.randn(2, 10, 12)
    expected = m(x)
    _select_kernels(monkeypatch, broken)
    torch.testing.assert_close(m(x), expected)
    torch.testing.assert_close(m(x), expected)
    assert calls == [1]  # not retried
    lines = _warnings(capsys)
    assert len(lines) == 1 and "no kernel image is available" in lines[0] and "more detail" not in lines[0]
    ssm_backend._kernel_failure = None
    monkeypatch.setenv(ssm_backend.BACKEND_ENV, "mamba")
    with pytest.raises(RuntimeError, match="no kernel image"):
        m(x)


def test_first_check_accepts_matching_kernels_and_rejects_wrong_ones():
    cpu = torch.device("cpu")
    ssm_backend._probe(selective_scan_reference, cpu)

    def off_by_one_percent(*args, **kwargs):
        return selective_scan_reference(*args, **kwargs) * 1.01

    with pytest.raises(RuntimeError, match="differ from the PyTorch scan"):
        ssm_backend._probe(off_by_one_percent, cpu)


# ------------------------------------------------------------------------------------------- torch.compile
def _compile_counting(module):
    """torch.compile with a backend that counts the graphs Dynamo hands it (and runs them eagerly)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return torch.compile(module, backend=backend), graphs


def test_compiled_mamba_keeps_the_scan_out_of_the_graph_and_does_not_recompile():
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    m = Mamba(12)
    compiled, graphs = _compile_counting(m)
    per_step = []
    for step in range(3):
        x = torch.randn(2, 50, 12)
        out = compiled(x)
        torch.testing.assert_close(out, m(x))
        out.square().mean().backward()
        per_step.append(len(graphs))
    assert per_step[0] > 0 and per_step[1:] == [per_step[0]] * 2  # graphs built in step 1 only
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert breaks and all("run_scan" in reason for reason in breaks)  # the scan's loops are never traced


def test_compiled_stage2_network_does_not_recompile_after_the_first_step():
    import torch._dynamo
    from _dsm_helpers import tiny_network
    torch._dynamo.reset()
    net = tiny_network(2, seed=0)
    compiled, graphs = _compile_counting(net)
    per_step = []
    for step in range(3):
        output = compiled(torch.randn(1, 1, 16, 16, 16))
        sum(o.float().mean() for o in output.predictions()).backward()
        per_step.append(len(graphs))
    assert per_step[0] > 0 and per_step[1:] == [per_step[0]] * 2
