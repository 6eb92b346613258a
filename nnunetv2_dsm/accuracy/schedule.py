"""The schedule variable of the accuracy trainers (:mod:`nnunetv2_dsm.accuracy.trainers`); light, so the
benchmark's driver does not import the networks."""
from __future__ import annotations

from typing import Optional, Tuple

SCHEDULE_ENV = "nnUNet_dsm_accuracy_schedule"
SEED_ENV = "nnUNet_dsm_accuracy_seed"     # the training seed the benchmark gives its trainers (its --seed)


def parse_schedule(text: str) -> Tuple[int, int, Optional[float]]:
    """``"EPOCHS,ITERATIONS_PER_EPOCH[,LR]"`` -> (epochs, iterations per epoch, lr or None); ValueError if bad."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise ValueError(f"{SCHEDULE_ENV}={text!r}: expected 'EPOCHS,ITERATIONS_PER_EPOCH[,LEARNING_RATE]'")
    epochs, iterations = int(parts[0]), int(parts[1])
    lr = float(parts[2]) if len(parts) == 3 and parts[2] else None
    if epochs < 1 or iterations < 1 or (lr is not None and not lr > 0):
        raise ValueError(f"{SCHEDULE_ENV}={text!r}: epochs and iterations must be >= 1, the learning rate > 0")
    return epochs, iterations, lr


def format_schedule(epochs: int, iterations: int, lr: Optional[float] = None) -> str:
    """The inverse of :func:`parse_schedule`."""
    return f"{epochs},{iterations}" + ("" if lr is None else f",{lr:g}")


def parse_seed(text: str) -> int:
    """``$nnUNet_dsm_accuracy_seed`` -> a seed >= 0 (ValueError if it is not a non-negative integer)."""
    try:
        seed = int(text.strip())
    except ValueError:
        seed = -1
    if seed < 0:
        raise ValueError(f"{SEED_ENV}={text!r}: expected a non-negative integer")
    return seed


def seed_training(seed: int) -> None:
    """Seeds every generator a CPU training draws from: torch (network initialisation), numpy (nnU-Net's data
    loader picks cases and patch positions with the global numpy generator) and Python's ``random``. With
    single-process data loading (``nnUNet_n_proc_DA=0``, as the benchmark runs) the training is then a function of
    the seed and the data."""
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
