"""``python -m nnunetv2_dsm.benchmark``: the same command line as ``scripts/benchmark.py``; the memory section's
subprocesses run ``--memory-worker NETWORK SETUP_JSON`` through it."""
from .cli import main

if __name__ == "__main__":
    main()
