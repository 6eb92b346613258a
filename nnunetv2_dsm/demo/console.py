"""What the demo's console shows while a step runs: one line per training epoch, elapsed times."""
from __future__ import annotations

import re
from typing import Callable, Optional


class EpochPrinter:
    """Turns nnU-Net's training log lines into one console line per epoch."""

    def __init__(self, echo: Callable[[str], None], epochs: Optional[int]):
        self.echo, self.epochs, self.cur, self.seen = echo, epochs, {}, set()

    def __call__(self, line: str) -> None:
        text = re.sub(r"^\d{4}-\d\d-\d\d [\d:.]+: ", "", line.strip())
        if m := re.match(r"Epoch (\d+)$", text):
            self.cur = {"epoch": int(m.group(1))}
        elif m := re.match(r"(train_loss|val_loss) (\S+)", text):
            self.cur[m.group(1)] = m.group(2)
        elif text.startswith("Pseudo dice"):
            vals = [float(v) for v in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text)]
            self.cur["dice"] = f"{sum(vals) / len(vals):.3f}" if vals else "-"
        elif m := re.match(r"Epoch time: (\S+) s", text):
            c, total = self.cur, f"/{self.epochs}" if self.epochs else ""
            self.echo(f"    epoch {c.get('epoch', '?') + 1 if 'epoch' in c else '?'}{total}  train_loss "
                      f"{c.get('train_loss', '-')}  val_loss {c.get('val_loss', '-')}  pseudo Dice (mean over "
                      f"annotated classes) {c.get('dice', '-')}  {m.group(1)} s")
        elif text.startswith(("Stage 1 → Stage 2", "DSM Stage")) and text not in self.seen:
            self.seen.add(text)
            self.echo(f"    {text}")
        elif text.startswith("Validation complete"):
            self.echo("    final validation on the training cases done (nnU-Net's own)")


def trainer_epochs(trainer: str) -> Optional[int]:
    """Epochs of a DSM short-run trainer (None if unknown)."""
    from nnunetv2_dsm.nnunet_ext import nnunetv2_dsm_trainers as registered   # lazy: pulls nnU-Net's trainers in
    return getattr(getattr(registered, trainer, None), "short_epochs", None)


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
