"""The host's tissue inside its annotated tumors gets one pair's weight (loss.host_tissue_in_tumors)."""
import torch
import torch.nn.functional as F

from nnunetv2_dsm.labels import NUM_CLASSES, class_index
from nnunetv2_dsm.training.loss import DSMLoss, host_tissue_in_tumors

LK, RK, LIVER = class_index("Left Kidney") - 1, class_index("Right Kidney") - 1, class_index("Liver") - 1
KT, LT = class_index("Kidney Tumor") - 1, class_index("Liver Tumor") - 1


def _cases():
    """Case 0: KiTS-like (both kidneys and the kidney tumor annotated, 8 tumor voxels in the left kidney).
    Case 1: the same image, but only the left kidney is annotated (a tumor drawn, not annotated)."""
    target = torch.zeros(2, NUM_CLASSES, 4, 4, 4, dtype=torch.bool)
    target[:, LK, :2] = True
    target[:, KT, 0, :2] = True
    annotated = torch.zeros(2, NUM_CLASSES, dtype=torch.bool)
    annotated[0, [LK, RK, KT]] = True
    annotated[1, LK] = True
    return target, annotated


def test_one_term_per_annotated_host_of_each_annotated_tumor_the_softplus_mean_over_its_voxels():
    target, annotated = _cases()
    logits = torch.randn(2, NUM_CLASSES, 4, 4, 4, requires_grad=True)
    terms = host_tissue_in_tumors(logits, target, annotated)
    tumor = target[0, KT]
    expected = torch.stack([F.softplus(logits[0, RK][tumor]).mean(), F.softplus(logits[0, LK][tumor]).mean()])
    torch.testing.assert_close(terms, expected)       # kidney tumor: both kidneys are its hosts (RK before LK)
    torch.testing.assert_close(terms[0], F.binary_cross_entropy_with_logits(
        logits[0, RK][tumor], torch.zeros(8)))       # softplus(x) is BCE(x, 0)
    terms.sum().backward()
    g = logits.grad
    assert g[0, [RK, LK]][:, tumor].abs().min() > 0
    assert g[0, [RK, LK]][:, ~tumor].abs().sum() == 0     # only the tumor voxels
    assert g[1].abs().sum() == 0                          # case 1 does not annotate the tumor
    assert g[0, LIVER].abs().sum() == 0 and g[0, KT].abs().sum() == 0


def test_no_term_without_an_annotated_host_or_a_drawn_tumor():
    target, annotated = _cases()
    logits = torch.randn(2, NUM_CLASSES, 4, 4, 4)
    annotated[0, [LK, RK]] = False                        # tumor annotated, hosts not
    assert host_tissue_in_tumors(logits, target, annotated).numel() == 0
    target[:, LT, 1] = True                               # a liver tumor drawn but not annotated: no term either
    annotated[0, LIVER] = True
    assert host_tissue_in_tumors(logits, target, annotated).numel() == 0
    annotated[0, LT] = True
    assert host_tissue_in_tumors(logits, target, annotated).numel() == 1


def test_dsm_loss_adds_each_term_as_one_more_pair_at_every_output():
    target, annotated = _cases()
    outputs = [torch.randn(2, NUM_CLASSES, 4, 4, 4), torch.randn(2, NUM_CLASSES, 4, 4, 4)]

    class Out:                                            # the two members of DSMOutput the loss reads here
        query_class_log_probs = None

        def predictions(self):
            return outputs

    with_term = DSMLoss(2, alignment_weight=0.0)(Out(), [target, target], annotated)
    without = DSMLoss(2, alignment_weight=0.0, tumor_tissue=False)(Out(), [target, target], annotated)
    pairs = annotated.sum()                               # 3 + 1 annotated (case, class) pairs
    w = DSMLoss(2).weights
    expected = sum(wi * host_tissue_in_tumors(o, target, annotated).sum() / pairs for wi, o in zip(w, outputs))
    torch.testing.assert_close(with_term - without, expected)
