import pytest
import torch

from nnunetv2_dsm.labels import NUM_CLASSES, NUM_ORGANS, NUM_TUMORS, class_index
from nnunetv2_dsm.network.host_gate import TUMOR_HOST_CHANNELS, gate_tumor_channels, host_gated_tumor_logits

LIVER, LIVER_TUMOR = class_index("Liver") - 1, class_index("Liver Tumor") - 1 - NUM_ORGANS
KIDNEYS = (class_index("Right Kidney") - 1, class_index("Left Kidney") - 1)
KIDNEY_TUMOR = class_index("Kidney Tumor") - 1 - NUM_ORGANS


def _logits(seed=0, shape=(2, NUM_CLASSES, 5, 6, 7)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 4


def test_gate_subtracts_the_hosts_claimed_tissue_from_the_tumor_logit_voxel_by_voxel():
    x = _logits()
    gated = gate_tumor_channels(x)
    assert torch.equal(gated[:, :NUM_ORGANS], x[:, :NUM_ORGANS])            # organ tissue untouched
    t = x[:, NUM_ORGANS:]
    torch.testing.assert_close(gated[:, NUM_ORGANS + LIVER_TUMOR], t[:, LIVER_TUMOR] - x[:, LIVER].clamp(min=0))
    both = torch.maximum(x[:, KIDNEYS[0]], x[:, KIDNEYS[1]])                 # a paired host: either kidney
    torch.testing.assert_close(gated[:, NUM_ORGANS + KIDNEY_TUMOR],
                               torch.minimum(t[:, KIDNEY_TUMOR], t[:, KIDNEY_TUMOR] - both))
    assert len(TUMOR_HOST_CHANNELS) == NUM_TUMORS and all(TUMOR_HOST_CHANNELS)


def test_a_gated_tumor_is_positive_exactly_where_its_query_beats_every_host_and_is_never_raised():
    """Where a gated tumor is positive (sigmoid > 0.5) its query is positive and more confident than every host
    tissue (a two-class softmax between tumor and host), and the gate only ever lowers a tumor logit. A tumor
    query that beats a confident host tissue is found: the first gate, min(a, −R), never let a tumor out where its
    host's tissue logit stayed above 0."""
    x = _logits(1)
    gated = gate_tumor_channels(x)[:, NUM_ORGANS:]
    assert (gated <= x[:, NUM_ORGANS:]).all()
    for t, hosts in enumerate(TUMOR_HOST_CHANNELS):
        host = x[:, list(hosts)].amax(1)
        query = x[:, NUM_ORGANS + t]
        assert torch.equal(gated[:, t] > 0, (query > 0) & (query > host))
        assert ((gated[:, t] > 0) & (host > 0)).any()                      # found inside a claimed host


def test_inside_its_host_the_loss_reaches_both_the_tumor_query_and_the_host_tissue():
    """Outside the host (voxel 0) the tumor query alone decides. Inside it (voxel 1) the gradient reaches both
    arguments: the tumor query must learn to rise above its host on tumor voxels and stay below it on tissue
    voxels, and the host tissue is pushed down inside tumors (what Eq. 14 reads). The first gate passed voxel 1's
    gradient to the host tissue only, and the kidney-tumor query learned the whole left kidney."""
    organs = torch.zeros(1, NUM_ORGANS, 2, requires_grad=True)
    tumors = torch.zeros(1, NUM_TUMORS, 2, requires_grad=True)
    with torch.no_grad():
        organs[0, LIVER] = torch.tensor([-3.0, 5.0])     # voxel 0: no liver tissue; voxel 1: liver tissue
        tumors[0, LIVER_TUMOR] = torch.tensor([1.0, 1.0])
    host_gated_tumor_logits(tumors, organs)[0, LIVER_TUMOR].sum().backward()
    assert tumors.grad[0, LIVER_TUMOR].tolist() == [1.0, 1.0]
    assert organs.grad[0, LIVER].tolist() == [0.0, -1.0]


def test_gate_rejects_wrong_channel_counts():
    with pytest.raises(ValueError, match="tumor"):
        host_gated_tumor_logits(torch.zeros(1, NUM_TUMORS - 1, 3), torch.zeros(1, NUM_ORGANS, 3))
