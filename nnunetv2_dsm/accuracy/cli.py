"""``python scripts/accuracy.py -o OUT [--seed N] [--budget X]`` (also ``python -m nnunetv2_dsm.accuracy``)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from nnunetv2_dsm.accuracy.baselines import BASELINE_SOURCES, DEFAULT_LRS, DEFAULT_SWEEP_SOURCES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/accuracy.py",
        description="Accuracy benchmark on the built-in phantom: per-dataset nnU-Net baselines (nnUNetTrainerNoDA, "
                    "learning rate by a reported sweep) against DSM Stage 1 and Stage 2, trained with the stock "
                    "nnUNetv2_* commands on the same training cases. Writes OUT/accuracy.json and OUT/accuracy.md; "
                    "re-running with the same -o resumes (finished parts are skipped). See docs/accuracy.md.")
    p.add_argument("-o", "--output", required=True, help="output folder (nnU-Net folders, logs, predictions, report)")
    p.add_argument("--seed", type=int, default=0,
                   help="phantom seed: anatomy, organ sizes, tumor positions (default 0)")
    p.add_argument("--budget", type=float, default=1.0,
                   help="scales every training's iterations (1: DSM Stage 1 50 + Stage 2 80 iterations, each "
                        "nnU-Net baseline 130; 2: the demo's DSM iterations; e.g. 0.25 for a quick run)")
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS),
                   help=f"nnU-Net learning rates of the sweep (default {' '.join(map(str, DEFAULT_LRS))}; one value: "
                        f"no sweep)")
    p.add_argument("--sweep-fraction", type=float, default=0.25,
                   help="length of the sweep runs as a fraction of the baseline's iterations (default 0.25; >= 1: "
                        "full-length sweep runs, the best one is the baseline)")
    p.add_argument("--sweep-sources", nargs="+", default=list(DEFAULT_SWEEP_SOURCES), choices=BASELINE_SOURCES,
                   help="baselines whose learning rate is swept (default: btcv; the others use the first one's "
                        "rate); 'btcv lits kits' sweeps each (three times the sweep's cost)")
    p.add_argument("--clip-weights", default=None, help="CLIP ViT-B/32 weights for the text embeddings (as the demo)")
    p.add_argument("--rerun-dsm", action="store_true",
                   help="retrain and re-score DSM in an existing OUT (after a change to DSM), keeping the data and the "
                        "nnU-Net baselines; copy OUT first to keep the previous accuracy.json")
    p.add_argument("--dsm-only", action="store_true",
                   help="the data and DSM only, no nnU-Net baseline (their columns stay empty): for comparing DSM "
                        "changes; a full run is needed for the baseline comparison")
    p.add_argument("--keep-going", action="store_true", help="after a failed step, still try the later ones")
    p.add_argument("-device", default="cpu", choices=["cpu", "cuda", "mps"], help="default cpu")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    a = parser().parse_args(argv)
    if a.seed < 0 or not a.budget > 0 or not a.sweep_fraction > 0:
        parser().error("--seed must be >= 0, --budget and --sweep-fraction > 0")
    from nnunetv2_dsm.accuracy.runner import AccuracyRun
    run = AccuracyRun(a.output, clip_weights=a.clip_weights, keep_going=a.keep_going, device=a.device,
                      seed=a.seed, budget=a.budget, sweep_fraction=a.sweep_fraction, lrs=tuple(a.lrs),
                      sweep_sources=tuple(a.sweep_sources), dsm_only=a.dsm_only)
    if a.rerun_dsm:
        run.forget_dsm()
    return run.run()


if __name__ == "__main__":
    sys.exit(main())
