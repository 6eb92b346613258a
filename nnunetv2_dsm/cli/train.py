"""``nnUNetv2_dsm_train``: nnU-Net's own ``nnUNetv2_train`` with ``nnUNet_extTrainer`` set to the DSM trainers.

Every flag is nnU-Net's. An ``nnUNet_extTrainer`` the user already exported is kept; the DSM folder is appended.
"""
import os


def ensure_ext_trainer_env() -> None:
    from nnunetv2_dsm.nnunet_ext import EXT_TRAINER_DIR
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if EXT_TRAINER_DIR not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(current + [EXT_TRAINER_DIR])


def main() -> None:
    ensure_ext_trainer_env()
    from nnunetv2.run.run_training import run_training_entry
    run_training_entry()


if __name__ == "__main__":
    main()
