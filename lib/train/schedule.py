"""Learning-rate schedules as pure functions of the run's progress p in [0, 1]: lr = base_lr · factor(p).

    multistep    METHOD.md's MultiStepLR: × gamma at each milestone (fractions of the run)
    exponential  smooth decay to ``final`` × at the end: final ** p
    constant     1

Progress is step / iterations, or, with a time limit, whichever of that and elapsed / limit is
further along (``progress``), so a run cut short by its time budget still ends decayed. Being
functions of the progress only, they resume exactly from a checkpoint.
"""
from __future__ import annotations

import bisect
from typing import Callable


def progress(step: int, total: int, elapsed_s: float, limit_minutes: float) -> float:
    """Fraction of the run done: steps, or the time budget when one is set and it is further along."""
    p = step / max(total, 1)
    if limit_minutes > 0:
        p = max(p, elapsed_s / (60.0 * limit_minutes))
    return min(p, 1.0)


def lr_factor(p: float, kind: str, milestones: list[float], gamma: float, final: float) -> float:
    if kind == "multistep":
        return gamma ** bisect.bisect_right(milestones, p)
    if kind == "exponential":
        return final ** min(max(p, 0.0), 1.0)
    if kind == "constant":
        return 1.0
    raise ValueError(f"unknown learning-rate schedule '{kind}' (train.lr_schedule): multistep, exponential or constant")


def configured_schedule(train) -> Callable[[float], float]:
    """The config's schedule (train.lr_schedule with its milestones, gamma and final factor) as a function
    of progress."""
    return lambda p: lr_factor(p, train.lr_schedule, train.lr_milestones, train.lr_gamma, train.lr_final)
