"""Synthetic lesions in organ tissue: a training augmentation that teaches the organ channels what Eq. 14 reads.

Eq. 14 scores a voxel as anomalous where no organ answers (−max R). That works only if an organ channel answers
"my tissue" rather than "my place": probed on the benchmark's models, the kidney tissue logit inside unseen test
kidney tumours (+3.1) equalled that in the kidney (+3.2), and the pancreas channel was as high inside the held-out
pancreas tumour as in the pancreas. Few training cases show a tumour, and none shows one in the pancreas.

Here, in the training step, a case's patch gets (with probability ``probability``) one lesion in every eligible
organ it shows: a ball of random radius inside the organ, its intensity shifted by a random CT contrast of either
sign (log-uniform, so subtle lesions are as common as obvious ones), and that organ's target set to 0 on the lesion
at every deep-supervision resolution. So every tumour-hosting organ, those of the organ-only datasets included,
learns that tissue of the wrong attenuation is not its tissue. Only organs that host a tumour class
(``labels.TUMOR_HOSTS``) and whose tumour classes the case does not annotate get a lesion: on a LiTS case a liver
lesion would otherwise teach the liver-tumour channel "not a tumour".

Only Stage 2 uses it (``nnUNetTrainerDSMStage2.synthetic_lesion_probability``; Stage 1's is 0): Stage 2 is the
stage whose organ channels feed Eq. 14. Lesions in both stages were measured and reverted (75410ff); in Stage 2
alone, each seed's Stage 1 held fixed, see docs/accuracy.md, "Synthetic lesions in Stage 2 only".

The contrast is drawn in HU and converted with the plans' CT normalisation (foreground std): the shift is a CT
property, not a property of this dataset's tumours. Other normalisations get no lesions (the trainer logs it).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nnunetv2_dsm.labels import NUM_ORGANS
from nnunetv2_dsm.network.host_gate import TUMOR_HOST_CHANNELS

LESION_CONTRAST_HU: Tuple[float, float] = (20.0, 200.0)   # |shift|, log-uniform; hypo- and hyper-attenuating
LESION_RADIUS_MM: Tuple[float, float] = (4.0, 12.0)        # uniform


def _hosted_tumors() -> dict:
    """organ channel (0-based) → the tumour channels (0-based) it hosts: host_gate.TUMOR_HOST_CHANNELS inverted."""
    hosted: dict = {}
    for tumor, hosts in enumerate(TUMOR_HOST_CHANNELS):
        for host in hosts:
            hosted.setdefault(host, []).append(NUM_ORGANS + tumor)
    return hosted


HOSTED_TUMORS = _hosted_tumors()


def lesion_organs(annotated: np.ndarray) -> List[int]:
    """annotated (45,) bool for one case → the organ channels (0-based) that may get a lesion: annotated, hosting a
    tumour class, none of whose hosted tumour classes the case annotates."""
    return [c for c, tumors in sorted(HOSTED_TUMORS.items()) if annotated[c] and not annotated[tumors].any()]


def lesion_contrast_hu(rng: np.random.Generator) -> float:
    """|CT shift| of one lesion in HU, log-uniform on ``LESION_CONTRAST_HU``: each factor of contrast is equally
    likely, so subtle lesions (20-60 HU) are drawn as often as obvious ones (60-180 HU)."""
    lo, hi = LESION_CONTRAST_HU
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _ball(shape: Sequence[int], centre: Sequence[int], radius_vox: Sequence[float]) -> torch.Tensor:
    """Bool (*shape) ellipsoid of semi-axes ``radius_vox`` (voxels) around ``centre``."""
    axes = [((torch.arange(s, dtype=torch.float32) - c) / r) ** 2 for s, c, r in zip(shape, centre, radius_vox)]
    d = axes[0].reshape(-1, *[1] * (len(shape) - 1))
    for i, a in enumerate(axes[1:], 1):
        d = d + a.reshape(*[1] * i, -1, *[1] * (len(shape) - i - 1))
    return d <= 1.0


def add_synthetic_lesions(data: torch.Tensor, targets: List[torch.Tensor], annotated: np.ndarray,
                          contrast_scale: float, spacing: Sequence[float], rng: np.random.Generator,
                          probability: float = 0.5) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
    """data (B, C, *S) normalised image; targets: per deep-supervision level (B, 45, *S_l) multi-hot, level 0 at
    full resolution; annotated (B, 45) bool; contrast_scale: normalised units per HU (1 / foreground std);
    spacing (mm per patch axis). Returns new data and targets (the inputs are not modified) and the lesion mask
    (B, *S) bool. Per case, with probability ``probability``: in every organ of :func:`lesion_organs` present in
    the patch, a ball of radius in ``LESION_RADIUS_MM`` centred on one of its voxels, clipped to the organ; the
    image shifted there by ± :func:`lesion_contrast_hu` (every channel), the organ's target 0 there at every
    level."""
    data = data.clone()
    targets = [t.clone() for t in targets]
    lesions = torch.zeros((data.shape[0], *data.shape[2:]), dtype=torch.bool)
    full = targets[0]
    for b in range(data.shape[0]):
        if rng.random() >= probability:
            continue
        for organ_c in [c for c in lesion_organs(annotated[b]) if bool(full[b, c].any())]:
            organ = full[b, organ_c].cpu() > 0
            voxels = organ.nonzero()
            centre = voxels[rng.integers(len(voxels))].tolist()
            radius = rng.uniform(*LESION_RADIUS_MM) / np.asarray(spacing, dtype=float)
            lesion = _ball(organ.shape, centre, radius) & organ
            shift = float(rng.choice((-1.0, 1.0)) * lesion_contrast_hu(rng) * contrast_scale)
            data[b][:, lesion.to(data.device)] += shift
            lesions[b] |= lesion
            for t in targets:
                small = lesion if tuple(t.shape[2:]) == tuple(lesion.shape) else \
                    F.interpolate(lesion[None, None].float(), size=tuple(t.shape[2:]), mode="nearest")[0, 0] > 0.5
                t[b, organ_c][small.to(t.device)] = 0
    return data, targets, lesions


def ct_contrast_scale(plans_manager, configuration_manager) -> Optional[float]:
    """Normalised units per HU for a single-channel CT configuration (nnU-Net's CTNormalization divides by the
    foreground std of the plans); None for anything else."""
    schemes = list(configuration_manager.normalization_schemes)
    if schemes != ["CTNormalization"]:
        return None
    std = float(plans_manager.foreground_intensity_properties_per_channel["0"]["std"])
    return 1.0 / max(std, 1e-8)
