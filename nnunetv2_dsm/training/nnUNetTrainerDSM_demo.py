"""DSM variants of the demo (``nnUNetv2_dsm_demo``) and the accuracy benchmark: long enough to learn the phantom,
short enough for a CPU.

Narrow decoders and a short schedule (``nnUNetTrainerDSM_tiny``'s mixins, with more and longer epochs and a higher
learning rate) composed with nnU-Net's own ``nnUNetTrainerNoDA`` (no data augmentation, no mirroring: the phantom's
test cases come from the same generator, and in a run of a hundred iterations augmentation only slows learning
down and costs CPU time). Stage 2 starts from the Stage 1 demo model.
"""
from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import nnUNetTrainerNoDA

from nnunetv2_dsm.training.nnUNetTrainerDSMStage1 import nnUNetTrainerDSMStage1
from nnunetv2_dsm.training.nnUNetTrainerDSMStage2 import nnUNetTrainerDSMStage2
from nnunetv2_dsm.training.nnUNetTrainerDSM_tiny import ShortScheduleMixin, TinyDecoderMixin


class nnUNetTrainerDSMStage1_demo(ShortScheduleMixin, TinyDecoderMixin, nnUNetTrainerNoDA, nnUNetTrainerDSMStage1):
    """Stage 1 of the demo: organ queries on the phantom organ sources."""
    short_epochs, short_iterations, short_val_iterations, short_lr = 10, 10, 1, 3e-3


class nnUNetTrainerDSMStage2_demo(ShortScheduleMixin, TinyDecoderMixin, nnUNetTrainerNoDA, nnUNetTrainerDSMStage2):
    """Stage 2 of the demo: starts from nnUNetTrainerDSMStage1_demo and adds the tumor queries (16 epochs: with 8
    the liver tumors were not found at all, DSC 0.00 vs 0.47)."""
    stage1_trainer_name = "nnUNetTrainerDSMStage1_demo"
    short_epochs, short_iterations, short_val_iterations, short_lr = 16, 10, 1, 2e-3
