"""Tests of nnunetv2_dsm.network.ssm: the pure-PyTorch selective scan against a float64 sequential reference,
the Mamba block against a direct sequential implementation, mamba_ssm v1 parameter compatibility, gradients
and the memory bound (backend selection: test_ssm_backend.py)."""
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_dsm.network import ssm
from nnunetv2_dsm.network.ssm import Mamba, selective_scan, selective_scan_reference


def _scan_inputs(b, d, n, L, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(u=r(b, d, L), delta=0.5 * r(b, d, L), A=-torch.exp(r(d, n)), B=r(b, n, L), C=r(b, n, L),
                D=r(d), z=r(b, d, L), delta_bias=r(d) - 1.0)


def _check_against_reference(ins, flags, atol, **kw):
    ins = {k: v.clone() for k, v in ins.items()}
    if not flags.get("softplus", True):  # keep Δ > 0 so the recurrence stays bounded
        ins["delta"], ins["delta_bias"] = ins["delta"].abs(), ins["delta_bias"].abs()
    for v in ins.values():
        v.requires_grad_()
    use = dict(ins)
    for k in ("D", "z", "delta_bias"):
        if not flags.get(k, True):
            use[k] = None
    y = selective_scan(**use, delta_softplus=flags.get("softplus", True), **kw)
    ref = selective_scan_reference(**use, delta_softplus=flags.get("softplus", True))
    assert y.shape == ref.shape == ins["u"].shape and y.dtype == ins["u"].dtype
    torch.testing.assert_close(y, ref, atol=atol, rtol=atol)
    gy = torch.randn_like(y)
    used = [k for k, v in use.items() if v is not None]
    g1 = torch.autograd.grad(y, [use[k] for k in used], gy)
    g2 = torch.autograd.grad(ref, [use[k] for k in used], gy)
    for k, a, b in zip(used, g1, g2):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=lambda m: f"grad {k}: {m}")


@pytest.mark.parametrize("L", [1, 3, 4, 13, 48, 50, 101])
@pytest.mark.parametrize("flags", [{}, dict(z=False, D=False, delta_bias=False, softplus=False),
                                   dict(z=False), dict(D=False, softplus=False), dict(delta_bias=False)])
def test_scan_matches_reference_multi_segment(L, flags):
    """chunk 4, segment 12: lengths of one step, below a chunk, not a chunk multiple, several segments."""
    _check_against_reference(_scan_inputs(2, 3, 5, L), flags, 1e-10, chunk=4, segment_len=12)


@pytest.mark.parametrize("chunk,segment_len", [(2, 2), (3, 7), (5, 13), (8, 64), (16, None), (None, None)])
def test_scan_independent_of_chunking(chunk, segment_len):
    _check_against_reference(_scan_inputs(1, 4, 3, 77, seed=1), {}, 1e-10, chunk=chunk, segment_len=segment_len)


def test_scan_float32_and_low_precision():
    ins = _scan_inputs(2, 6, 4, 300, dtype=torch.float32, seed=2)
    _check_against_reference(ins, {}, 2e-4, chunk=8, segment_len=64)
    y = selective_scan(**{k: v.bfloat16() for k, v in ins.items()}, delta_softplus=True)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 6, 300)
    with pytest.raises(ValueError):
        selective_scan(**ins, chunk=1)


def test_scan_default_segments_and_no_grad():
    """Defaults split this length into several segments; under no_grad nothing is recorded."""
    ins = _scan_inputs(2, 64, 16, 700, dtype=torch.float32, seed=3)
    assert ssm.SEGMENT_ELEMENTS // (2 * 64 * 16) < 700
    ref = selective_scan_reference(**ins, delta_softplus=True)
    with torch.no_grad():
        y = selective_scan(**ins, delta_softplus=True)
    assert not y.requires_grad
    torch.testing.assert_close(y, ref.float(), atol=2e-4, rtol=2e-4)


# ----------------------------------------------------------------------------------------------- Mamba
def _mamba_sequential(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """Direct (B, L, D) → (B, L, D) forward from the parameters, one time step at a time."""
    E, N, K, L = m.d_inner, m.d_state, m.d_conv, x.shape[1]
    xz = F.linear(x, m.in_proj.weight, m.in_proj.bias)
    xs, z = xz[..., :E], xz[..., E:]
    padded = F.pad(xs, (0, 0, K - 1, 0))
    conv = sum(padded[:, k:k + L] * m.conv1d.weight[:, 0, k] for k in range(K)) + m.conv1d.bias
    xc = F.silu(conv)
    dbl = F.linear(xc, m.x_proj.weight)
    dt, Bm, Cm = dbl[..., :m.dt_rank], dbl[..., m.dt_rank:m.dt_rank + N], dbl[..., m.dt_rank + N:]
    dt = F.softplus(F.linear(dt, m.dt_proj.weight, m.dt_proj.bias))
    A = -torch.exp(m.A_log)
    h = x.new_zeros(x.shape[0], E, N)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * xc[:, t])[..., None] * Bm[:, t, None, :]
        y = (h * Cm[:, t, None, :]).sum(-1) + m.D * xc[:, t]
        ys.append(y * F.silu(z[:, t]))
    return F.linear(torch.stack(ys, 1), m.out_proj.weight, m.out_proj.bias)


