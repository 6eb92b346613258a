"""Re-exports the DSM trainers for nnU-Net's ``nnUNet_extTrainer`` lookup (see the folder's __init__)."""
from nnunetv2_dsm.training.trainers import (  # noqa: F401
    nnUNetTrainerDSMStage1,
    nnUNetTrainerDSMStage1_tiny,
    nnUNetTrainerDSMStage2,
    nnUNetTrainerDSMStage2_tiny,
)
