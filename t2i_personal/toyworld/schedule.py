"""The learning-rate clock shared by the toy-world trainers, and the command that repeats a budgeted run."""

from __future__ import annotations

import json
import math
import shlex
import time


class TrainingClock:
    """A run ends at ``steps`` or when ``time_budget_s`` has passed, whichever comes first.

    The learning rate warms up linearly, then follows a cosine from 1 down to ``floor`` over the *progress*: the
    larger of the step fraction and the time fraction, so a run cut short by its budget still ends on a small
    learning rate. The steps actually run are what a trainer records; repeating a run with that step count and
    no budget gives the same number of updates on a step-driven (rather than time-driven) schedule.
    """

    def __init__(self, steps: int, time_budget_s: float | None, warmup: int, floor: float = 0.05):
        self.steps, self.time_budget_s, self.warmup, self.floor = steps, time_budget_s, max(1, warmup), floor
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def running(self, step: int) -> bool:
        return step < self.steps and (self.time_budget_s is None or self.elapsed() < self.time_budget_s)

    def progress(self, step: int) -> float:
        by_time = self.elapsed() / self.time_budget_s if self.time_budget_s else 0.0
        return min(1.0, max(step / max(1, self.steps), by_time))

    def lr_factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup)
        return warm * (self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * self.progress(step))))


def reproduce_command(stage: str, settings: dict, fixed: dict) -> str:
    """``python -m t2i_personal.toyworld.pretrain <stage> ...`` with every recorded setting, ``fixed`` (the steps
    actually run, the time budgets set to null) on top: the command that repeats the run exactly."""
    fixed = {**settings, **fixed}
    device, seed = fixed.pop("device"), fixed.pop("seed")
    fixed.pop("workers", None)  # rendering is identical for any worker count
    sets = " ".join("--set " + shlex.quote(f"{k}={v if isinstance(v, str) else json.dumps(v)}") for k, v in fixed.items())
    return f"python -m t2i_personal.toyworld.pretrain {stage} --device {device.split(':')[0]} --seed {seed} {sets}"
