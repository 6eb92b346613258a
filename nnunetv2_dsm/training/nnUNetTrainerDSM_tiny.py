"""Short DSM variants for tests (``_tiny``): narrow decoders, 2 epochs of 3 iterations, no mirroring.

Composed from the DSM trainers and nnU-Net's own ``nnUNetTrainerNoMirroring`` by inheritance; each mixin changes
one thing its name says.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import \
    nnUNetTrainerNoMirroring

from nnunetv2_dsm.network.dsm import TINY_ARCHITECTURE
from nnunetv2_dsm.training.nnUNetTrainerDSMStage1 import nnUNetTrainerDSMStage1
from nnunetv2_dsm.training.nnUNetTrainerDSMStage2 import nnUNetTrainerDSMStage2


class TinyDecoderMixin:
    """The narrow DSM decoders (``TINY_ARCHITECTURE``: query width 64, 4 heads) instead of the paper's."""
    dsm_architecture = TINY_ARCHITECTURE


class ShortScheduleMixin:
    """``short_epochs`` epochs of ``short_iterations`` iterations (``short_val_iterations`` validation iterations)
    at the initial learning rate ``short_lr``."""
    short_epochs, short_iterations, short_val_iterations, short_lr = 2, 3, 1, 1e-3

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch = self.short_epochs, self.short_iterations
        self.num_val_iterations_per_epoch, self.initial_lr = self.short_val_iterations, self.short_lr


class nnUNetTrainerDSMStage1_tiny(ShortScheduleMixin, TinyDecoderMixin, nnUNetTrainerNoMirroring,
                                  nnUNetTrainerDSMStage1):
    """Stage 1 for tests: narrow decoders, 2 epochs of 3 iterations, no mirroring (8× faster validation)."""


class nnUNetTrainerDSMStage2_tiny(ShortScheduleMixin, TinyDecoderMixin, nnUNetTrainerNoMirroring,
                                  nnUNetTrainerDSMStage2):
    """Stage 2 for tests: starts from nnUNetTrainerDSMStage1_tiny."""
    stage1_trainer_name = "nnUNetTrainerDSMStage1_tiny"
