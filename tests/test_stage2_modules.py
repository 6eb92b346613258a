"""Property tests of the Stage-2 building blocks: anomaly prompt (Eq. 14–15), semantic diffusion (Eq. 16–18),
prompt-masked cross-attention (Eq. 19) and the organ–tumor query interaction."""
import pytest
import torch

from _dsm_helpers import missing_gradients
from nnunetv2_dsm.network.anomaly import anomaly_prompt, anomaly_score, normalize_per_sample
from nnunetv2_dsm.network.attention import QuerySelfAttention
from nnunetv2_dsm.network.prompt_attention import PromptMaskedCrossAttention, prompt_mask
from nnunetv2_dsm.network.semantic_diffusion import SemanticDiffusion, diffusivity, difference_filter, zero_sum

SPATIAL = {2: (6, 5), 3: (6, 5, 4)}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _assert_all_params_get_gradient(module: torch.nn.Module):
    missing = missing_gradients(module)
    assert not missing, f"parameters without gradient: {missing}"


# --------------------------------------------------------------------------------------- anomaly (Eq. 14-15)

def test_anomaly_is_highest_where_every_organ_response_is_low():
    logits = torch.randn(2, 4, 5, 6, 7, generator=_gen()) + 3.0
    logits[:, :, 2, 3, 4] = -5.0  # no organ claims this voxel
    score = anomaly_score(logits)
    assert score.shape == (2, 5, 6, 7)
    torch.testing.assert_close(score, -logits.max(dim=1).values)
    norm, attend = anomaly_prompt(logits)
    for b in range(2):
        assert norm[b].flatten().argmax().item() == (2 * 6 + 3) * 7 + 4
        assert attend[b, 2, 3, 4]
    assert norm.dtype == torch.float32 and attend.dtype == torch.bool
    assert float(norm.min()) >= 0.0 and float(norm.max()) <= 1.0
    torch.testing.assert_close(norm.flatten(1).amin(1), torch.zeros(2))
    torch.testing.assert_close(norm.flatten(1).amax(1), torch.ones(2))


def test_normalisation_is_per_sample():
    logits = torch.randn(2, 3, 4, 5, 6, generator=_gen(1))
    ref_norm, ref_attend = anomaly_prompt(logits)
    scaled = logits.clone()
    scaled[0] = scaled[0] * 100.0 + 7.0
    norm, attend = anomaly_prompt(scaled)
    assert torch.equal(norm[1], ref_norm[1]) and torch.equal(attend[1], ref_attend[1])
    torch.testing.assert_close(norm[0], ref_norm[0])  # min-max is invariant to a positive affine map


def test_constant_logits_give_zeros_not_nan():
    norm, attend = anomaly_prompt(torch.full((2, 3, 4, 4), 1.5))
    assert torch.equal(norm, torch.zeros(2, 4, 4)) and not attend.any()
    assert torch.equal(normalize_per_sample(torch.full((1, 3, 3, 3), -2.0)), torch.zeros(1, 3, 3, 3))


def test_threshold_semantics_and_no_gradient():
    score = torch.tensor([[0.0, 0.25, 0.5, 0.75, 1.0]])  # normalised values 0, .25, .5, .75, 1 - eps
    logits = (-score)[:, None].repeat(1, 2, 1).requires_grad_(True)  # (B=1, N=2, X=5)
    norm, attend = anomaly_prompt(logits, threshold=0.5, eps=0.0)
    torch.testing.assert_close(norm, score)
    assert attend.tolist() == [[False, False, False, True, True]]  # strictly greater than the threshold
    assert anomaly_prompt(logits, threshold=0.2, eps=0.0)[1].tolist() == [[False, True, True, True, True]]
    assert not norm.requires_grad


# ----------------------------------------------------------------------------- semantic diffusion (Eq. 16-18)

@pytest.mark.parametrize("ndim", [2, 3])
def test_diffusion_shapes_with_coarser_guidance(ndim):
    torch.manual_seed(0)
    sd = SemanticDiffusion(8, 12)
    x = torch.randn(2, 8, *[2 * s for s in SPATIAL[ndim]])
    guide = torch.randn(2, 12, *SPATIAL[ndim])
    out = sd(x, guide)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert sd(x, torch.randn_like(x[:, :1]).expand(-1, 12, *[-1] * ndim)).shape == x.shape  # same-size guidance
    with pytest.raises(ValueError):
        sd(x, torch.randn(2, 5, *SPATIAL[ndim]))


