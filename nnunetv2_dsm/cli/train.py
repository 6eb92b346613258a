"""``nnUNetv2_dsm_train``: nnU-Net's own ``nnUNetv2_train`` with ``nnUNet_extTrainer`` set to the DSM trainers.

Every flag is nnU-Net's, plus ``--debug`` (show the traceback of an error). An ``nnUNet_extTrainer`` the user already
exported is kept; the DSM folder is appended. The DSM error contract (:mod:`nnunetv2_dsm.errors`) applies to
what DSM adds: a missing, truncated or unsafe Stage 1 checkpoint and missing CLIP prompt embeddings exit 2 with one
line naming the file and the command that creates it; Ctrl-C exits 130.
"""
import os
import sys

from nnunetv2_dsm.errors import cli_entry
from nnunetv2_dsm.nnunet_ext import EXT_TRAINER_DIR


def ensure_ext_trainer_env() -> None:
    """Append the DSM trainer folder to ``nnUNet_extTrainer`` (a folder the user exported is kept)."""
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if EXT_TRAINER_DIR not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(current + [EXT_TRAINER_DIR])


def _dsm_errors() -> tuple:
    """The DSM exceptions that are bad input (imported lazily: they pull torch in)."""
    from nnunetv2_dsm.text import TextEmbeddingError
    from nnunetv2_dsm.training.nnUNetTrainerDSMStage2 import Stage1CheckpointError
    return Stage1CheckpointError, TextEmbeddingError


def main(argv=None) -> int:
    """Run nnU-Net's training entry point (it reads ``sys.argv``; ``argv`` replaces ``sys.argv[1:]`` if given)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    sys.argv = [sys.argv[0]] + [a for a in args if a != "--debug"]

    @cli_entry("nnUNetv2_dsm_train", user_errors=_dsm_errors)
    def run(_argv=None) -> int:
        ensure_ext_trainer_env()
        from nnunetv2.run.run_training import run_training_entry  # lazy: torch and nnU-Net, only when training
        run_training_entry()
        return 0
    return run(["--debug"] if debug else [])


if __name__ == "__main__":
    sys.exit(main())
