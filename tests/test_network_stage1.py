import numpy as np
import pytest
import torch

from _dsm_helpers import build_backbone, params_without_gradient, tiny_network
from nnunetv2_dsm.labels import NUM_CLASSES, NUM_ORGANS
from nnunetv2_dsm.network.backbone import PlansError, kmmm_stage_indices
from nnunetv2_dsm.network.output import (ABSENT_LOGIT, PredictionNetwork, exclusive_classes, label_table_logits,
                                         mask_untrained_classes)
from nnunetv2_dsm.network.kmeans_layer import kmeans_assignment, kmeans_update, mask_logits, nonempty_clusters
from nnunetv2_dsm.training.loss import DSMLoss, partial_label_dice_bce


def test_stage1_shapes_and_deep_supervision_outputs():
    net = tiny_network(stage=1)
    x = torch.randn(2, 1, 32, 32, 32)
    out = net(x)
    assert [tuple(o.shape) for o in out.predictions()] == [(2, 45, 32, 32, 32), (2, 25, 32, 32, 32),
                                                           (2, 25, 16, 16, 16), (2, 25, 8, 8, 8), (2, 25, 4, 4, 4)]
    assert torch.all(out.logits[:, NUM_ORGANS:] == ABSENT_LOGIT)  # no tumor queries in Stage 1
    assert out.query_class_log_probs is None and tuple(out.queries.shape) == (2, NUM_ORGANS, net.arch.dim)
    assert tuple(PredictionNetwork(net)(x).shape) == (2, 45, 32, 32, 32)     # what nnU-Net's predictor sees


def test_every_trainable_parameter_gets_a_nonzero_gradient_after_one_stage1_step():
    """Guards two deliberate fixes of the official code: the SSM and the per-layer mask heads must train."""
    net = tiny_network(stage=1)
    assert not params_without_gradient(net, train_steps=1)
    assert any("ssm.mamba" in n for n, _ in net.named_parameters())


def test_assignment_is_the_hard_arg_max_without_gradient_and_unclaimed_voxels_are_void():
    r = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    r[:, :, 3] = -torch.rand(2, 5) - 0.1                              # voxel 3: every response negative
    r.requires_grad_()
    a = kmeans_assignment(r)
    claimed = r.detach().amax(1) > 0                                  # some query's sigmoid > 0.5
    assert (~claimed).any() and claimed.any()
    assert torch.equal(a.sum(1), claimed.float())                     # one cluster per claimed voxel, none else
    assert torch.equal(a.argmax(1)[claimed], r.argmax(1)[claimed]) and set(a.unique().tolist()) <= {0.0, 1.0}
    assert not a.requires_grad            # the response learns from its own (per-layer) loss, as in kMaX


@pytest.mark.slow
def test_stage1_loss_falls_on_one_phantom_batch():
    """Optimisation works end to end: on one fixed phantom batch, 20 AdamW steps cut the loss by more than 30%
    (1.73 -> ~1.02). Guards against gradients that fight the loss: with a straight-through arg-max the loss stayed
    at ~1.6 here (and rose on the demo's data)."""
    from nnunetv2_dsm.phantom import make_case
    cases = [make_case((32, 32, 32), (6.0, 6.0, 6.0), seed=s) for s in (0, 1)]
    x = torch.stack([torch.from_numpy(c.image.astype(np.float32)) for c in cases])[:, None]
    x = (x - x.mean()) / x.std()
    mh = torch.stack([torch.from_numpy(c.multi_hot) for c in cases])
    net = tiny_network(stage=1, n_stages=5)       # kMMM layers at strides 2-16, as a planned network has them
    targets = [mh[:, :, ::32 // o.shape[-1], ::32 // o.shape[-1], ::32 // o.shape[-1]] for o in net(x).predictions()]
    annotated = torch.zeros(2, NUM_CLASSES, dtype=torch.bool)
    annotated[:, :NUM_ORGANS] = True
    loss_fn, opt = DSMLoss(len(targets)), torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-5)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn(net(x), targets, annotated)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0] and losses[-1] < min(losses[:5]), losses


def test_empty_clusters_get_no_update_and_queries_stay_distinct():
    assign = torch.tensor([[[1., 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]]])     # query 1 wins no voxel
    assert nonempty_clusters(assign)[0, :, 0].tolist() == [1.0, 0.0, 1.0]
    layer = tiny_network(stage=1).kmmm[0]
    layer.query_mixing = torch.nn.Identity()          # look at the k-means update alone
    q = torch.randn(2, NUM_ORGANS, layer.update_proj.in_features)
    with torch.no_grad():
        new_q, response = layer(q, torch.randn(2, layer.pixel_proj[0].in_channels, 4, 4, 4))[:2]
    won = torch.nn.functional.one_hot(response.flatten(2).argmax(1), NUM_ORGANS).sum(1) > 0   # (B, N)
    assert (~won).any() and won.any()
    torch.testing.assert_close(new_q[~won], q[~won], rtol=0, atol=0)   # empty cluster: centre kept
    assert not torch.allclose(new_q[won], q[won])
    # (an identical update Linear(LN(0)) for every empty cluster collapsed all queries in training: cosine 0.999)