@pytest.mark.parametrize("ndim", [2, 3])
def test_constant_feature_is_returned_exactly_for_any_guidance(ndim):
    torch.manual_seed(0)
    sd = SemanticDiffusion(8, 4)
    for value in (0.3, -17.123, 1e4):
        x = torch.full((2, 8, *SPATIAL[ndim]), value)
        x[1] = 0.77  # per-sample constants
        guide = torch.randn(2, 4, *[s // 2 + 1 for s in SPATIAL[ndim]], generator=_gen(2)) * 10
        assert torch.equal(sd.diffusion_update(x, guide), torch.zeros_like(x))
        assert torch.equal(sd(x, guide), x)


def test_difference_kernels_sum_to_zero():
    torch.manual_seed(0)
    sd = SemanticDiffusion(6, 3)
    for w in (sd.feature_kernel, sd.guide_kernel):
        k = zero_sum(w)
        torch.testing.assert_close(k.flatten(1).sum(1), torch.zeros(6), atol=1e-6, rtol=0)
        torch.testing.assert_close(k.sum(-1).flatten(1).sum(1), torch.zeros(6), atol=1e-6, rtol=0)  # 2-D kernel
    # the operator is Σ_j K(j)(u_j − u_i): a linear ramp has a constant response inside the volume (a gradient)
    ramp = torch.arange(7.0).view(1, 1, 7, 1, 1).expand(1, 6, 7, 7, 7)
    d = difference_filter(ramp, sd.feature_kernel)[..., 1:-1, 1:-1, 1:-1]
    torch.testing.assert_close(d, d[..., :1, :1, :1].expand_as(d), atol=1e-5, rtol=0)


def test_diffusivity_is_positive_and_monotonically_decreasing():
    s = torch.linspace(0, 10, 101).view(1, 1, -1)
    for rho in (-2.0, 0.0, 3.0):
        g = diffusivity(s.sqrt(), torch.tensor([rho]))
        assert float(g[..., 0]) == 1.0 and (g > 0).all() and (g.diff(dim=-1) < 0).all()


@pytest.mark.parametrize("ndim", [2, 3])
def test_update_is_damped_at_a_guidance_edge(ndim):
    """Same feature difference everywhere (x varies only across the edge-parallel axes), guidance with a sharp
    step along axis 0: the update is unchanged away from the edge (diffusivity 1) and strictly smaller at it."""
    torch.manual_seed(0)
    sd = SemanticDiffusion(8, 3)
    size = (12,) + SPATIAL[ndim][1:]
    x = torch.randn(1, 8, 1, *size[1:], generator=_gen(3)).expand(1, 8, *size).contiguous()
    guide = torch.zeros(1, 3, *size)
    guide[:, :, 6:] = 1.0
    with torch.no_grad():
        upd = sd.diffusion_update(x, guide)
        x_diff = difference_filter(x, sd.feature_kernel)
    assert torch.equal(x_diff[:, :, 1], x_diff[:, :, 5])  # the same feature difference across axis 0
    away, edge = upd[:, :, 1].abs(), upd[:, :, 5:7].abs()
    torch.testing.assert_close(upd[:, :, :4], x_diff[:, :, :4])  # inside a region g = 1
    assert (away > 1e-4).all()
    assert (edge < 0.99 * away[:, :, None]).all()  # damped at the boundary, every channel and voxel
    with torch.no_grad():  # a larger learnable contrast κ damps the boundary much more
        sd.log_kappa.fill_(4.0)
        stronger = sd.diffusion_update(x, guide)
    assert (stronger[:, :, 5:7].abs() < edge).all() and torch.equal(stronger[:, :, :4], upd[:, :, :4])


def test_2d_equals_3d_on_a_single_slice():
    torch.manual_seed(0)
    sd = SemanticDiffusion(8, 5)
    x, guide = torch.randn(2, 8, 6, 7, generator=_gen(4)), torch.randn(2, 5, 3, 4, generator=_gen(5))
    torch.testing.assert_close(sd(x, guide), sd(x[..., None], guide[..., None])[..., 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_diffusion_gradients_reach_all_parameters(ndim):
    torch.manual_seed(0)
    sd = SemanticDiffusion(8, 12)
    x = torch.randn(2, 8, *[2 * s for s in SPATIAL[ndim]], requires_grad=True)
    out = sd(x, torch.randn(2, 12, *SPATIAL[ndim]))
    (out * torch.randn_like(out)).sum().backward()
    _assert_all_params_get_gradient(sd)
    assert x.grad.abs().sum() > 0


def test_diffusion_is_deterministic():
    torch.manual_seed(0)
    sd = SemanticDiffusion(8, 4)
    x, guide = torch.randn(1, 8, 5, 5, 5), torch.randn(1, 4, 3, 3, 3)
    assert torch.equal(sd(x, guide), sd(x, guide))


# -------------------------------------------------------------------- prompt-masked cross-attention (Eq. 19)

def _attention_inputs(ndim, seed=0, b=2, nt=5, c=12, dim=16):
    g = _gen(seed)
    q = torch.randn(b, nt, dim, generator=g)
    f = torch.randn(b, c, *SPATIAL[ndim], generator=g)
    attend = torch.rand(b, *SPATIAL[ndim], generator=g) > 0.6
    return q, f, attend


@pytest.mark.parametrize("ndim", [2, 3])
def test_masked_out_voxels_do_not_influence_the_queries(ndim):
    torch.manual_seed(0)
    pa = PromptMaskedCrossAttention(16, 12, num_heads=4)
    q, f, attend = _attention_inputs(ndim)
    out = pa(q, f, attend)
    assert out.shape == q.shape and torch.isfinite(out).all()
    changed = torch.where(attend[:, None], f, torch.randn_like(f) * 50)
    torch.testing.assert_close(pa(q, changed, attend), out, atol=1e-6, rtol=1e-6)
    changed_inside = torch.where(attend[:, None], torch.randn_like(f), f)
    assert not torch.allclose(pa(q, changed_inside, attend), out)  # ... while the attended ones do


@pytest.mark.parametrize("ndim", [2, 3])
def test_empty_prompt_attends_everywhere(ndim):
    torch.manual_seed(0)
    pa = PromptMaskedCrossAttention(16, 12, num_heads=4)
    q, f, attend = _attention_inputs(ndim)
    none, every = torch.zeros_like(attend), torch.ones_like(attend)
    out = pa(q, f, none)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, pa(q, f, every))
    mixed = attend.clone()
    mixed[1] = False  # the guard acts per sample
    out_mixed = pa(q, f, mixed)
    torch.testing.assert_close(out_mixed[0], pa(q, f, attend)[0])
    torch.testing.assert_close(out_mixed[1], out[1])
    assert prompt_mask(mixed).shape == (2, 1, 1, attend[0].numel())


def test_voxel_permutation_invariance():
    torch.manual_seed(0)
    pa = PromptMaskedCrossAttention(16, 12, num_heads=4)
    q, f, attend = _attention_inputs(3)
    perm = torch.randperm(attend[0].numel(), generator=_gen(7))
    f_perm = f.flatten(2)[:, :, perm].view_as(f)
    attend_perm = attend.flatten(1)[:, perm].view_as(attend)
    torch.testing.assert_close(pa(q, f_perm, attend_perm), pa(q, f, attend), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_cross_attention_gradients_reach_all_parameters(ndim):
    torch.manual_seed(0)
    pa = PromptMaskedCrossAttention(16, 12, num_heads=4)
    q, f, attend = _attention_inputs(ndim)
    f.requires_grad_(True)
    out = pa(q, f, attend)
    (out * torch.randn_like(out)).sum().backward()
    _assert_all_params_get_gradient(pa)
    assert f.grad.abs().sum() > 0


def test_cross_attention_rejects_a_prompt_of_the_wrong_size():
    pa = PromptMaskedCrossAttention(16, 12, num_heads=4)
    q, f, attend = _attention_inputs(3)
    with pytest.raises(ValueError):
        pa(q, f, attend[..., :-1])
    with pytest.raises(ValueError):
        PromptMaskedCrossAttention(18, 12, num_heads=4)


# ------------------------------------------------------------------------------------------ query interaction

def test_query_interaction_is_permutation_equivariant_and_trains():
    torch.manual_seed(0)
    qi = QuerySelfAttention(16, num_heads=4)
    assert qi.ffn[0].out_features == 64  # ffn_dim defaults to 4·dim
    queries = torch.randn(2, 9, 16, generator=_gen(8))  # e.g. 4 organ + 5 tumor queries
    out = qi(queries)
    assert out.shape == queries.shape
    perm = torch.randperm(9, generator=_gen(9))
    torch.testing.assert_close(qi(queries[:, perm]), out[:, perm], atol=1e-5, rtol=1e-5)
    (out * torch.randn_like(out)).sum().backward()
    _assert_all_params_get_gradient(qi)
    assert QuerySelfAttention(16, num_heads=4, ffn_dim=24).ffn[0].out_features == 24
