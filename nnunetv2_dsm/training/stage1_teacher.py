"""The frozen Stage 1 model that Stage 2 learns not to forget (``loss.stage1_distillation``).

Stage 2 trains organ channels only on the cases that annotate them; on the others the frozen Stage 1 network's
organ probabilities are the soft target, at every output the loss supervises (final masks, each kMMM layer),
weighted per organ by how well Stage 1 segments that organ where labels can tell (:meth:`Stage1Teacher.trust`).
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import autocast

from nnunetv2_dsm.labels import NUM_ORGANS
from nnunetv2_dsm.network.dsm import DSMNetwork
from nnunetv2_dsm.training.distributed import global_sum


class Stage1Teacher:
    """Holds the Stage 1 network in eval mode without gradients; ``organ_probabilities(data)`` gives one
    (B, 25, *S_l) probability map per prediction of ``DSMOutput.predictions()`` (final, then layers fine → coarse),
    and ``trained`` (25,) bool which organs Stage 1's training cases annotated. ``observe`` and ``trust``: the
    teacher's soft Dice per organ on the Stage 2 cases that annotate it, accumulated over training."""

    def __init__(self, network: DSMNetwork, state: Dict[str, torch.Tensor], device: torch.device):
        if network.stage != 1:
            raise ValueError("the teacher is a Stage 1 network")
        network.load_state_dict(state)          # strict: the Stage 1 checkpoint and the Stage 1 network must match
        self.network = network.to(device).eval().requires_grad_(False)
        self.trained = self.network.trained_classes[:NUM_ORGANS].clone()
        self.device = device
        self.evidence = torch.zeros(3, NUM_ORGANS, dtype=torch.float64)   # Σ p·y, Σ p, Σ y over annotated cases

    @torch.no_grad()
    def observe(self, probabilities: torch.Tensor, tissue: torch.Tensor, annotated: torch.Tensor) -> None:
        """Adds one batch's evidence: probabilities (B, 25, *S) the teacher's final ones; tissue (B, C ≥ 25, *S) the
        organ-tissue target (``loss.organ_targets_without_tumors``) at the same resolution; annotated (B, C') bool.
        Only (case, organ) pairs the case annotates count. Summed over the ranks under DDP (one trust for all)."""
        weight = annotated[:, :NUM_ORGANS].to(probabilities.device, torch.float32)
        weight = weight.reshape(*weight.shape, *[1] * (probabilities.ndim - 2))
        p, y = probabilities.float() * weight, tissue[:, :NUM_ORGANS].to(probabilities.device).float() * weight
        dims = [0, *range(2, p.ndim)]
        batch = torch.stack(((p * y).sum(dims), p.sum(dims), y.sum(dims))).double()
        self.evidence += global_sum(batch).cpu()

    @property
    def trust(self) -> torch.Tensor:
        """(25,) float in [0, 1]: 2 Σp·y / (Σp + Σy), Stage 1's soft Dice on the cases that annotate the organ so far;
        0 for an organ without evidence yet and for one Stage 1 was not trained on (nothing to keep)."""
        inter, p, y = self.evidence
        dice = torch.where(p + y > 0, 2 * inter / (p + y).clamp(min=1e-12), torch.zeros_like(p))
        return dice.float() * self.trained.cpu().float()

    @torch.no_grad()
    def organ_probabilities(self, data: torch.Tensor) -> List[torch.Tensor]:
        with autocast(self.device.type, enabled=self.device.type == "cuda"):
            output = self.network(data.to(self.device, non_blocking=True))
        return [torch.sigmoid(p[:, :NUM_ORGANS].float()) for p in output.predictions()]
