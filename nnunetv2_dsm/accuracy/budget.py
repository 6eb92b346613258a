"""Training iterations of the accuracy benchmark as a function of ``--budget``.

At budget 1 DSM trains half as long as the demo (Stage 1 50 iterations, Stage 2 80; budget 2 is the demo's) and
every nnU-Net baseline as many iterations as both stages together. A budget scales each total (at least one
iteration); epochs have 10 iterations
(fewer when the whole run is shorter), so the totals are whole epochs; the baseline's total is exactly the sum of
the two stages' (its epoch length the largest divisor <= 10). The learning-rate sweep runs a fraction of
the baseline's iterations (``sweep_fraction``; >= 1: the sweep runs are full runs and the best one is the baseline).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from nnunetv2_dsm.accuracy.schedule import format_schedule

# budget 1: half the demo's DSM iterations (Stage 1 10 x 10, Stage 2 16 x 10), so that the default run -- DSM, three
# nnU-Net baselines of as many iterations and the sweep -- fits in an hour on 2 CPU cores; budget 2 = the demo's
BASE_ITERATIONS: Dict[str, int] = {"dsm_stage1": 50, "dsm_stage2": 80}
ITERATIONS_PER_EPOCH = 10


@dataclass(frozen=True)
class Schedule:
    """``epochs`` x ``iterations_per_epoch`` training iterations."""
    epochs: int
    iterations_per_epoch: int

    @property
    def iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch

    def env(self, lr: Optional[float] = None) -> str:
        """The value of ``$nnUNet_dsm_accuracy_schedule`` for this schedule (and learning rate)."""
        return format_schedule(self.epochs, self.iterations_per_epoch, lr)


def schedule_for(iterations: float) -> Schedule:
    """The whole-epoch schedule closest to ``iterations`` (>= 1 iteration; 10 per epoch when there are 10)."""
    total = max(1, int(iterations + 0.5))
    per_epoch = min(ITERATIONS_PER_EPOCH, total)
    return Schedule(max(1, int(total / per_epoch + 0.5)), per_epoch)


def exact_schedule(total: int) -> Schedule:
    """Exactly ``total`` iterations: the largest epoch length <= 10 that divides it."""
    per_epoch = max(d for d in range(1, min(ITERATIONS_PER_EPOCH, total) + 1) if total % d == 0)
    return Schedule(total // per_epoch, per_epoch)


@dataclass(frozen=True)
class Budget:
    """Schedules of every training of one benchmark run."""
    budget: float
    sweep_fraction: float = 0.25

    def __post_init__(self):
        if not self.budget > 0 or not self.sweep_fraction > 0:
            raise ValueError(f"budget and sweep fraction must be > 0, got {self.budget}, {self.sweep_fraction}")

    @property
    def stage1(self) -> Schedule:
        return schedule_for(BASE_ITERATIONS["dsm_stage1"] * self.budget)

    @property
    def stage2(self) -> Schedule:
        return schedule_for(BASE_ITERATIONS["dsm_stage2"] * self.budget)

    @property
    def nnunet(self) -> Schedule:
        """As many iterations as Stage 1 + Stage 2 together."""
        return exact_schedule(self.stage1.iterations + self.stage2.iterations)

    @property
    def sweep(self) -> Schedule:
        """The sweep runs: the full baseline schedule when ``sweep_fraction`` >= 1."""
        return self.nnunet if self.sweep_fraction >= 1 else schedule_for(self.nnunet.iterations * self.sweep_fraction)

    def iterations(self) -> Dict[str, int]:
        """``{"nnunet": I, "dsm_stage1": I1, "dsm_stage2": I2}`` as accuracy.json reports it."""
        return {"nnunet": self.nnunet.iterations, "dsm_stage1": self.stage1.iterations,
                "dsm_stage2": self.stage2.iterations}
