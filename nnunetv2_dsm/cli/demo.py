"""``nnUNetv2_dsm_demo``: the whole DSM pipeline on the built-in phantom, no data or arguments needed.

    nnUNetv2_dsm_demo                       # -> ./dsm_demo_output/report.md
    nnUNetv2_dsm_demo --quick               # smoke run with the _tiny trainers
    nnUNetv2_dsm_demo --clip-weights ~/open_clip_pytorch_model.bin

See docs/demo.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from nnunetv2_dsm.errors import UserError, cli_entry, writable_dir


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``nnUNetv2_dsm_demo``."""
    p = argparse.ArgumentParser(
        prog="nnUNetv2_dsm_demo",
        description="Run the whole DSM pipeline on a built-in synthetic CT phantom: phantom source datasets in their "
                    "distributed layouts -> nnUNetv2_dsm_convert -> nnUNetv2_dsm_merge -> "
                    "nnUNetv2_plan_and_preprocess -> nnUNetv2_dsm_embed_prompts -> nnUNetv2_train Stage 1 -> Stage 2 "
                    "-> nnUNetv2_dsm_predict (a tumor type held out of training asked for by text prompt) -> "
                    "nnUNetv2_dsm_evaluate -> report.md with metrics and PNG overlays. Minutes on a 2-core CPU. "
                    "Re-running with the same --output resumes and skips finished steps.")
    p.add_argument("-o", "--output", default="dsm_demo_output",
                   help="folder for everything the demo writes (nnU-Net folders, logs, predictions, report); "
                        "default: %(default)s")
    p.add_argument("--clip_weights", "--clip-weights", default=None, metavar="PATH",
                   help="OpenAI CLIP ViT-B/32 open_clip weights file. Default: $nnUNet_dsm_clip_weights, else the "
                        "Hugging Face cache, else an untrained random text tower (with a warning)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: fewer cases and the _tiny trainers (2 epochs of 3 iterations); metrics are "
                        "meaningless")
    p.add_argument("--keep_going", "--keep-going", action="store_true",
                   help="after a failed step, still try the later ones (the report is written either way)")
    p.add_argument("-device", "--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="device for training and prediction; auto: cuda if available, else cpu (default)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    return p


@cli_entry("nnUNetv2_dsm_demo")
def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit status (0 all steps done, 1 a step failed, 2 bad arguments or an unusable
    --output, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    writable_dir(args.output, "--output")
    device = args.device
    if device == "auto":
        import torch  # lazy: --help and argument errors answer without loading torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from nnunetv2_dsm.demo.pipeline import Demo  # lazy: pulls nnU-Net and torch in
    try:
        demo = Demo(args.output, clip_weights=args.clip_weights, quick=args.quick, keep_going=args.keep_going,
                    device=device)
        return demo.run()
    except FileNotFoundError as e:
        raise UserError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
