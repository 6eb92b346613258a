"""The folder ``nnUNet_extTrainer`` points at (``export nnUNet_extTrainer=$(nnUNetv2_dsm_ext_path)``).

nnU-Net 2.8 imports every module of that folder as a top-level module while looking a trainer up by name, so the
folder holds exactly one module with a name no other package uses: ``nnunetv2_dsm_trainers.py``.
"""
import os

EXT_TRAINER_DIR = os.path.dirname(os.path.abspath(__file__))
