"""Mamba v1 block (selective state-space model) with a memory-bounded pure-PyTorch selective scan.

``Mamba`` has exactly the parameter names, shapes and initialisation of ``mamba_ssm.Mamba`` v1
(``modules/mamba_simple.py``), so state dicts move between the two. The scan step runs through
:func:`nnunetv2_dsm.network.ssm_backend.run_scan`: on mamba-ssm's CUDA kernels when they import, pass a first
check and run, else (one warning line naming the reason) on :func:`selective_scan`, written here for CPU and
GPU without compiled kernels; ``$nnUNet_dsm_ssm_backend`` forces one (see ssm_backend).
The pure-PyTorch scan:

* one custom autograd function runs the sequence in segments of ``segment_len`` steps (about
  ``SEGMENT_ELEMENTS`` state elements b·d·n·segment_len each), carrying the (b, d, n) state across. It keeps
  only its inputs and the state entering each segment; the backward walks the segments in reverse,
  recomputes one segment's states into reused buffers and differentiates it by hand, so the working set is
  a few segment-sized buffers whatever the length;
* inside a segment the recurrence h_t = a_t·h_{t-1} + x_t (a = exp(Δ·A), x = Δ·B·u) is cut into chunks of
  ``chunk`` steps: a short Python loop over the steps of a chunk runs on all chunks at once from a zero state
  (each chunk's end state), a loop over the chunks with the chunk's product of decays gives every chunk's
  true initial state, and a second vectorised loop writes the states. Only products of decays in [0, 1]
  appear (no exp(-cumsum)), so nothing overflows; a ragged tail is a plain loop (no padding);
* the gradient is the same chunked recurrence run backwards in time: G_t = ∂L/∂h_t + a_{t+1}·G_{t+1},
  ∂L/∂x_t = G_t, ∂L/∂a_t = G_t·h_{t-1}.

mamba_ssm is never imported at module import time (it hard-imports compiled CUDA modules).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from nnunetv2_dsm.network.ssm_backend import BACKEND_ENV, backend_description, run_scan, scan_backend  # noqa: F401

CHUNK = 16                     # steps per chunk of the vectorised in-segment scan (CPU)
SEGMENT_ELEMENTS = 2 ** 20     # state elements (b·d·n·steps) per segment on CPU: 4 MB buffers, cache-sized
CUDA_CHUNK = 64                # on CUDA (no mamba_ssm): fewer, larger kernels
CUDA_SEGMENT_ELEMENTS = 2 ** 25
# ------------------------------------------------------------------------------------- linear recurrence
# Internal layout is (b, L, *S): batch, time, state; the time axis is dim 1. Per-step slices [:, t] (and
# [:, :, t] of the chunked view (b, chunks, chunk, *S)) have a contiguous inner block of size prod(S).
def _scan_forward(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor, chunk: int) -> torch.Tensor:
    """In place, no autograd: x (b, L, *S) becomes the states h_t = a_t·h_{t-1} + x_t with h_{-1} = h0
    (b, *S); a: (b, L, *S), same strides as x. Returns h_{L-1} (a view into x)."""
    L = a.shape[1]
    nc = L // chunk
    m = nc * chunk if nc > 1 else 0
    prev = h0
    if m:
        shape = (a.shape[0], nc, chunk, *a.shape[2:])
        av, hv = a[:, :m].view(shape), x[:, :m].view(shape)
        # pass 1: all chunks at once from a zero state → each chunk's local end state
        cur, nxt = hv[:, :, 0].clone(), torch.empty_like(hv[:, :, 0])
        for t in range(1, chunk):
            torch.addcmul(hv[:, :, t], av[:, :, t], cur, out=nxt)
            cur, nxt = nxt, cur
        # the state entering each chunk: the same recurrence over chunks, decay = product over the chunk
        decay, start = av.prod(2), nxt
        start[:, 0] = h0
        for c in range(1, nc):
            torch.addcmul(cur[:, c - 1], decay[:, c - 1], start[:, c - 1], out=start[:, c])
        # pass 2: the states themselves, from the true initial states
        torch.addcmul(hv[:, :, 0], av[:, :, 0], start, out=hv[:, :, 0])
        for t in range(1, chunk):
            torch.addcmul(hv[:, :, t], av[:, :, t], hv[:, :, t - 1], out=hv[:, :, t])
        prev = x[:, m - 1]
    for t in range(m, L):  # ragged tail, or a sequence of at most one chunk: plain loop
        torch.addcmul(x[:, t], a[:, t], prev, out=x[:, t])
        prev = x[:, t]
    return prev


def _scan_reverse(a: torch.Tensor, g: torch.Tensor, g_end: torch.Tensor, chunk: int) -> torch.Tensor:
    """In place, no autograd: g (b, L, *S), holding ∂loss/∂h_t, becomes the total gradient
    G_t = g_t + a_{t+1}·G_{t+1}, with a_L·G_L := g_end (b, *S); a: (b, L, *S), same strides as g.
    Returns a_0·G_0, the gradient w.r.t. h_{-1}."""
    L = a.shape[1]
    nc = L // chunk
    m = nc * chunk if nc > 1 else 0
    inc = g_end
    for t in range(L - 1, m - 1, -1):  # ragged tail first (or the whole of a short sequence)
        g[:, t].add_(inc)
        inc = a[:, t] * g[:, t]
    if m:
        shape = (a.shape[0], nc, chunk, *a.shape[2:])
        av, gv = a[:, :m].view(shape), g[:, :m].view(shape)
        # pass 1: every chunk from a zero gradient at its end → local gradient at its first step
        cur, nxt = gv[:, :, -1].clone(), torch.empty_like(gv[:, :, 0])
        for t in range(chunk - 2, -1, -1):
            torch.addcmul(gv[:, :, t], av[:, :, t + 1], cur, out=nxt)
            cur, nxt = nxt, cur
        # gradient entering each chunk from its right: I_{c-1} = a_{c,0}·local_c + prod(a_c)·I_c
        local0, decay, inc_c = av[:, :, 0] * cur, av.prod(2), nxt
        inc_c[:, -1] = inc
        for c in range(nc - 1, 0, -1):
            torch.addcmul(local0[:, c], decay[:, c], inc_c[:, c], out=inc_c[:, c - 1])
        # pass 2: the total gradients
        gv[:, :, -1].add_(inc_c)
        for t in range(chunk - 2, -1, -1):
            torch.addcmul(gv[:, :, t], av[:, :, t + 1], gv[:, :, t + 1], out=gv[:, :, t])
        inc = torch.addcmul(local0[:, 0], decay[:, 0], inc_c[:, 0])
    return inc


# ------------------------------------------------------------------------------------------ selective scan
def _softplus(x: torch.Tensor) -> torch.Tensor:
    """softplus(x) = max(x, 0) + log1p(e^-|x|), with log1p(e) = log(1+e)·e/((1+e)-1) (Kahan): as accurate
    as F.softplus and about 3x faster on CPU, where torch's log1p is not vectorised."""
    e = torch.exp(-x.abs())
    one_e = 1.0 + e
    return x.clamp(min=0) + torch.where(one_e == 1.0, e, torch.log(one_e) * (e / (one_e - 1.0)))


