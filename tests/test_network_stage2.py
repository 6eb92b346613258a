import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _dsm_helpers import params_without_gradient, tiny_network
from nnunetv2_dsm.inference.open_vocabulary import OpenVocabularyOutputs
from nnunetv2_dsm.labels import NUM_CLASSES, NUM_ORGANS
from nnunetv2_dsm.network.host_gate import gate_tumor_channels
from nnunetv2_dsm.network.alignment import TAU, class_mixing_weights, query_class_log_probs
from nnunetv2_dsm.training.loss import DSMLoss, alignment_loss
from nnunetv2_dsm.training.nnUNetTrainerDSMStage2 import RUN_RECORDS, summarize_modules, transfer_weights


def _text(n=NUM_CLASSES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, 512, generator=g), dim=-1)


def stage2_network(seed=0, ndim=3):
    net = tiny_network(stage=2, seed=seed, ndim=ndim)
    net.alignment.set_text_embeddings(_text())
    return net


def test_stage2_outputs_all_45_classes_and_per_layer_predictions():
    net = stage2_network()
    out = net(torch.randn(2, 1, 32, 32, 32))
    assert [tuple(o.shape) for o in out.predictions()] == [(2, 45, 32, 32, 32), (2, 45, 32, 32, 32),
                                                           (2, 45, 16, 16, 16), (2, 45, 8, 8, 8), (2, 45, 4, 4, 4)]
    assert tuple(out.query_class_log_probs.shape) == (2, 45, 45)


def test_every_trainable_parameter_gets_a_nonzero_gradient_in_stage2_training():
    """The organ–tumor self-attention starts as the identity (zero output layers), so its inner layers get their
    first gradient once one step has moved those output layers: checked on the second step."""
    net = stage2_network()
    assert not params_without_gradient(net, train_steps=2, tumors=True)


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


def test_class_masks_are_their_own_query_masks_and_a_prompt_mixes_trained_queries_only():
    """Class k's logits are query k's mask (index match), whatever the alignment says; a tumor's is its query's mask
    gated by its host's tissue (network/host_gate.py). A prompt equal to class k's text, with the projections
    aligned, reproduces class k's map; when class k is untrained the prompt falls to the other (trained) queries and
    query k gets weight 0."""
    net = stage2_network()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        out = net(x)
        q, e = out.queries, out.pixel_embedding
        kernels, biases = net.query_kernels(q)
        own = torch.einsum("bnd,bdxyz->bnxyz", kernels, e) + biases[..., None, None, None]
        torch.testing.assert_close(out.logits, gate_tumor_channels(own), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(out.logits[:, NUM_ORGANS:], own[:, NUM_ORGANS:], atol=1e-3)  # the gate acts
        al = net.alignment
        al.set_text_embeddings(F.normalize(al.project(q)[0], dim=-1))     # perfectly aligned projections
        w, _ = al.prompt_weights(q, al.text_embeddings[30:31])
        assert w[0, 30, 0] > 0.99
        head = OpenVocabularyOutputs(al.text_embeddings[30:31])
        torch.testing.assert_close(head(net, out)[:, 0], out.logits[:, 30], rtol=1e-3, atol=1e-2)
        eligible = torch.ones(NUM_CLASSES, dtype=torch.bool)
        eligible[30] = False
        w, _ = al.prompt_weights(q, al.text_embeddings[30:31], eligible)
        assert w[0, 30, 0] == 0 and torch.isclose(w[0, :, 0].sum(), torch.tensor(1.0))


def test_alignment_loss_trains_the_index_match_of_every_query():
    log_p = torch.log_softmax(torch.randn(2, 45, 45), -1).requires_grad_()
    loss = alignment_loss(log_p)
    assert loss.item() == pytest.approx(-log_p.diagonal(dim1=1, dim2=2).mean().item())
    loss.backward()
    grad = log_p.grad.diagonal(dim1=1, dim2=2)
    assert (grad < 0).all()                            # every query, annotated or not, is pulled to its class
    assert log_p.grad.abs().sum() == grad.abs().sum()  # and nothing else


def test_stage1_weights_load_into_stage2_and_only_stage2_modules_are_new():
    s1, s2 = tiny_network(stage=1, seed=1), tiny_network(stage=2, seed=2)
    s1.trained_classes[3] = False                      # Stage 1's record of its run is not carried over
    loaded, fresh = transfer_weights(s2, s1.state_dict())
    assert set(loaded) == set(s1.state_dict()) - RUN_RECORDS and "trained_classes" in RUN_RECORDS
    assert "trained_classes" not in fresh
    assert fresh and all(k.startswith(("tumor.", "alignment.")) for k in fresh)
    for k in loaded:
        assert torch.equal(s2.state_dict()[k], s1.state_dict()[k])
    assert "tumor.queries" in summarize_modules(fresh) or "tumor.diffusion" in summarize_modules(fresh)
    x = torch.randn(1, 1, 32, 32, 32)
    s1.eval(), s2.eval()
    with torch.no_grad():  # the backbone is shared exactly
        assert torch.equal(s1.backbone(x)[1], s2.backbone(x)[1])


def test_stage2_2d():
    out = stage2_network(ndim=2)(torch.randn(2, 1, 32, 32))
    assert tuple(out.logits.shape) == (2, 45, 32, 32)
