"""The frozen Stage 1 model that Stage 2 learns not to forget (``loss.stage1_distillation``).

Stage 2 trains organ channels only on the cases that annotate them; on the others the frozen Stage 1 network's
organ probabilities are the soft target, at every output the loss supervises (final masks, each kMMM layer).
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import autocast

from nnunetv2_dsm.labels import NUM_ORGANS
from nnunetv2_dsm.network.dsm import DSMNetwork


class Stage1Teacher:
    """Holds the Stage 1 network in eval mode without gradients; ``organ_probabilities(data)`` gives one
    (B, 25, *S_l) probability map per prediction of ``DSMOutput.predictions()`` (final, then layers fine → coarse),
    and ``trained`` (25,) bool which organs Stage 1's training cases annotated."""

    def __init__(self, network: DSMNetwork, state: Dict[str, torch.Tensor], device: torch.device):
        if network.stage != 1:
            raise ValueError("the teacher is a Stage 1 network")
        network.load_state_dict(state)          # strict: the Stage 1 checkpoint and the Stage 1 network must match
        self.network = network.to(device).eval().requires_grad_(False)
        self.trained = self.network.trained_classes[:NUM_ORGANS].clone()
        self.device = device

    @torch.no_grad()
    def organ_probabilities(self, data: torch.Tensor) -> List[torch.Tensor]:
        with autocast(self.device.type, enabled=self.device.type == "cuda"):
            output = self.network(data.to(self.device, non_blocking=True))
        return [torch.sigmoid(p[:, :NUM_ORGANS].float()) for p in output.predictions()]
