#!/usr/bin/env python
"""DSM against nnU-Net's default network on the same plans: training step, peak memory, sliding-window
prediction, the SSM alone, a profile of the Stage 2 step. See nnunetv2_dsm/benchmark/ and docs/performance.md.

    python scripts/benchmark.py -o bench_out                       # realistic plans, CPU, warm-up 1, 3 reps
    python scripts/benchmark.py --device cuda -o bench_cuda
    python scripts/benchmark.py --tiny --patch 32 32 32 --batch-size 1 --volume 48 48 48 --reps 1 --warmup 0
"""
from nnunetv2_dsm.benchmark import main

if __name__ == "__main__":
    main()
