"""What DSM must get right to learn (issue: Stage 2 builds on Stage 1, class mixing and anomaly maps work): each
test fails on the code before the fix it guards."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _dsm_helpers import tiny_network
from nnunetv2_dsm.inference.open_vocabulary import anomaly_map
from nnunetv2_dsm.labels import CLASS_NAMES, NUM_CLASSES, NUM_ORGANS, class_index
from nnunetv2_dsm.network.alignment import class_mixing_weights, cosine_similarity
from nnunetv2_dsm.network.kmeans_layer import kmeans_update, mask_logits
from nnunetv2_dsm.network.output import PredictionNetwork, exclusive_classes, label_table_logits
from nnunetv2_dsm.training.loss import alignment_loss, organ_targets_without_tumors
from nnunetv2_dsm.training.nnUNetTrainerDSMBase import left_right_axis
from nnunetv2_dsm.training.nnUNetTrainerDSMStage1 import nnUNetTrainerDSMStage1
from nnunetv2_dsm.training.nnUNetTrainerDSMStage2 import transfer_weights


def test_after_the_alignment_converges_every_class_keeps_its_weight_on_its_own_query():
    """Eq. 20's mixing weights w_jk: trained with the index-matched alignment loss of every query, each of the 45
    classes keeps >= 0.95 of its weight on its own query (with the loss on annotated classes only, untrained
    queries kept up to 0.57 of other classes' weight)."""
    torch.manual_seed(0)
    align = tiny_network(stage=2).alignment
    align.set_text_embeddings(F.normalize(torch.randn(NUM_CLASSES, 512), dim=-1))
    centres = torch.randn(NUM_CLASSES, align.norm.normalized_shape[0])
    opt = torch.optim.Adam(align.parameters(), 1e-2)
    for _ in range(150):
        queries = centres + 0.1 * torch.randn(4, *centres.shape)        # per-case variation of the queries
        opt.zero_grad()
        alignment_loss(align(queries)).backward()
        opt.step()
    with torch.no_grad():
        w = class_mixing_weights(align(centres + 0.1 * torch.randn(8, *centres.shape)))
    own = w.diagonal(dim1=1, dim2=2).mean(0)                            # (45,) weight of class k on query k
    assert own.min() >= 0.95, {CLASS_NAMES[k]: round(float(own[k]), 3) for k in own.argsort()[:5].tolist()}


def test_alignment_does_not_push_gradients_into_the_queries():
    net = tiny_network(stage=2)
    net.alignment.set_text_embeddings(F.normalize(torch.randn(NUM_CLASSES, 512), dim=-1))
    queries = torch.randn(2, NUM_CLASSES, net.arch.dim, requires_grad=True)
    alignment_loss(net.alignment(queries)).backward()
    assert queries.grad is None and net.alignment.proj.weight.grad.abs().sum() > 0


def test_stage2_at_step_0_reproduces_stage1_organ_logits():
    s1, s2 = tiny_network(stage=1, seed=1), tiny_network(stage=2, seed=2)
    transfer_weights(s2, s1.state_dict())
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        out1, out2 = s1(x), s2(x)
    for o1, o2 in zip(out1.predictions(), out2.predictions()):   # final logits, then every kMMM layer's organs
        torch.testing.assert_close(o2[:, :NUM_ORGANS], o1[:, :NUM_ORGANS], rtol=1e-5, atol=1e-5)


def test_per_layer_organ_targets_leave_out_annotated_tumors_only():
    target = torch.zeros(2, NUM_CLASSES, 4, 4, 4, dtype=torch.bool)
    liver, tumor = class_index("Liver") - 1, class_index("Liver Tumor") - 1
    target[:, liver, :2] = True
    target[:, tumor, 0] = True                          # the tumor lies inside the liver, as the labels say
    annotated = torch.zeros(2, NUM_CLASSES, dtype=torch.bool)
    annotated[:, liver] = True
    annotated[0, tumor] = True                          # case 1 does not annotate the tumor channel
    layer = organ_targets_without_tumors(target, annotated)
    assert not layer[0, liver, 0].any() and layer[0, liver, 1].all()    # tumor voxels left out of the organ
    assert torch.equal(layer[1], target[1])                             # unannotated: unchanged
    assert torch.equal(layer[:, NUM_ORGANS:], target[:, NUM_ORGANS:])   # tumor channels unchanged


def test_anomaly_map_is_minus_the_max_over_the_trained_organs_tissue_logits():
    """Eq. 14 at full resolution reads the final organ (tissue) channels, and only the organs the model was
    trained on: an untrained organ query that answers high at a tumor must not hide it."""
    logits = torch.full((1, NUM_CLASSES, 4, 4, 4), -5.0)
    liver, spleen = class_index("Liver") - 1, class_index("Spleen") - 1
    logits[0, liver] = 3.0
    logits[0, liver, 0, 0, 0] = -4.0                        # a tumor: the liver's tissue answers low
    logits[0, spleen, 0, 0, 0] = 6.0                        # an untrained query answers high there
    trained = torch.zeros(NUM_CLASSES, dtype=torch.bool)
    trained[liver] = True
    a = anomaly_map(logits, trained)
    assert a.shape == (1, 1, 4, 4, 4)
    assert a[0, 0, 0, 0, 0] == 4.0 and torch.all(a[0, 0].flatten()[1:] == -3.0)
    assert anomaly_map(logits)[0, 0, 0, 0, 0] == -6.0        # over every organ query the tumor would be hidden


def test_label_table_regions_take_in_single_host_tumors_only():
    """The network's organ channels are tissue without tumors; the label table's organ region is the union with
    the tumors of that single host (liver ∪ liver tumor), while a paired host's tumor (kidney) stays out."""
    logits = torch.randn(2, NUM_CLASSES, 3, 3, 3)
    regions = label_table_logits(logits)
    idx = lambda n: class_index(n) - 1  # noqa: E731
    torch.testing.assert_close(regions[:, idx("Liver")], torch.maximum(torch.maximum(
        logits[:, idx("Liver")], logits[:, idx("Liver Tumor")]), logits[:, idx("Hepatic Vessel Tumor")]))
    for name in ("Right Kidney", "Left Kidney", "Kidney Tumor", "Bladder"):
        torch.testing.assert_close(regions[:, idx(name)], logits[:, idx(name)])
    net = tiny_network(stage=2)
    net.trained_classes[idx("Liver Tumor")] = False          # an untrained tumor query must not paint its host
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        raw, view = net(x).logits, PredictionNetwork(net)(x)
    torch.testing.assert_close(view[:, idx("Liver")], torch.maximum(exclusive_classes(raw)[:, idx("Liver")],
                                                                    raw[:, idx("Hepatic Vessel Tumor")]))


def test_each_voxel_keeps_its_most_confident_class_whatever_the_region_order():
    """Organs are disjoint; nnU-Net writes regions in order, so an unsure later class used to take a voxel the model
    gave, more confidently, to an earlier one: Bladder over Aorta, a faint kidney tumor (written without its side)
    over the right kidney. A liver tumor keeps overriding its liver (its label keeps the host)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunetv2_dsm.labels import dataset_json_labels, decode, regions_class_order
    idx = lambda n: class_index(n) - 1  # noqa: E731
    logits = torch.full((1, NUM_CLASSES, 4, 1, 1), -5.0)
    logits[0, idx("Aorta"), 0], logits[0, idx("Bladder"), 0] = 4.0, 1.0                 # both claim voxel 0
    logits[0, idx("Liver"), 1], logits[0, idx("Stomach"), 1], logits[0, idx("Liver Tumor"), 1] = 2.0, 1.0, 3.0
    logits[0, idx("Right Kidney"), 2], logits[0, idx("Kidney Tumor"), 2] = 3.0, 1.0
    logits[0, idx("Spleen"), 3] = -1.0                                                  # nobody claims voxel 3
    out = exclusive_classes(logits)
    assert (out[:, :25] > 0).sum(1).flatten().tolist() == [1, 1, 1, 0]                 # one organ per voxel
    assert out[0, idx("Aorta"), 0] == 4.0 and out[0, idx("Bladder"), 0] == 0.0
    assert out[0, idx("Liver Tumor"), 1] == 3.0 and out[0, idx("Liver"), 1] == 2.0 and out[0, idx("Stomach"), 1] == 0
    assert out[0, idx("Kidney Tumor"), 2] == 0.0 and out[0, idx("Right Kidney"), 2] == 3.0  # paired host: must beat it
    logits2 = logits.clone()
    logits2[0, idx("Kidney Tumor"), 2] = 5.0                                            # a confident kidney tumor stays
    assert exclusive_classes(logits2)[0, idx("Kidney Tumor"), 2] == 5.0
    torch.testing.assert_close(out[0, :, 3], logits[0, :, 3])                           # all below 0: unchanged
    lm = LabelManager(dataset_json_labels(), regions_class_order())
    seg = lm.convert_probabilities_to_segmentation(torch.sigmoid(label_table_logits(out))[0])
    mh = decode(np.asarray(seg).ravel()).T                                              # (voxel, class)
    assert mh[:, idx("Aorta")].tolist() == [True, False, False, False] and not mh[:, idx("Bladder")].any()
    assert mh[1, idx("Liver")] and mh[1, idx("Liver Tumor")] and not mh[:, idx("Stomach")].any()  # tumor in its liver
    assert mh[2, idx("Right Kidney")] and not mh[2, idx("Kidney Tumor")] and not mh[3].any()
    seg_main = lm.convert_probabilities_to_segmentation(torch.sigmoid(label_table_logits(logits))[0])
    old = decode(np.asarray(seg_main).ravel()).T                     # without it: the later region wins
    assert old[0, idx("Bladder")] and old[2, idx("Kidney Tumor")] and not old[2, idx("Right Kidney")]


def test_kmeans_update_and_cosine_run_in_float32_under_autocast():
    assign = torch.zeros(1, 2, 70000)
    assign[0, 0] = 1.0                                   # one cluster of 70,000 voxels
    values = torch.ones(1, 3, 70000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        update = kmeans_update(assign, values)
        cos = cosine_similarity(torch.randn(2, 5, 16), torch.randn(7, 16))
    assert update.dtype == torch.float32 and cos.dtype == torch.float32
    assert update[0, 0, 0].item() == 70000.0             # exact in float32; 65,504 is float16's largest value
    assert torch.isfinite(update.half().float()[0, 1]).all()


def test_left_right_axis_follows_transpose_forward():
    assert left_right_axis([0, 1, 2], 3) == 2
    assert left_right_axis([2, 0, 1], 3) == 0
    assert left_right_axis([0, 1, 2], 2) == 1            # 2-D patches are the last two preprocessed axes
    assert left_right_axis([2, 0, 1], 2) is None         # 2-D slices across the left-right axis


@pytest.mark.parametrize("transpose, patch", [([0, 1, 2], [64, 64, 64]), ([2, 0, 1], [64, 64, 64]),
                                              ([0, 1, 2], [128, 128])])
def test_dsm_trainers_never_mirror_left_right(transpose, patch):
    trainer = nnUNetTrainerDSMStage1.__new__(nnUNetTrainerDSMStage1)   # only the hook under test, no data
    trainer.configuration_manager = SimpleNamespace(patch_size=patch)
    trainer.plans_manager = SimpleNamespace(transpose_forward=transpose)
    trainer.print_to_log_file = lambda *a, **k: None
    _, _, _, mirror = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    lateral = left_right_axis(transpose, len(patch))
    assert lateral not in (mirror or ()) and trainer.inference_allowed_mirroring_axes == mirror
    assert len(mirror) == len(patch) - 1                 # the other axes are still mirrored


@pytest.mark.parametrize("stage", [1, 2])
def test_queries_the_decoder_made_identical_keep_distinct_kernels_that_train_apart(stage):
    """The kMMM updates can leave two classes' queries identical (left kidney and aorta, kernel cosine 1.00 on the
    seed-1 budget-2 benchmark model): each final kernel must still have a part of its own, and one step on a loss
    that tells the two masks apart must move their kernels apart."""
    torch.manual_seed(0)
    net = tiny_network(stage=stage)
    n = NUM_ORGANS if stage == 1 else NUM_CLASSES
    a, b = class_index("Left Kidney") - 1, class_index("Aorta") - 1
    queries = torch.randn(1, n, net.arch.dim)
    queries[:, b] = queries[:, a]                                 # the decoder's collapse
    kernels, biases = net.query_kernels(queries)
    ka, kb = kernels[0, a], kernels[0, b]
    assert F.cosine_similarity(ka, kb, dim=0) < 0.9
    pixel = F.normalize(torch.randn(1, kernels.shape[-1], 64), dim=1)
    target = torch.zeros(2, 64)
    target[0, :32], target[1, 32:] = 1, 1                          # a's voxels, b's voxels
    logits = mask_logits(pixel, kernels[:, [a, b]], biases[:, [a, b]])
    F.binary_cross_entropy_with_logits(logits[0], target).backward()
    grad = net.organ_queries.grad
    assert grad[a].norm() > 0 and grad[b].norm() > 0 and F.cosine_similarity(grad[a], grad[b], dim=0) < 0


def test_mask_kernels_ignore_a_shift_shared_by_every_query():
    """The decoder's shared residual updates collapsed the queries onto one common vector (final kernels of all
    organs but the liver at cosine 1.00 after the benchmark's Stage 1): the final kernels and every kMMM layer's
    responses must not change when the same vector is added to every organ (resp. tumor) query, and kernels of
    distinct queries stay distinct however large that shared vector is."""
    torch.manual_seed(0)
    net = tiny_network(stage=2)
    queries = torch.randn(2, NUM_CLASSES, net.arch.dim)
    shift = torch.zeros_like(queries)
    shift[:, :NUM_ORGANS] = 50 * torch.randn(2, 1, net.arch.dim)
    shift[:, NUM_ORGANS:] = 50 * torch.randn(2, 1, net.arch.dim)
    with torch.no_grad():
        k0, _ = net.query_kernels(queries)
        k1, _ = net.query_kernels(queries + shift)
        layer = net.kmmm[0]
        pixel = torch.randn(2, layer.pixel_embed.in_channels, 4, 4, 4)
        r0, _ = layer.response(queries[:, :NUM_ORGANS], pixel)
        r1, _ = layer.response(queries[:, :NUM_ORGANS] + shift[:, :NUM_ORGANS], pixel)
    torch.testing.assert_close(k1, k0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r1, r0, rtol=1e-4, atol=1e-4)
    kn = F.normalize(k1[0, :NUM_ORGANS], dim=1)
    assert (kn @ kn.T - torch.eye(NUM_ORGANS)).abs().max() < 0.9
