#!/usr/bin/env python
"""Accuracy benchmark on the built-in phantom: per-dataset nnU-Net baselines against DSM Stage 1 and Stage 2,
trained with the stock nnUNetv2_* commands. See nnunetv2_dsm/accuracy/ and docs/accuracy.md.

    python scripts/accuracy.py -o accuracy_out                    # default: seed 0, budget 1 (~45 min, 2 CPU cores)
    python scripts/accuracy.py -o accuracy_seed1 --seed 1
    python scripts/accuracy.py -o accuracy_quick --budget 0.25
"""
import sys

from nnunetv2_dsm.accuracy.cli import main

if __name__ == "__main__":
    sys.exit(main())
