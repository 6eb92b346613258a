"""``nnUNetv2_dsm_export_model_to_zip``: nnUNetv2_export_model_to_zip's flags and zip, plus what a DSM model needs
for free-text prompts at the receiving site (``dsm_text.json``, cached prompt embeddings). Install the zip with nnU-Net's
``nnUNetv2_install_pretrained_model_from_zip``."""
from __future__ import annotations

import argparse

from nnunetv2_dsm.errors import UserError, cli_entry

PROG = "nnUNetv2_dsm_export_model_to_zip"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Export a trained DSM model as a zip file (nnU-Net's export "
                                "plus dsm_text.json and the prompt embeddings cached for the model and its dataset).")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-o", required=True, help="output zip file")
    p.add_argument("-c", nargs="+", default=["3d_fullres"], help="configurations (default 3d_fullres)")
    p.add_argument("-tr", default="nnUNetTrainerDSMStage2", help="trainer (default nnUNetTrainerDSMStage2)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default 0 1 2 3 4)")
    p.add_argument("-chk", nargs="+", default=["checkpoint_final.pth"], help="checkpoint file names")
    p.add_argument("--exp_cv_preds", action="store_true", help="also export the cross-validation predictions")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


@cli_entry(PROG)
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from nnunetv2_dsm.inference.model_zip import export_model_to_zip
    try:
        added = export_model_to_zip(args.d, args.o, args.c, args.tr, args.p,
                                    [f if f == "all" else int(f) for f in args.f], args.chk, args.exp_cv_preds)
    except (AssertionError, RuntimeError, FileNotFoundError, ValueError) as e:
        raise UserError(f"cannot export {args.d} ({args.tr}, {args.c}): {e}") from None
    print(f"DSM files added to {args.o}: {', '.join(added) if added else 'none (not a Stage 2 model?)'}")


if __name__ == "__main__":
    raise SystemExit(main())
