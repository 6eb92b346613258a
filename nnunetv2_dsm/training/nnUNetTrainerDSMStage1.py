"""DSM Stage 1 (paper §4.1): organ queries and the kMMM decoder, trained on the organ datasets.

    nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerDSMStage1
"""
from __future__ import annotations

from nnunetv2_dsm.training.nnUNetTrainerDSMBase import nnUNetTrainerDSMBase


class nnUNetTrainerDSMStage1(nnUNetTrainerDSMBase):
    """DSM Stage 1: organ queries and the kMMM decoder, trained on the organ datasets."""
    dsm_stage = 1
