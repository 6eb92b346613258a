"""Diffusion-guided feature fusion (semantic diffusion): paper §4.2.2, Eq. 16–18.

Eq. 16 is the anisotropic (Perona–Malik) diffusion of a feature map x under a semantic guidance G,
∂x/∂t = div(g(|∇G|²) ∇x), with a diffusivity g that is a *monotonically decreasing* function of the squared
guidance gradient: diffusion is damped across semantic boundaries and proceeds within regions. One explicit time
step (T = 1) is taken and fused back into the feature (Eq. 17–18). Per channel c and voxel i, with Ω(i) the
3×3×3 (2-D: 3×3) neighbourhood:

* difference operator  D_K(u)_{c,i} = Σ_{j∈Ω(i)} K_c(j−i) · (u_{c,j} − u_{c,i}),   Σ_j K_c(j) = 0
  a learnable depthwise kernel constrained to sum to zero (K = w − mean(w)), i.e. a learnable discrete
  gradient/Laplacian-like operator; replicate padding, so a constant field has zero difference at the borders.
* guidance             G̃ = Resize(GN(W_g · G)): the coarser scale, 1×1 conv C_g → C (no bias), GroupNorm without
                       affine (a shift or per-channel scale would be absorbed by D_K and κ), then trilinear /
                       bilinear resizing (align_corners=False) to x's size. (The 1×1 conv commutes with the
                       interpolation; projecting first is cheaper.)
* diffusivity (Eq. 16) g_c(s) = 1 / (1 + κ_c · s),  κ_c = exp(ρ_c) > 0 learnable (Perona–Malik's second form)
* update (Eq. 17)      U = D_{Kx}(x) ⊙ g(D_{Kg}(G̃)²)
* fusion (Eq. 18)      x̂ = x + W_f ∗ U,  W_f a 3×3×3 conv C → C, no bias, replicate padding

A zero feature difference therefore gives x̂ = x exactly, for any guidance. The diffusivity is evaluated per voxel
and channel from the aggregated guidance difference (the SDN/official factorisation), not per neighbour pair.

2-D and 3-D: the parameters are stored once, in 3-D. A 2-D map (B, C, X, Y) is treated as a volume of one slice
with replicate padding, so every 3×3×3 kernel acts as its 3×3 sum over the third axis: the 2-D result equals the
3-D result on x[..., None].

Deviations from the official ``model/sdm.py`` (docs/fidelity.md, difference 8): it multiplies the feature difference by
the *squared guidance difference* — an increasing function, which enhances diffusion across boundaries, the
opposite of the paper's decreasing diffusivity — uses unconstrained difference kernels (a constant field is not
mapped to zero) with zero padding, and ends in ReLU(BN(·)) with a bias, so even a zero difference changes x.
Here: zero-sum kernels, replicate padding, the decreasing g above, and a bias-free fusion.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

KERNEL = 3


def _spatial_kernel(weight: torch.Tensor, ndim: int) -> torch.Tensor:
    """A stored 3-D kernel (O, I, 3, 3, 3) for a (2 + ndim)-d input: itself for 3-D, its sum over the last
    spatial axis for 2-D (a one-slice volume under replicate padding)."""
    if ndim == 5:
        return weight
    if ndim == 4:
        return weight.sum(dim=-1)
    raise ValueError(f"expected a 2-D (B,C,X,Y) or 3-D (B,C,X,Y,Z) feature map, got {ndim - 2} spatial dims")


def _conv(x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Convolution of a 2-D or 3-D map with replicate padding ("same" size) and no bias."""
    weight = _spatial_kernel(weight, x.ndim)
    pad = weight.shape[-1] // 2
    if pad:
        x = F.pad(x, [pad] * (2 * (x.ndim - 2)), mode="replicate")
    conv = F.conv3d if x.ndim == 5 else F.conv2d
    return conv(x, weight, groups=groups)


def zero_sum(weight: torch.Tensor) -> torch.Tensor:
    """Difference-kernel parametrisation: (C, 1, k, k, k) → K = w − mean over the taps, so Σ_j K_c(j) = 0."""
    return weight - weight.flatten(1).mean(dim=1).view(-1, *[1] * (weight.ndim - 1))