def _inner(t: torch.Tensor) -> torch.Tensor:
    """t with a unit-stride last dim (a copy only when it is not)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _buffers(k: int, b: int, s: int, d: int, n: int, like: torch.Tensor):
    """k flat work buffers, each holding (b, s, d, n) elements; take shapes with _view."""
    return like.new_empty(k, b * s * d * n).unbind(0)


def _view(flat: torch.Tensor, b: int, s: int, d: int, n: int) -> torch.Tensor:
    """A contiguous (b, s, d, n) tensor on the start of a flat buffer."""
    return flat[:b * s * d * n].view(b, s, d, n)


def _segment_states(u, delta, A, B, delta_bias, delta_softplus, h0, a, h, chunk):
    """Fill a = exp(Δ·A) and h = states for one segment. u, delta: (b, s, d); B: (b, s, n); A: (d, n);
    h0: (b, d, n); a, h: (b, s, d, n) buffers. Returns Δ before softplus and Δ, both (b, s, d), and the
    last state (b, d, n, a view into h)."""
    dtb = _inner(delta) + delta_bias if delta_bias is not None else _inner(delta)
    dt = _softplus(dtb) if delta_softplus else dtb
    torch.mul(dt.unsqueeze(-1), A, out=a).exp_()
    torch.mul((dt * u).unsqueeze(-1), B.unsqueeze(2), out=h)
    return dtb, dt, _scan_forward(a, h, h0, chunk)


class _SelectiveScan(torch.autograd.Function):
    """Segmented selective scan in (b, l, channels) layout with a hand-written backward that recomputes
    each segment's states: only the inputs and the (b, d, n) state entering each segment are kept.
    u, delta, z: (b, l, d); B, C: (b, l, n); A: (d, n); D, delta_bias: (d,) → y: (b, l, d)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, seg):
        b, L, d = u.shape
        n = A.shape[1]
        bufs = _buffers(2, b, min(seg, L), d, n, u)
        y, state, starts = u.new_empty(b, L, d), u.new_zeros(b, d, n), []
        for s0 in range(0, L, seg):
            sl, s = slice(s0, s0 + seg), min(seg, L - s0)
            a, h = (_view(t, b, s, d, n) for t in bufs)
            ut = _inner(u[:, sl])
            starts.append(state)
            _, _, last = _segment_states(ut, delta[:, sl], A, _inner(B[:, sl]), delta_bias, delta_softplus,
                                         state, a, h, chunk)
            state = last.clone()
            yt = torch.mul(h, _inner(C[:, sl]).unsqueeze(2), out=a).sum(-1)  # (b, s, d)
            if D is not None:
                yt += D * ut
            if z is not None:
                yt *= F.silu(z[:, sl])
            y[:, sl] = yt
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, torch.stack(starts))
        ctx.delta_softplus, ctx.chunk, ctx.seg = delta_softplus, chunk, seg
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        u, delta, A, B, C, D, z, delta_bias, starts = ctx.saved_tensors
        chunk, seg = ctx.chunk, ctx.seg
        b, L, d = u.shape
        n = A.shape[1]
        bufs = _buffers(4, b, min(seg, L), d, n, u)
        gu, gdelta, gB, gC = (u.new_empty(b, L, c) for c in (d, d, n, n))
        gz = u.new_empty(b, L, d) if z is not None else None
        gA = torch.zeros_like(A)
        gD = torch.zeros_like(D) if D is not None else None
        gbias = torch.zeros_like(delta_bias) if delta_bias is not None else None
        g_next = u.new_zeros(b, d, n)
        for i in reversed(range(starts.shape[0])):
            sl, s = slice(i * seg, (i + 1) * seg), min(seg, L - i * seg)
            a, h, G, S = (_view(t, b, s, d, n) for t in bufs)
            ut, Bt, Ct, gyt = _inner(u[:, sl]), _inner(B[:, sl]), _inner(C[:, sl]), _inner(gy[:, sl])
            dtb, dt, _ = _segment_states(ut, delta[:, sl], A, Bt, delta_bias, ctx.delta_softplus, starts[i],
                                         a, h, chunk)
            if z is not None:  # y = (C·h + D·u)·silu(z)
                zt = z[:, sl]
                sz = torch.sigmoid(zt)
                y1 = torch.mul(h, Ct.unsqueeze(2), out=G).sum(-1)
                if D is not None:
                    y1 += D * ut
                gz[:, sl] = gyt * y1 * sz * (1 + zt * (1 - sz))
                gyt = gyt * zt * sz
            if D is not None:
                gD += (gyt * ut).sum((0, 1))
            gC[:, sl] = torch.bmm(gyt.reshape(b * s, 1, d), h.view(b * s, d, n)).view(b, s, n)
            torch.mul(gyt.unsqueeze(-1), Ct.unsqueeze(2), out=G)                 # ∂loss/∂h_t (direct)
            g_next = _scan_reverse(a, G, g_next, chunk)                           # G = ∂loss/∂x_t, x = Δ·u·B
            dtu = dt * ut
            gB[:, sl] = torch.bmm(dtu.reshape(b * s, 1, d), G.view(b * s, d, n)).view(b, s, n)
            torch.mul(G[:, 1:], h[:, :-1], out=S[:, 1:])                          # ∂loss/∂a_t = G_t·h_{t-1}
            torch.mul(G[:, 0], starts[i], out=S[:, 0])
            S.mul_(a)                                                             # ∂loss/∂(Δ_t·A)
            gA += torch.mul(S, dt.unsqueeze(-1), out=a).sum((0, 1))
            g_dtu = torch.mul(G, Bt.unsqueeze(2), out=h).sum(-1)                 # (b, s, d)
            g_dt = torch.mul(S, A, out=a).sum(-1) + g_dtu * ut
            gu_t = g_dtu * dt
            if D is not None:
                gu_t += gyt * D
            gu[:, sl] = gu_t
            if ctx.delta_softplus:
                g_dt = g_dt * torch.sigmoid(dtb)
            if gbias is not None:
                gbias += g_dt.sum((0, 1))
            gdelta[:, sl] = g_dt
        return gu, gdelta, gA, gB, gC, gD, gz, gbias, None, None, None


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False, *,
                   chunk: Optional[int] = None, segment_len: Optional[int] = None) -> torch.Tensor:
    """Pure-PyTorch selective scan in mamba_ssm's layout. u, delta, z: (b, d, l); A: (d, n);
    B, C: (b, n, l); D, delta_bias: (d,) → y: (b, d, l) in u's dtype (computed in float32, or float64).
    Δ = softplus(delta + delta_bias) (softplus only if ``delta_softplus``); h_t = exp(Δ_t·A)·h_{t-1} +
    Δ_t·B_t·u_t; y_t = C_t·h_t + D·u_t; y = y·silu(z). ``chunk`` defaults to CHUNK (CUDA_CHUNK on CUDA);
    ``segment_len`` (default: about SEGMENT_ELEMENTS, or CUDA_SEGMENT_ELEMENTS, state elements per segment, a
    multiple of ``chunk``) bounds the working memory. Fastest when the (b, d, l) tensors are transposed
    views of (b, l, d) memory, as in Mamba.forward; y is returned as such a view."""
    b, d, L = u.shape
    n = A.shape[1]
    cuda = u.device.type == "cuda"
    chunk = (CUDA_CHUNK if cuda else CHUNK) if chunk is None else chunk
    if chunk < 2:
        raise ValueError(f"chunk must be >= 2, got {chunk}")
    if segment_len is None:
        budget = CUDA_SEGMENT_ELEMENTS if cuda else SEGMENT_ELEMENTS
        segment_len = max(chunk, budget // (b * d * n) // chunk * chunk)
    f = torch.float64 if u.dtype == torch.float64 else torch.float32
    seq = [t.to(f).transpose(1, 2) if t is not None else None for t in (u, delta, B, C, z)]  # (b, l, c)
    A, D, delta_bias = (t.to(f) if t is not None else None for t in (A, D, delta_bias))
    with torch.autocast(u.device.type, enabled=False):  # the scan runs in f whatever the autocast state
        y = _SelectiveScan.apply(seq[0], seq[1], A, seq[2], seq[3], D, seq[4], delta_bias,
                                 bool(delta_softplus), int(chunk), int(segment_len))
    return y.transpose(1, 2).to(u.dtype)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Plain sequential selective scan (Python loop over time, float64), for tests. Same layout and
    semantics as :func:`selective_scan`: u, delta, z (b, d, l); A (d, n); B, C (b, n, l) → (b, d, l)."""
    dtype = u.dtype
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double().unsqueeze(-1)
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double().unsqueeze(-1) * u
    if z is not None:
        y = y * F.silu(z.double())
    return y.to(dtype)


# --------------------------------------------------------------------------------------------- the block
def _fp32(t: torch.Tensor) -> torch.Tensor:
    """t in float32 (as mamba_ssm casts A, D, dt bias), or unchanged when float64."""
    return t if t.dtype == torch.float64 else t.float()


class Mamba(nn.Module):
    """Mamba v1 block, (B, L, d_model) → (B, L, d_model), causal along L. Parameters as mamba_ssm.Mamba v1:
    in_proj.weight (2E, D), conv1d.weight (E, 1, K), conv1d.bias (E), x_proj.weight (R+2N, E),
    dt_proj.weight (E, R), dt_proj.bias (E), A_log (E, N), D (E), out_proj.weight (D, E);
    E = expand·d_model, R = ceil(d_model/16) for dt_rank="auto", N = d_state, K = d_conv."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = E = int(expand * d_model)
        self.dt_rank = R = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        self.conv1d = nn.Conv1d(E, E, kernel_size=d_conv, groups=E, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        std = R ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise NotImplementedError(f"dt_init={dt_init!r}")
        # softplus(bias) log-uniform in [dt_min, dt_max] (floored); bias = softplus⁻¹(dt) = dt + log(1 - e^-dt)
        dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(E, 1)))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(E))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(E, d_model, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, L, d_model) → (B, L, d_model)."""
        L = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)                 # (B, 2E, L)
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :L]).transpose(1, 2).contiguous()  # causal depthwise conv, (B, L, E)
        x_dbl = self.x_proj(x)                                           # (B, L, R + 2N)
        x = x.transpose(1, 2)                                            # (B, E, L), a view
        dt, Bm, Cm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)           # (B, E, L); bias added in the scan
        Bm, Cm = Bm.transpose(1, 2), Cm.transpose(1, 2)                  # (B, N, L)
        A = -torch.exp(_fp32(self.A_log))                                # (E, N)
        y = run_scan(x, dt, A, Bm, Cm, self.D, z, _fp32(self.dt_proj.bias))
        return self.out_proj(y.transpose(1, 2))
