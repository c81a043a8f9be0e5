"""A learning-rate schedule for runs bounded by wall time rather than by steps."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch.optim.lr_scheduler import LRScheduler


class WallTimeCosineSchedule(LRScheduler):
    """Linear warm-up over ``warmup_steps`` steps, then cosine decay to 0 over the fraction of ``seconds`` spent.

    MONAI's ``WarmupCosineSchedule`` decays over a number of steps. A baseline given the same wall time as the model it
    is compared with does not know its number of steps in advance, and a step-based cosine over an arbitrary large
    ``t_total`` would leave it at a constant learning rate: the comparison would then favour the model that had a
    decayed schedule. Here the cosine's progress is ``elapsed / seconds``, so the learning rate reaches 0 when the
    wall-time limit stops the run.

    The clock starts at the first training step (not when the config builds the scheduler, which may be before a
    dataset is cached). The elapsed time is saved in ``state_dict``: a resumed run continues the decay where it stopped.

    Args:
        optimizer: the optimizer whose learning rates (the ones it was built with) are scaled.
        warmup_steps: steps of linear warm-up from 0.
        seconds: the wall time of the run (the ``WallTimeLimit`` it runs under), > 0.
        clock: seconds since an arbitrary origin (``time.time``; a fake one in tests).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, seconds: float,
                 clock: Callable[[], float] = time.time) -> None:
        if not seconds or seconds <= 0:
            raise ValueError(f"WallTimeCosineSchedule: seconds must be > 0, got {seconds!r}")
        self.warmup_steps, self.seconds, self.clock = int(warmup_steps), float(seconds), clock
        self.elapsed_before = 0.0  # seconds of earlier runs (resume)
        self.started: float | None = None
        super().__init__(optimizer)

    def elapsed(self) -> float:
        return self.elapsed_before + (0.0 if self.started is None else self.clock() - self.started)

    def factor(self) -> float:
        """The multiplier of the base learning rates at the current step and time."""
        step = self.last_epoch
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        progress = min(1.0, self.elapsed() / self.seconds)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        if self.last_epoch >= 1 and self.started is None:
            self.started = self.clock()
        return [base * self.factor() for base in self.base_lrs]

    def state_dict(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "clock", "started")}
        state["elapsed_before"] = self.elapsed()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update(state_dict)
        self.started = None


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                           max_wall_time: float | None = None) -> LRScheduler:
    """Warm-up then cosine decay to 0: over ``total_steps`` steps (MONAI's ``WarmupCosineSchedule``), or, when
    ``max_wall_time`` (seconds) is set and > 0, over that wall time (:class:`WallTimeCosineSchedule`)."""
    if max_wall_time:
        return WallTimeCosineSchedule(optimizer, warmup_steps, max_wall_time)
    from monai.optimizers import WarmupCosineSchedule

    return WarmupCosineSchedule(optimizer, warmup_steps=warmup_steps, t_total=total_steps, warmup_multiplier=0.0)
