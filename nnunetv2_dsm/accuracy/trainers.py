"""Trainer variants of the accuracy benchmark (``scripts/accuracy.py``, :mod:`nnunetv2_dsm.accuracy`).

* ``nnUNetTrainerBaselineNoDA`` -- the nnU-Net baseline: nnU-Net's own ``nnUNetTrainerNoDA`` (nnU-Net's network,
  loss and SGD optimiser; no data augmentation; no mirroring, neither in training nor at test time, which
  ``nnUNetTrainerNoDA`` already switches off) with a short-run schedule: 13 epochs of 10 iterations at nnU-Net's
  learning rate 1e-2 unless the schedule variable below says otherwise.
* ``nnUNetTrainerDSMStage1_accuracy`` / ``nnUNetTrainerDSMStage2_accuracy`` -- the demo's DSM trainers
  (``nnUNetTrainerDSMStage1_demo`` / ``_demo``: narrow decoders, no augmentation, no mirroring) whose number of
  iterations the benchmark's ``--budget`` scales; Stage 2 starts from the Stage 1 ``_accuracy`` model.

All three skip nnU-Net's final validation (fold ``all``: it would only re-predict the training cases).

Schedule variable (read when the trainer is built; the trainer writes what it used to its training log)::

    nnUNet_dsm_accuracy_schedule="EPOCHS,ITERATIONS_PER_EPOCH[,LEARNING_RATE]"

e.g. ``"13,10,0.03"``. Unset, each class keeps its defaults (the baseline's above, the demo trainers' own). The
benchmark sets it per run, so one trainer name serves every budget and every learning rate of the sweep (each
sweep run gets its own ``nnUNet_results`` folder). Only these accuracy trainers read it.

Seed variable: ``nnUNet_dsm_accuracy_seed=N`` seeds torch, numpy and ``random`` when the trainer is built (before
nnU-Net initialises the network and the data loaders), so that a benchmark run is repeatable and a change can be
compared with its predecessor without run-to-run noise; the benchmark sets it to its ``--seed``. nnU-Net itself
seeds nothing. A training resumed with ``--c`` is seeded again from the start of the seed's sequence, not from
where it stopped, so it is not identical to an uninterrupted run.
"""
from __future__ import annotations

import os

import torch
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import nnUNetTrainerNoDA

from nnunetv2_dsm.accuracy.schedule import SCHEDULE_ENV, SEED_ENV, parse_schedule, parse_seed, seed_training
from nnunetv2_dsm.training.nnUNetTrainerDSM_demo import nnUNetTrainerDSMStage1_demo, nnUNetTrainerDSMStage2_demo


class ScheduleMixin:
    """Applies ``$nnUNet_dsm_accuracy_schedule`` after the trainer's own ``__init__`` (one validation iteration per
    epoch; a checkpoint every 5 epochs so that an interrupted run resumes with ``--c``), and
    ``$nnUNet_dsm_accuracy_seed`` if set."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.set_default_schedule()
        text = os.environ.get(SCHEDULE_ENV, "").strip()
        self.schedule_source = "class defaults"
        if text:
            self.num_epochs, self.num_iterations_per_epoch, lr = parse_schedule(text)
            self.initial_lr = self.initial_lr if lr is None else lr
            self.schedule_source = f"{SCHEDULE_ENV}={text}"
        self.num_val_iterations_per_epoch = 1
        self.save_every = 5
        seed_text = os.environ.get(SEED_ENV, "").strip()
        self.training_seed = parse_seed(seed_text) if seed_text else None
        if self.training_seed is not None:
            seed_training(self.training_seed)

    def set_default_schedule(self) -> None:
        """Class defaults before the variable is applied (the DSM variants keep their parents' settings)."""

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(f"Accuracy-benchmark schedule ({self.schedule_source}): {self.num_epochs} epochs x "
                               f"{self.num_iterations_per_epoch} iterations, initial lr {self.initial_lr:g}, training seed "
                               f"{'none (unseeded)' if self.training_seed is None else self.training_seed}")

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Skipped: with fold ``all`` nnU-Net's final validation predicts the training cases again, which the
        benchmark does not use (it scores the held-out test cases itself); on a CPU it costs a minute per run."""
        self.print_to_log_file("Final validation skipped (accuracy benchmark: the harness scores the test set)")


class nnUNetTrainerBaselineNoDA(ScheduleMixin, nnUNetTrainerNoDA):
    """The per-dataset nnU-Net baseline: nnUNetTrainerNoDA (no augmentation, no mirroring) on a short schedule."""
    baseline_epochs, baseline_iterations, baseline_lr = 13, 10, 1e-2

    def set_default_schedule(self) -> None:
        self.num_epochs, self.num_iterations_per_epoch = self.baseline_epochs, self.baseline_iterations
        self.initial_lr = self.baseline_lr


class nnUNetTrainerDSMStage1_accuracy(ScheduleMixin, nnUNetTrainerDSMStage1_demo):
    """DSM Stage 1 of the accuracy benchmark: the demo's Stage 1, iterations from the schedule variable."""


class nnUNetTrainerDSMStage2_accuracy(ScheduleMixin, nnUNetTrainerDSMStage2_demo):
    """DSM Stage 2 of the accuracy benchmark: the demo's Stage 2, starting from nnUNetTrainerDSMStage1_accuracy."""
    stage1_trainer_name = "nnUNetTrainerDSMStage1_accuracy"
