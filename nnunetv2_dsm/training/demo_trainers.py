"""Trainer variants of the demo (``nnUNetv2_dsm_demo``): long enough to learn the phantom, short enough for a CPU.

The narrow decoders and no-mirroring settings of :class:`~nnunetv2_dsm.training.trainers.ShortRunMixin`, with more
and longer epochs than the ``_tiny`` test variants, a higher learning rate and no data augmentation (as nnU-Net's
``nnUNetTrainerNoDA``: the phantom's test cases come from the same generator, and in a run of a hundred iterations
augmentation only slows learning down and costs CPU time), so that after a few minutes on two CPU cores the
phantom's organs and seen tumours are visibly segmented. Stage 2 starts from the Stage 1 demo model.
"""
from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_dsm.training.stage2 import nnUNetTrainerDSMStage2
from nnunetv2_dsm.training.trainers import ShortRunMixin, nnUNetTrainerDSMStage1


class DemoMixin(ShortRunMixin):
    """ShortRunMixin without data augmentation: training batches get only nnU-Net's validation transforms."""

    @staticmethod
    def get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):
        return nnUNetTrainer.get_validation_transforms(deep_supervision_scales, is_cascaded, foreground_labels,
                                                       regions, ignore_label)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, _, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        return rotation, dummy_2d, self.configuration_manager.patch_size, None


class nnUNetTrainerDSMStage1_demo(DemoMixin, nnUNetTrainerDSMStage1):
    """Stage 1 of the demo: organ queries on the phantom organ sources."""
    short_epochs, short_iterations, short_val_iterations, short_lr = 10, 10, 1, 3e-3


class nnUNetTrainerDSMStage2_demo(DemoMixin, nnUNetTrainerDSMStage2):
    """Stage 2 of the demo: starts from nnUNetTrainerDSMStage1_demo and adds the tumour queries (16 epochs: with 8
    the liver tumours were not found at all, DSC 0.00 vs 0.47)."""
    stage1_trainer_name = "nnUNetTrainerDSMStage1_demo"
    short_epochs, short_iterations, short_val_iterations, short_lr = 16, 10, 1, 2e-3
