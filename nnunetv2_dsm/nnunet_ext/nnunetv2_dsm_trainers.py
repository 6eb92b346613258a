"""Re-exports the DSM trainers for nnU-Net's ``nnUNet_extTrainer`` lookup (see the folder's __init__)."""
from nnunetv2_dsm.accuracy.trainers import (  # noqa: F401
    nnUNetTrainerBaselineNoDA, nnUNetTrainerDSMStage1_accuracy, nnUNetTrainerDSMStage2_accuracy)
from nnunetv2_dsm.training.nnUNetTrainerDSMStage1 import nnUNetTrainerDSMStage1  # noqa: F401
from nnunetv2_dsm.training.nnUNetTrainerDSMStage2 import nnUNetTrainerDSMStage2  # noqa: F401
from nnunetv2_dsm.training.nnUNetTrainerDSM_demo import nnUNetTrainerDSMStage1_demo, nnUNetTrainerDSMStage2_demo  # noqa: F401
from nnunetv2_dsm.training.nnUNetTrainerDSM_tiny import nnUNetTrainerDSMStage1_tiny, nnUNetTrainerDSMStage2_tiny  # noqa: F401
