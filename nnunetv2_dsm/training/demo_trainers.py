"""Trainer variants of the demo (``nnUNetv2_dsm_demo``): long enough to learn the phantom, short enough for a CPU.

The narrow decoders and no-mirroring settings of :class:`~nnunetv2_dsm.training.trainers.ShortRunMixin`, with more
and longer epochs than the ``_tiny`` test variants and a higher learning rate, so that after a few minutes on two
CPU cores the phantom's organs and seen tumours are visibly segmented. Stage 2 starts from the Stage 1 demo model.
"""
from __future__ import annotations

from nnunetv2_dsm.training.stage2 import nnUNetTrainerDSMStage2
from nnunetv2_dsm.training.trainers import ShortRunMixin, nnUNetTrainerDSMStage1


class nnUNetTrainerDSMStage1_demo(ShortRunMixin, nnUNetTrainerDSMStage1):
    """Stage 1 of the demo: organ queries on the phantom organ sources."""
    short_epochs, short_iterations, short_val_iterations, short_lr = 8, 10, 1, 3e-3


class nnUNetTrainerDSMStage2_demo(ShortRunMixin, nnUNetTrainerDSMStage2):
    """Stage 2 of the demo: starts from nnUNetTrainerDSMStage1_demo and adds the tumour queries."""
    stage1_trainer_name = "nnUNetTrainerDSMStage1_demo"
    short_epochs, short_iterations, short_val_iterations, short_lr = 12, 15, 2, 2e-3