def test_kmeans_update_is_the_per_cluster_sum():
    assign = torch.tensor([[[1., 0, 1, 0], [0, 1, 0, 1]]])  # (1, 2 queries, 4 voxels)
    values = torch.arange(12.).reshape(1, 3, 4)               # (1, D=3, 4 voxels)
    upd = kmeans_update(assign, values)
    np.testing.assert_allclose(upd[0, 0].numpy(), values[0][:, [0, 2]].sum(1).numpy())
    np.testing.assert_allclose(upd[0, 1].numpy(), values[0][:, [1, 3]].sum(1).numpy())


def test_mask_logits_is_the_query_pixel_inner_product():
    e = torch.randn(2, 8, 3, 4, 5)
    k = torch.randn(2, 6, 8)
    np.testing.assert_allclose(mask_logits(e, k).numpy(), torch.einsum("bcxyz,bnc->bnxyz", e, k).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_unannotated_channels_contribute_exactly_zero_loss_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 45, 6, 6, 6, requires_grad=True)
    target = torch.rand(2, 45, 6, 6, 6) > 0.5
    annotated = torch.zeros(2, 45, dtype=torch.bool)
    annotated[0, [0, 5]] = True
    annotated[1, [30]] = True
    loss = partial_label_dice_bce(logits, target, annotated)
    loss.backward()
    grad_norm = logits.grad.abs().sum(dim=(2, 3, 4))
    assert torch.all(grad_norm[~annotated] == 0) and torch.all(grad_norm[annotated] > 0)
    # changing anything in unannotated channels leaves the loss bit-identical
    logits2 = logits.detach().clone()
    logits2[~annotated] = torch.randn_like(logits2[~annotated]) * 100
    target2 = target.clone()
    target2[~annotated] = ~target2[~annotated]
    assert partial_label_dice_bce(logits2, target2, annotated).item() == loss.item()
    # the loss of an annotated pair is Dice + BCE of that pair (Eq. 11-13)
    p = torch.sigmoid(logits[0, 5].detach()).flatten()
    t = target[0, 5].float().flatten()
    one = torch.nn.functional.binary_cross_entropy(p, t) + 1 - (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5)
    single = torch.zeros_like(annotated)
    single[0, 5] = True
    assert partial_label_dice_bce(logits.detach(), target, single).item() == pytest.approx(one.item(), rel=1e-5)
    nothing = partial_label_dice_bce(logits, target, torch.zeros_like(annotated))
    assert nothing.item() == 0.0


def test_fewer_than_four_stages_is_a_clear_error():
    with pytest.raises(PlansError, match="at least 4"):
        kmmm_stage_indices(3)
    assert kmmm_stage_indices(6) == [5, 4, 3, 2]


def test_2d_configuration_builds_and_runs():
    net = tiny_network(stage=1, ndim=2)
    out = net(torch.randn(2, 1, 32, 32))
    assert tuple(out.logits.shape) == (2, 45, 32, 32)


def test_backbone_returns_encoder_scales_and_decoder_feature():
    bb = build_backbone(5)
    skips, dec = bb(torch.randn(1, 1, 32, 32, 32))
    assert [s.shape[-1] for s in skips] == [32, 16, 8, 4, 2] and dec.shape[1:] == (8, 32, 32, 32)


def test_untrained_classes_answer_absent_at_inference_only():
    net = tiny_network(stage=1)
    net.trained_classes[1] = False                     # e.g. no training case annotates the right kidney
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        train_out = net(x).logits
        out = PredictionNetwork(net)(x)
    assert torch.all(out[:, 1] == ABSENT_LOGIT) and not torch.all(train_out[:, 1] == ABSENT_LOGIT)
    torch.testing.assert_close(out, label_table_logits(exclusive_classes(mask_untrained_classes(
        train_out, net.trained_classes))))                  # one organ per voxel, then the label table's regions
    state = net.state_dict()
    assert not state["trained_classes"][1]             # saved with the weights: the stock predictor applies it
    del state["trained_classes"]                       # a checkpoint from before the buffer still loads
    fresh = PredictionNetwork(tiny_network(stage=1))  # nnU-Net's predictor loads the checkpoint into the adapter
    fresh.load_state_dict(state)
    fresh = fresh.network
    assert fresh.trained_classes.all()
