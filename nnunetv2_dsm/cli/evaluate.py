"""``nnUNetv2_dsm_evaluate``: DSC per case and class, voxel-level AUROC / FPR95 per tumor class.

Writes ``summary.json`` (nnU-Net's structure, annotated classes only), ``dsm_summary.json`` (DSC, AUROC,
FPR95, per source) and ``metrics.csv`` (long format) to ``-o`` (default: the prediction folder) and prints a
per-class table. Definitions and edge-case values: docs/evaluation.md. Bad input (a missing, truncated or NaN file,
a geometry mismatch, an unwritable -o) exits 2 with one line naming the file (:mod:`nnunetv2_dsm.errors`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from nnunetv2_dsm.errors import cli_entry, writable_dir

PROG = "nnUNetv2_dsm_evaluate"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``nnUNetv2_dsm_evaluate``."""
    from nnunetv2_dsm.evaluation.evaluate import GEOMETRY_TOL
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate DSM predictions against DSM reference label maps: DSC per case and class; voxel-level "
                    "AUROC and FPR95 (FPR at 95% TPR) per tumor class. See docs/evaluation.md.")
    p.add_argument("-ref", required=True, metavar="DIR",
                   help="reference label maps <case>.nii.gz in the DSM integer encoding (nnunetv2_dsm.labels)")
    p.add_argument("-pred", required=True, metavar="DIR",
                   help="predicted label maps <case>.nii.gz; <case>.npz with 'probabilities' (nnU-Net "
                        "--save_probabilities) is used as per-class scores when present")
    p.add_argument("--anomaly_maps", "--anomaly-maps", metavar="DIR", default=None,
                   help="float <case>.nii.gz anomaly maps (Eq. 14, higher = more anomalous); the default tumor "
                        "scores when given")
    p.add_argument("-dj", "--dataset_json", "--dataset-json", metavar="FILE", default=None,
                   help="dataset.json with 'dsm_manifest': evaluate each case's annotated classes (an annotated "
                        "class absent from the reference is a true empty). Without it: the classes present in "
                        "the reference")
    p.add_argument("--region", choices=("host", "volume"), default="host",
                   help="voxels entering AUROC/FPR95: 'host' = reference host organ(s) of the tumor plus the "
                        "tumor (whole volume if the case annotates no host), 'volume' = all voxels")
    p.add_argument("-o", "--output", metavar="DIR", default=None,
                   help="where summary.json (nnU-Net's structure), dsm_summary.json and metrics.csv go (default: the "
                        "-pred folder)")
    p.add_argument("--classes", nargs="+", metavar="NAME", default=None,
                   help="evaluate only these classes (names as in nnunetv2_dsm.labels.CLASS_NAMES, quote names "
                        "with blanks; the words 'organs' and 'tumors' select a group)")
    p.add_argument("--scores", choices=("auto", "anomaly", "probabilities"), default="auto",
                   help="tumor scores for AUROC/FPR95: auto = anomaly maps if given, else the class probability "
                        "from <case>.npz when present")
    p.add_argument("--dsc_from", "--dsc-from", choices=("labels", "probabilities"), default="labels",
                   help="binary prediction for DSC: the label map, or each class probability > 0.5 from <case>.npz "
                        "(keeps tumors of paired organs inside their organ)")
    p.add_argument("--skip_missing", "--skip-missing", action="store_true",
                   help="skip reference cases lacking a prediction (or anomaly map / npz) instead of failing")
    p.add_argument("--tolerance", type=float, default=GEOMETRY_TOL,
                   help="absolute tolerance on spacing/origin (mm) and direction when matching geometry")
    p.add_argument("-np", "--num_processes", "--num-processes", type=int, default=2, metavar="N",
                   help="worker processes (one case each; a 512x512x300 case needs ~1-2 GB)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the summary table")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    return p


def _input_errors() -> tuple:
    from nnunetv2_dsm.evaluation.evaluate import EvaluationError
    from nnunetv2_dsm.labels import UnknownClassError
    from nnunetv2_dsm.manifest import ManifestError
    return EvaluationError, ManifestError, UnknownClassError


@cli_entry(PROG, user_errors=_input_errors)
def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; ``argv`` defaults to ``sys.argv[1:]``. Returns 0; bad input returns 2 with one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_processes < 1:
        parser.error("-np must be >= 1")
    from nnunetv2_dsm.evaluation.evaluate import evaluate_folder, format_table
    if args.output or Path(args.pred).is_dir():          # fail before the work, not when writing the results
        writable_dir(args.output or args.pred, "-o")
    summary = evaluate_folder(args.ref, args.pred, anomaly_dir=args.anomaly_maps, dataset_json=args.dataset_json,
                              region=args.region, classes=args.classes, scores=args.scores,
                              dsc_from=args.dsc_from, skip_missing=args.skip_missing,
                              num_processes=args.num_processes, output_dir=args.output, tolerance=args.tolerance)
    if not args.quiet:
        out = args.output or args.pred
        print(format_table(summary))
        print(f"\nregion: {summary['region']}; class selection: {summary['class_selection']}")
        for note in summary["notes"]:
            print("note:", note)
        if summary["skipped_cases"]:
            print(f"skipped {len(summary['skipped_cases'])} case(s) lacking files: "
                  f"{', '.join(summary['skipped_cases'])}")
        print(f"wrote {out}/summary.json, {out}/dsm_summary.json and {out}/metrics.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