@pytest.mark.parametrize("d_model,L,seg_elems", [(8, 1, None), (25, 19, None), (20, 70, 4000)])
def test_mamba_matches_sequential(monkeypatch, d_model, L, seg_elems):
    if seg_elems:  # force several segments inside the block
        monkeypatch.setattr(ssm, "SEGMENT_ELEMENTS", seg_elems)
        monkeypatch.setattr(ssm, "CHUNK", 4)
    torch.manual_seed(0)
    m = Mamba(d_model).double()
    x = torch.randn(2, L, d_model, dtype=torch.float64)
    torch.testing.assert_close(m(x), _mamba_sequential(m, x), atol=1e-10, rtol=1e-10)


def _expected_shapes(D, N=16, K=4, expand=2):
    E, R = expand * D, math.ceil(D / 16)
    return {"in_proj.weight": (2 * E, D), "conv1d.weight": (E, 1, K), "conv1d.bias": (E,),
            "x_proj.weight": (R + 2 * N, E), "dt_proj.weight": (E, R), "dt_proj.bias": (E,),
            "A_log": (E, N), "D": (E,), "out_proj.weight": (D, E)}


@pytest.mark.parametrize("d_model", [25, 45, 64])
def test_parameters_match_mamba_ssm_v1(d_model):
    m = Mamba(d_model)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == _expected_shapes(d_model)
    assert {k: tuple(v.shape) for k, v in Mamba(d_model, d_state=8, d_conv=3).state_dict().items()} == \
        _expected_shapes(d_model, N=8, K=3)
    other = Mamba(d_model)
    other.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(1, 9, d_model)
    torch.testing.assert_close(other(x), m(x))


def test_initialisation():
    dt_min, dt_max = 0.001, 0.1
    m = Mamba(45, dt_min=dt_min, dt_max=dt_max)
    dt = F.softplus(m.dt_proj.bias.detach().double())
    assert dt.min() >= dt_min * (1 - 1e-4) and dt.max() <= dt_max * (1 + 1e-4)
    assert dt.log().std() > 0.5  # log-uniform spread, not a constant
    assert torch.equal(m.A_log.detach(), torch.log(torch.arange(1, 17, dtype=torch.float32)).repeat(90, 1))
    assert torch.equal(m.D.detach(), torch.ones(90))
    assert m.A_log._no_weight_decay and m.D._no_weight_decay and m.dt_proj.bias._no_reinit
    assert m.dt_proj.weight.abs().max() <= 3 ** -0.5 and m.dt_proj.weight.std() > 0.1
    assert m.in_proj.bias is None and m.out_proj.bias is None and m.x_proj.bias is None
    floor = F.softplus(Mamba(8, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4).dt_proj.bias.detach().double())
    torch.testing.assert_close(floor, torch.full_like(floor, 1e-4))
    const = Mamba(8, dt_init="constant", dt_scale=2.0).dt_proj.weight
    assert torch.all(const == 2.0)


def test_mamba_under_autocast():
    torch.manual_seed(0)
    m = Mamba(16)
    x = torch.randn(2, 40, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    torch.testing.assert_close(y.float(), m(x), atol=0.1, rtol=0.1)


def test_every_parameter_gets_gradient(monkeypatch):
    monkeypatch.setattr(ssm, "SEGMENT_ELEMENTS", 20000)  # several segments
    torch.manual_seed(0)
    m = Mamba(25)
    x = torch.randn(2, 6 ** 3, 25, requires_grad=True)
    m(x).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


# Backend selection (mamba-ssm kernels or this scan): tests/test_ssm_backend.py


# ----------------------------------------------------------------------------------------------- memory
def test_memory_bounded_on_long_sequence():
    """Forward + backward over 65,536 steps with d=64, n=16: the full state tensor alone would be 268 MB
    (autograd through a non-chunked scan keeps at least two such tensors); the peak RSS increase stays
    below one of them — what remains is the (b, d, L) inputs, outputs and gradients (~17 MB each)."""
    code = textwrap.dedent("""
        import resource, torch
        from nnunetv2_dsm.network.ssm import selective_scan
        torch.set_num_threads(1)
        b, d, n, L = 1, 64, 16, 65536
        g = torch.Generator().manual_seed(0)
        ins = [torch.randn(*s, generator=g) for s in ((b, d, L), (b, d, L), (d, n), (b, n, L), (b, n, L), (d,),
                                                      (b, d, L), (d,))]
        ins[2] = -ins[2].exp()
        for t in ins:
            t.requires_grad_()
        gy = torch.randn(b, d, L)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        y = selective_scan(*ins[:5], D=ins[5], z=ins[6], delta_bias=ins[7], delta_softplus=True, segment_len=256)
        y.backward(gy)
        assert all(torch.isfinite(t.grad).all() for t in ins)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grew = int(out.stdout.split()[-1])
    full_states = 65536 * 64 * 16 * 4
    assert grew < full_states, f"peak RSS grew by {grew / 2**20:.0f} MB"
