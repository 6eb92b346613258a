"""Stage 2 keeps Stage 1's organ answers where no label speaks (loss.stage1_distillation, training.stage1_teacher)."""
import torch
import torch.nn.functional as F

from _dsm_helpers import tiny_network
from nnunetv2_dsm.labels import NUM_CLASSES, NUM_ORGANS, class_index
from nnunetv2_dsm.training.loss import DSMLoss, stage1_distillation
from nnunetv2_dsm.training.nnUNetTrainerDSMStage2 import transfer_weights
from nnunetv2_dsm.training.stage1_teacher import Stage1Teacher


def _kits_case():
    """Two KiTS-like cases: kidneys and kidney tumor annotated, 8 tumor voxels (case 0 only)."""
    target = torch.zeros(2, NUM_CLASSES, 4, 4, 4, dtype=torch.bool)
    kidney, tumor = class_index("Left Kidney") - 1, class_index("Kidney Tumor") - 1
    target[:, kidney, :2] = True
    target[0, tumor, 0, :2] = True
    annotated = torch.zeros(2, NUM_CLASSES, dtype=torch.bool)
    annotated[:, [kidney, class_index("Right Kidney") - 1, tumor]] = True
    return target, annotated, kidney


def test_distillation_is_bce_to_stage1_on_unannotated_trained_organs_off_the_tumors():
    target, annotated, kidney = _kits_case()
    liver, aorta = class_index("Liver") - 1, class_index("Aorta") - 1
    trained = torch.zeros(NUM_ORGANS, dtype=torch.bool)
    trained[[kidney, liver]] = True                     # Stage 1 learned the kidney and the liver, not the aorta
    logits = torch.randn(2, NUM_CLASSES, 4, 4, 4, requires_grad=True)
    teacher = torch.rand(2, NUM_ORGANS, 4, 4, 4)
    loss = stage1_distillation(logits, teacher, annotated, trained, target)
    free0 = torch.ones(4, 4, 4, dtype=torch.bool)
    free0[0, :2] = False                                # case 0's annotated tumor voxels
    bce = F.binary_cross_entropy_with_logits(logits[:, liver], teacher[:, liver], reduction="none")
    torch.testing.assert_close(loss, (bce[0][free0].mean() + bce[1].mean()) / 2)
    loss.backward()
    g = logits.grad
    assert g[0, liver][free0].abs().min() > 0 and g[0, liver, 0, :2].abs().sum() == 0   # off the tumor voxels
    assert g[:, kidney].abs().sum() == 0                # annotated: its own labels speak
    assert g[:, aorta].abs().sum() == 0                 # Stage 1 never learned it: nothing to keep
    assert g[:, NUM_ORGANS:].abs().sum() == 0


def test_distillation_gradient_is_zero_where_stage2_answers_as_stage1():
    target, annotated, _ = _kits_case()
    logits = torch.randn(2, NUM_CLASSES, 4, 4, 4, requires_grad=True)
    trained = torch.ones(NUM_ORGANS, dtype=torch.bool)
    stage1_distillation(logits, torch.sigmoid(logits[:, :NUM_ORGANS]).detach(), annotated, trained, target).backward()
    assert logits.grad.abs().max() < 1e-7


def test_at_stage2_step_0_the_frozen_stage1_teacher_adds_no_gradient():
    """The real networks: Stage 2 right after the hand-over, its teacher the Stage 1 network it came from."""
    s1, s2 = tiny_network(stage=1, seed=1), tiny_network(stage=2, seed=2)
    transfer_weights(s2, s1.state_dict())
    teacher = Stage1Teacher(tiny_network(stage=1, seed=3), s1.state_dict(), torch.device("cpu"))
    assert not any(p.requires_grad for p in teacher.network.parameters())
    x = torch.randn(2, 1, 32, 32, 32)
    probs = teacher.organ_probabilities(x)
    out = s2(x)
    targets = [torch.zeros(2, NUM_CLASSES, *p.shape[2:]) for p in out.predictions()]
    annotated = torch.zeros(2, NUM_CLASSES, dtype=torch.bool)
    annotated[:, class_index("Liver") - 1] = True
    loss = DSMLoss(len(targets), alignment_weight=0.0)
    loss.annotated, loss.teacher, loss.teacher_trained = annotated, probs, teacher.trained
    with_teacher = loss(out, targets)
    loss.teacher = None
    without = loss(out, targets)
    grads = torch.autograd.grad(with_teacher - without, [out.logits, *out.layers], allow_unused=True)
    assert max(g.abs().max().item() for g in grads if g is not None) < 1e-6
    assert (with_teacher - without).item() > 0           # the term is there (the BCE's entropy), not skipped
