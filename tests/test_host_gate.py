import pytest
import torch

from nnunetv2_dsm.labels import NUM_CLASSES, NUM_ORGANS, NUM_TUMORS, class_index
from nnunetv2_dsm.network.host_gate import TUMOR_HOST_CHANNELS, gate_tumor_channels, host_gated_tumor_logits

LIVER, LIVER_TUMOR = class_index("Liver") - 1, class_index("Liver Tumor") - 1 - NUM_ORGANS
KIDNEYS = (class_index("Right Kidney") - 1, class_index("Left Kidney") - 1)
KIDNEY_TUMOR = class_index("Kidney Tumor") - 1 - NUM_ORGANS


def _logits(seed=0, shape=(2, NUM_CLASSES, 5, 6, 7)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 4


def test_gate_is_the_minimum_of_the_tumor_logit_and_minus_the_hosts_max_voxel_by_voxel():
    x = _logits()
    gated = gate_tumor_channels(x)
    assert torch.equal(gated[:, :NUM_ORGANS], x[:, :NUM_ORGANS])            # organ tissue untouched
    t = x[:, NUM_ORGANS:]
    torch.testing.assert_close(gated[:, NUM_ORGANS + LIVER_TUMOR], torch.minimum(t[:, LIVER_TUMOR], -x[:, LIVER]))
    both = torch.maximum(x[:, KIDNEYS[0]], x[:, KIDNEYS[1]])                 # a paired host: either kidney
    torch.testing.assert_close(gated[:, NUM_ORGANS + KIDNEY_TUMOR], torch.minimum(t[:, KIDNEY_TUMOR], -both))
    assert len(TUMOR_HOST_CHANNELS) == NUM_TUMORS and all(TUMOR_HOST_CHANNELS)


def test_a_gated_tumor_is_never_claimed_by_its_host_tissue_nor_above_its_own_query():
    """Where a gated tumor is positive (sigmoid > 0.5) every host tissue logit is negative: the label map can never
    call the same voxel host tissue and tumor; and the gate only ever lowers a tumor logit."""
    x = _logits(1)
    gated = gate_tumor_channels(x)[:, NUM_ORGANS:]
    assert (gated <= x[:, NUM_ORGANS:]).all()
    for t, hosts in enumerate(TUMOR_HOST_CHANNELS):
        positive = gated[:, t] > 0
        assert positive.any()
        assert (x[:, list(hosts)].amax(1)[positive] < 0).all()


def test_gradient_flows_to_the_smaller_argument_only():
    organs = torch.zeros(1, NUM_ORGANS, 2, requires_grad=True)
    tumors = torch.zeros(1, NUM_TUMORS, 2, requires_grad=True)
    with torch.no_grad():
        organs[0, LIVER] = torch.tensor([-3.0, 5.0])     # voxel 0: no liver tissue; voxel 1: liver tissue
        tumors[0, LIVER_TUMOR] = torch.tensor([1.0, 1.0])
    host_gated_tumor_logits(tumors, organs)[0, LIVER_TUMOR].sum().backward()
    assert tumors.grad[0, LIVER_TUMOR].tolist() == [1.0, 0.0]    # voxel 0: the tumor query decides
    assert organs.grad[0, LIVER].tolist() == [0.0, -1.0]         # voxel 1: the liver tissue decides


def test_gate_rejects_wrong_channel_counts():
    with pytest.raises(ValueError, match="tumor"):
        host_gated_tumor_logits(torch.zeros(1, NUM_TUMORS - 1, 3), torch.zeros(1, NUM_ORGANS, 3))
