"""Re-exports the DSM trainers for nnU-Net's ``nnUNet_extTrainer`` lookup (see the folder's __init__)."""
from nnunetv2_dsm.training.baseline_trainers import nnUNetTrainerBaselineNoDA, nnUNetTrainerDSMStage1_accuracy, nnUNetTrainerDSMStage2_accuracy  # noqa: F401,E501
from nnunetv2_dsm.training.demo_trainers import nnUNetTrainerDSMStage1_demo, nnUNetTrainerDSMStage2_demo  # noqa: F401
from nnunetv2_dsm.training.stage2 import nnUNetTrainerDSMStage2, nnUNetTrainerDSMStage2_tiny  # noqa: F401
from nnunetv2_dsm.training.trainers import nnUNetTrainerDSMStage1, nnUNetTrainerDSMStage1_tiny  # noqa: F401
