"""Console scripts ``nnUNetv2_dsm_convert`` and ``nnUNetv2_dsm_merge``.

Error contract (:mod:`nnunetv2_dsm.errors`): bad input or a bad path exits 2 with one line naming the file and
the fix (``--debug`` or ``NNUNETV2_DSM_DEBUG=1`` shows the traceback); convert exits 1 when some cases failed (the
documented partial failure: the others are written); Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from nnunetv2_dsm.errors import cli_entry

from .merge import LINK_MODES, merge
from .sources import SOURCES, get_source
from .writer import convert


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``-np 0`` or ``-np -3`` is an error, not silently 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")


@cli_entry("nnUNetv2_dsm_convert")
def convert_main(argv: Optional[List[str]] = None) -> int:
    """``nnUNetv2_dsm_convert SOURCE INPUT_DIR -d ID``: one source dataset -> ``$nnUNet_raw/DatasetID_Name``."""
    p = argparse.ArgumentParser(
        prog="nnUNetv2_dsm_convert",
        description="Convert a public CT dataset, as unpacked from its official distribution, into an nnU-Net raw "
                    "dataset in the DSM 45-class label space (see docs/datasets.md for each SOURCE's layout).")
    p.add_argument("source", metavar="SOURCE", help=f"one of: {', '.join(SOURCES)}")
    p.add_argument("input_dir", metavar="INPUT_DIR", help="the dataset folder as unpacked")
    p.add_argument("-d", "--dataset_id", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    p.add_argument("--name", default=None, help="dataset name (default: the source's, e.g. BTCV)")
    p.add_argument("-o", "--output", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    p.add_argument("-np", "--num_processes", "--num-processes", type=positive_int, default=1,
                   help="cases converted in parallel (default 1)")
    p.add_argument("--unknown_labels", "--unknown-labels", choices=("error", "background"), default="error",
                   help="label values (or mask names) the source map does not know: fail the case (default) or "
                        "write them as background with a warning")
    p.add_argument("--skip_failed", "--skip-failed", action="store_true",
                   help="write dataset.json even if some cases failed (they are left out)")
    p.add_argument("--keep_orientation", "--keep-orientation", action="store_true",
                   help="do not reorient images and labels to LPS (all cases of a merged dataset should share one "
                        "orientation; keep the default unless you know why)")
    p.add_argument("--allow_nonfinite", "--allow-nonfinite", action="store_true",
                   help="convert CTs holding NaN/Inf voxels anyway, writing them as the image's lowest finite value "
                        "(default: such a case fails with the count)")
    p.add_argument("--no_progress", "--no-progress", action="store_true", help="no progress bar")
    add_debug(p)
    a = p.parse_args(argv)
    summary = convert(get_source(a.source), a.input_dir, a.dataset_id, name=a.name, raw_dir=a.output,
                      num_processes=a.num_processes, unknown_labels=a.unknown_labels, skip_failed=a.skip_failed,
                      keep_orientation=a.keep_orientation, progress=not a.no_progress,
                      allow_nonfinite=a.allow_nonfinite)
    print(summary.table())
    return 0 if summary.ok else 1


@cli_entry("nnUNetv2_dsm_merge")
def merge_main(argv: Optional[List[str]] = None) -> int:
    """``nnUNetv2_dsm_merge -d ID -i DATASET ...``: converted datasets -> one dataset with the paper's split."""
    p = argparse.ArgumentParser(
        prog="nnUNetv2_dsm_merge",
        description="Merge datasets written by nnUNetv2_dsm_convert into one nnU-Net raw dataset whose dataset.json "
                    "lists every case's source, annotated classes, stage and subset (paper Table 1: 40% of BTCV, "
                    "LiTS and KiTS train / 60% test; MSD = zero-shot inference set). Files are hard-linked (or "
                    "symlinked) where possible, not copied.")
    p.add_argument("-d", "--dataset_id", "--dataset-id", type=int, required=True, help="id of the merged dataset")
    p.add_argument("-i", "--inputs", nargs="*", default=[],
                   help="converted datasets: ids, DatasetXXX_Name names, or folders")
    p.add_argument("--sources", nargs="*", default=[],
                   help="pick converted datasets in $nnUNet_raw by their SOURCE name (btcv, lits, ...)")
    p.add_argument("--name", default="DSMUniversal", help="merged dataset name (default DSMUniversal)")
    p.add_argument("-o", "--output", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    p.add_argument("--seed", type=int, default=0, help="seed of the 40/60 split (default 0)")
    p.add_argument("--train_fraction", "--train-fraction", type=float, default=0.4,
                   help="share of BTCV/LiTS/KiTS cases used for training (default 0.4, as in the paper)")
    p.add_argument("--link", choices=LINK_MODES, default="auto",
                   help="auto: hard link, else symlink, else copy (default)")
    add_debug(p)
    a = p.parse_args(argv)
    if not a.inputs and not a.sources:
        p.error("give the datasets to merge with -i and/or --sources")
    summary = merge(a.inputs, a.dataset_id, sources=a.sources, name=a.name, raw_dir=a.output, seed=a.seed,
                    train_fraction=a.train_fraction, link=a.link)
    print(summary.table())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(convert_main())