def difference_filter(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The difference operator of Eq. 17 (depthwise): D_K(u)_i = Σ_{j∈Ω(i)} K(j−i)(u_j − u_i).

    u (B, C, *S), weight (C, 1, 3, 3, 3) → (B, C, *S), K = zero_sum(weight), replicate padding. As Σ K = 0 the
    operator is the plain depthwise convolution with K. It is applied to u minus a per-(sample, channel)
    reference value (the first voxel): this changes nothing mathematically and makes a constant field give
    exactly 0 in floating point too.
    """
    b, c = u.shape[:2]
    ref = u.detach().reshape(b, c, -1)[:, :, :1].reshape(b, c, *[1] * (u.ndim - 2))
    return _conv(u - ref, zero_sum(weight), groups=c)


def diffusivity(guide_difference: torch.Tensor, log_kappa: torch.Tensor) -> torch.Tensor:
    """The diffusivity of Eq. 16: g(s) = 1 / (1 + κ_c s) with s = (guidance difference)², κ_c = exp(log_kappa_c).

    guide_difference (B, C, *S), log_kappa (C,) → (B, C, *S) in (0, 1]: 1 inside homogeneous guidance regions,
    monotonically decreasing towards 0 as the squared guidance difference grows (semantic boundaries).
    """
    kappa = log_kappa.exp().view(1, -1, *[1] * (guide_difference.ndim - 2))
    return 1.0 / (1.0 + kappa * guide_difference.square())


class SemanticDiffusion(nn.Module):
    """Boundary-aware semantic diffusion of one scale's features under the coarser scale's guidance (Eq. 16–18).

    ``forward(x (B, C, *S), guide (B, C_g, *S_g)) -> x̂ (B, C, *S)`` for 2-D or 3-D maps; *S_g may differ from *S
    (the guidance is resized). See the module docstring for the formulas.
    """

    def __init__(self, channels: int, guide_channels: int):
        super().__init__()
        self.channels, self.guide_channels = channels, guide_channels
        self.groups = math.gcd(channels, 8)
        self.guide_proj = nn.Parameter(torch.empty(channels, guide_channels, 1, 1, 1))    # W_g
        self.feature_kernel = nn.Parameter(torch.empty(channels, 1, KERNEL, KERNEL, KERNEL))  # Kx (pre zero-sum)
        self.guide_kernel = nn.Parameter(torch.empty(channels, 1, KERNEL, KERNEL, KERNEL))    # Kg (pre zero-sum)
        self.log_kappa = nn.Parameter(torch.zeros(channels))                                 # ρ, κ = exp(ρ)
        self.fusion = nn.Parameter(torch.empty(channels, channels, KERNEL, KERNEL, KERNEL))   # W_f
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.guide_proj, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.fusion, a=math.sqrt(5))
        # difference kernels start as the normalised discrete Laplacian (mean of the neighbours − centre: the heat
        # equation's operator) plus a little noise that breaks its symmetry
        taps = KERNEL ** 3
        laplacian = torch.full((KERNEL,) * 3, 1.0 / (taps - 1))
        laplacian[(KERNEL // 2,) * 3] = -1.0
        with torch.no_grad():
            for w in (self.feature_kernel, self.guide_kernel):
                w.copy_(laplacian.expand_as(w) + 0.05 * torch.randn_like(w))
        nn.init.zeros_(self.log_kappa)

    def project_guidance(self, guide: torch.Tensor, size) -> torch.Tensor:
        """G̃ = Resize(GN(W_g · G)): guide (B, C_g, *S_g) → (B, C, *size)."""
        g = _conv(guide, self.guide_proj)
        g = F.group_norm(g, self.groups)
        if tuple(g.shape[2:]) != tuple(size):
            g = F.interpolate(g, size=tuple(size), mode="trilinear" if g.ndim == 5 else "bilinear",
                              align_corners=False)
        return g

    def diffusion_update(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """Eq. 17: U = D_{Kx}(x) ⊙ g(D_{Kg}(G̃)²); x (B, C, *S), guide (B, C_g, *S_g) → U (B, C, *S)."""
        self._check(x, guide)
        guide_difference = difference_filter(self.project_guidance(guide, x.shape[2:]), self.guide_kernel)
        return difference_filter(x, self.feature_kernel) * diffusivity(guide_difference, self.log_kappa)

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """Eq. 18: x̂ = x + W_f ∗ U (no bias, replicate padding).

        x (B, C, *S), guide (B, C_g, *S_g) → x̂ (B, C, *S)."""
        return x + _conv(self.diffusion_update(x, guide), self.fusion)

    def _check(self, x: torch.Tensor, guide: torch.Tensor) -> None:
        if x.ndim not in (4, 5) or guide.ndim != x.ndim:
            raise ValueError(f"x and guide must both be (B,C,X,Y) or (B,C,X,Y,Z); got {tuple(x.shape)} and "
                             f"{tuple(guide.shape)}")
        if x.shape[1] != self.channels or guide.shape[1] != self.guide_channels or guide.shape[0] != x.shape[0]:
            raise ValueError(f"expected x (B,{self.channels},...) and guide (B,{self.guide_channels},...); got "
                             f"{tuple(x.shape)} and {tuple(guide.shape)}")

    def extra_repr(self) -> str:
        return f"channels={self.channels}, guide_channels={self.guide_channels}"
