"""``nnUNetv2_dsm_ext_path``: print the folder to export as ``nnUNet_extTrainer``."""
import argparse

from nnunetv2_dsm.nnunet_ext import EXT_TRAINER_DIR


def main(argv=None) -> None:
    """Print the trainer folder (or, with ``--export``, the shell line that exports it)."""
    parser = argparse.ArgumentParser(
        description="Print the folder holding the DSM trainers for nnU-Net's trainer lookup. Use it as: "
                    "export nnUNet_extTrainer=$(nnUNetv2_dsm_ext_path)")
    parser.add_argument("--export", action="store_true", help="print a shell export line instead of the bare path")
    args = parser.parse_args(argv)
    print(f"export nnUNet_extTrainer={EXT_TRAINER_DIR}" if args.export else EXT_TRAINER_DIR)


if __name__ == "__main__":
    main()
