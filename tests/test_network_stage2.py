import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _dsm_helpers import tiny_network
from nnunetv2_dsm.labels import NUM_CLASSES
from nnunetv2_dsm.network.alignment import TAU, class_mixing_weights, query_class_log_probs
from nnunetv2_dsm.training.loss import DSMLoss, alignment_loss
from nnunetv2_dsm.training.stage2 import RUN_RECORDS, summarize_modules, transfer_weights


def _text(n=NUM_CLASSES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, 512, generator=g), dim=-1)


def stage2_network(seed=0, ndim=3):
    net = tiny_network(stage=2, seed=seed, ndim=ndim)
    net.alignment.set_text_embeddings(_text())
    return net


def test_stage2_outputs_all_45_classes_and_per_layer_predictions():
    net = stage2_network()
    out, extras = net(torch.randn(2, 1, 32, 32, 32), return_extras=True)
    assert [tuple(o.shape) for o in out] == [(2, 45, 32, 32, 32), (2, 45, 32, 32, 32), (2, 45, 16, 16, 16),
                                             (2, 45, 8, 8, 8), (2, 45, 4, 4, 4)]
    assert tuple(extras["query_class_log_probs"].shape) == (2, 45, 45)


def test_every_trainable_parameter_gets_a_nonzero_gradient_after_one_stage2_step():
    net = stage2_network()
    out, extras = net(torch.randn(2, 1, 32, 32, 32), return_extras=True)
    g = torch.Generator().manual_seed(1)
    targets = [torch.rand((2, NUM_CLASSES, *o.shape[2:]), generator=g) > 0.7 for o in out]
    annotated = torch.ones(2, NUM_CLASSES, dtype=torch.bool)
    DSMLoss(len(out))(out, targets, annotated, extras).backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"parameters without gradient: {missing}"


def test_eq20_cosine_over_tau_softmax_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    q, t = torch.randn(2, 7, 16, generator=g), torch.randn(5, 16, generator=g)
    log_p = query_class_log_probs(q, t)
    for b in range(2):
        for j in range(7):
            cos = torch.tensor([float(q[b, j] @ t[k] / (q[b, j].norm() * t[k].norm())) for k in range(5)])
            expected = torch.exp(cos / TAU) / torch.exp(cos / TAU).sum()
            np.testing.assert_allclose(log_p[b, j].exp().numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)
    w = class_mixing_weights(log_p)
    np.testing.assert_allclose(w.sum(1).numpy(), np.ones((2, 5)), rtol=1e-5)
    p = log_p.exp()
    np.testing.assert_allclose(w.numpy(), (p / p.sum(1, keepdim=True)).numpy(), rtol=1e-4, atol=1e-7)


def test_aligned_queries_give_each_class_its_own_query_mask():
    """When query j's text-space projection equals text row j, w is the identity and the class maps are the query
    masks; an extra prompt equal to text row k reproduces class k's map (open vocabulary)."""
    net = stage2_network()
    al = net.alignment
    queries = torch.randn(1, NUM_CLASSES, net.arch.dim)
    with torch.no_grad():
        text = al.proj(al.norm(queries))[0]
    kernels, biases = torch.randn(1, NUM_CLASSES, 8), torch.randn(1, NUM_CLASSES)
    class_k, class_b, log_p = al(queries, kernels, biases, text_embeddings=text)
    np.testing.assert_allclose(class_k.detach().numpy(), kernels.numpy(), atol=1e-4)
    extra = torch.cat((text, text[30:31]))
    class_k2, _, _ = al(queries, kernels, biases, text_embeddings=extra)
    np.testing.assert_allclose(class_k2[0, -1].detach().numpy(), class_k2[0, 30].detach().numpy(), atol=1e-5)


def test_alignment_loss_only_counts_annotated_classes():
    log_p = torch.log_softmax(torch.randn(2, 45, 45), -1).requires_grad_()
    ann = torch.zeros(2, 45, dtype=torch.bool)
    ann[0, 3] = ann[1, 30] = True
    loss = alignment_loss(log_p, ann)
    assert loss.item() == pytest.approx(-(log_p[0, 3, 3] + log_p[1, 30, 30]).item() / 2)
    loss.backward()
    assert log_p.grad.abs().sum(-1)[~ann].sum() == 0


def test_stage1_weights_load_into_stage2_and_only_stage2_modules_are_new():
    s1, s2 = tiny_network(stage=1, seed=1), tiny_network(stage=2, seed=2)
    s1.trained_classes[3] = False                      # Stage 1's record of its run is not carried over
    loaded, fresh = transfer_weights(s2, s1.state_dict())
    assert set(loaded) == set(s1.state_dict()) - RUN_RECORDS and "trained_classes" in RUN_RECORDS
    assert s2.trained_classes.all() and "trained_classes" not in fresh
    assert fresh and all(k.startswith(("tumour.", "alignment.")) for k in fresh)
    for k in loaded:
        assert torch.equal(s2.state_dict()[k], s1.state_dict()[k])
    assert "tumour.queries" in summarize_modules(fresh) or "tumour.diffusion" in summarize_modules(fresh)
    x = torch.randn(1, 1, 32, 32, 32)
    s1.eval(), s2.eval()
    s1.deep_supervision = s2.deep_supervision = False
    with torch.no_grad():  # the backbone is shared exactly
        assert torch.equal(s1.backbone(x)[1], s2.backbone(x)[1])


def test_stage2_2d():
    out = stage2_network(ndim=2)(torch.randn(2, 1, 32, 32))
    assert tuple(out[0].shape) == (2, 45, 32, 32)
