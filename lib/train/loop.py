"""The training loop both trainers run: the regressor's (``lib.train.trainer``) and the mapping
network's warm-up and photometric phases (``lib.train.fit_mapping``).

A trainer builds its model, optimiser and data, then hands each phase to ``TrainingLoop.run`` with a
function that computes one step's loss terms. A phase owns a range of the run's step counter and,
optionally, a time budget; its progress p in [0, 1] (steps, or the budget when that is further along:
``lib.train.schedule.progress``) sets the learning rate and ends it. Every step:

    out = step_fn(step)                      the loss terms (and a render to show beside its ground truth)
    lr = base_lr · phase.schedule(p)         for every group of the optimiser
    backward of the terms' sum; the NaN guard clips, then steps or restores the last good state
    after_backward(step, grad_norm)          e.g. a second optimiser (the mapping's basis fine-tuning)
    step += 1; the progress bar; the phase's elapsed seconds (rank 0's clock under DDP)
    TensorBoard on rank 0: <phase>/<term>, <phase>/total, train/lr, train/grad_norm every train.log_every
                 steps, render|gt every train.image_every
    after_step(step, elapsed)                e.g. a point of the val PSNR curve
    a checkpoint every train.checkpoint_every steps and at the phase's end (rank 0 writes, all ranks wait)

Also here: the NaN guard, the in-memory snapshots it restores, and ``start_over`` (train.resume false).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from lib.cli import progress_bar
from lib.errors import ProjectError
from lib.train import distributed
from lib.train.checkpoint import set_aside
from lib.train.schedule import progress

_MAX_NAN_RESTORES = 10  # consecutive non-finite steps before training gives up


class TrainingDiverged(ProjectError, RuntimeError):
    """The NaN guard restored the last good state too often in a row."""


@dataclass
class StepOutput:
    """What one step computed: its loss terms (already weighted; the loss is their sum) and, when the
    step rendered an image, the render and its ground truth [1, H, W, 3] for TensorBoard."""
    terms: dict[str, Tensor]
    render: Tensor | None = None
    gt: Tensor | None = None


@dataclass
class Phase:
    """Steps [first, stop) of a run, or fewer when its time budget (minutes > 0) runs out first.
    schedule: the learning-rate factor as a function of the phase's progress; name: the TensorBoard
    prefix of its loss terms."""
    name: str
    first: int
    stop: int
    minutes: float = 0.0
    schedule: Callable[[float], float] = lambda p: 1.0

    def progress(self, step: int, elapsed: float) -> float:
        return progress(step - self.first, self.stop - self.first, elapsed, self.minutes)


class TrainingLoop:
    """One run's step machinery: the optimiser (each group's ``base_lr`` scaled by the phase's
    schedule), its NaN guard, one progress bar over ``total`` steps from ``step``, a TensorBoard
    writer in ``tensorboard`` (rank 0), and ``save(step, elapsed)`` writing a checkpoint (rank 0)."""

    def __init__(self, cfg, info: distributed.DistInfo, opt: torch.optim.Optimizer, guard: NanGuard,
                 save: Callable[[int, float], None], tensorboard: Path, total: int, step: int, log):
        self.train, self.info, self.opt, self.guard, self.save, self.log = cfg.train, info, opt, guard, save, log
        if any("base_lr" not in group for group in opt.param_groups):
            raise ValueError("every group of the optimiser needs its base_lr (the rate the schedule scales)")
        self.writer = open_tensorboard(tensorboard) if info.is_main else None
        self.bar = progress_bar(total, step, info.is_main)

    def run(self, phase: Phase, step_fn: Callable[[int], StepOutput], step: int, elapsed: float = 0.0,
            after_backward: Callable[[int, Tensor], None] | None = None,
            after_step: Callable[[int, float], None] | None = None) -> tuple[int, float]:
        """Train ``phase`` from ``step``, ``elapsed`` seconds into it. -> (step, elapsed) at its end"""
        if step >= phase.stop:
            return step, elapsed
        t_start = time.perf_counter() - elapsed
        done = phase.progress(step, elapsed)
        while done < 1.0:
            out = step_fn(step)
            loss = sum(out.terms.values())
            factor = phase.schedule(done)
            for group in self.opt.param_groups:
                group["lr"] = group["base_lr"] * factor
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            # Under DDP the gradients are averaged across ranks by now, so every rank sees the same norm
            # and takes the same decision in the guard.
            grad_norm = self.guard.step(step, self.train.grad_clip, self.log)
            if after_backward is not None:
                after_backward(step, grad_norm)
            step += 1  # after a restore too: the same sample would give the same NaN
            self.bar.update(1)
            elapsed = time.perf_counter() - t_start
            if phase.minutes > 0:  # under DDP every rank follows rank 0's clock, so all stop and decay together
                elapsed = distributed.broadcast_float(self.info, elapsed)
            done = phase.progress(step, elapsed)
            self._show(phase, step, out, loss, grad_norm)
            if after_step is not None:
                after_step(step, elapsed)
            if step % self.train.checkpoint_every == 0 or done >= 1.0:
                if self.info.is_main:
                    self.save(step, elapsed)
                distributed.barrier(self.info)
        return step, elapsed

    def _show(self, phase: Phase, step: int, out: StepOutput, loss: Tensor, grad_norm: Tensor) -> None:
        if self.writer is None:
            return
        if step % self.train.log_every == 0:
            for name, value in out.terms.items():
                self.writer.add_scalar(f"{phase.name}/{name}", value.item(), step)
            self.writer.add_scalar(f"{phase.name}/total", loss.item(), step)
            self.writer.add_scalar("train/lr", self.opt.param_groups[0]["lr"], step)
            self.writer.add_scalar("train/grad_norm", float(grad_norm), step)
            self.bar.set_postfix(loss=f"{loss.item():.4f}")
        if out.render is not None and step % self.train.image_every == 0:
            self.writer.add_image("render|gt", torch.cat([out.render[0], out.gt[0]], 1).detach().clamp(0, 1), step,
                                  dataformats="HWC")

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


class NanGuard:
    """The optimiser step behind a NaN guard.

    The gradient norm is clipped; a non-finite one restores the last good state kept in memory
    (snapshotted every ``every`` steps) instead of stepping, and more than ``_MAX_NAN_RESTORES`` such
    steps in a row raise ``TrainingDiverged`` with ``hint`` (what the user can change).
    """

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, every: int, hint: str):
        self.model, self.opt, self.every, self.hint = model, opt, every, hint
        self.good, self.restores = snapshot(model, opt), 0

    def step(self, step: int, grad_clip: float, log) -> Tensor:
        """Clip, then step or restore, for training step ``step`` (counted from 0). -> the gradient norm"""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip or math.inf)
        if torch.isfinite(grad_norm):
            self.restores = 0
            self.opt.step()
        else:
            self.restores += 1
            if self.restores > _MAX_NAN_RESTORES:
                raise TrainingDiverged(f"non-finite gradients at {self.restores} steps in a row (step {step}); "
                                       f"{self.hint}")
            log(f"step {step}: non-finite gradient, restoring the last good state")
            restore(self.model, self.opt, self.good)
        if (step + 1) % self.every == 0:
            self.good = snapshot(self.model, self.opt)
        return grad_norm


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """In-memory copy of a model's and its optimiser's state (what the NaN guard restores)."""
    return {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict())}


def restore(model: torch.nn.Module, opt: torch.optim.Optimizer, good: dict) -> None:
    model.load_state_dict(good["model"])
    opt.load_state_dict(good["optimizer"])


def open_tensorboard(folder):
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only on rank 0

    return SummaryWriter(str(folder))


def start_over(cfg, folder, info, log) -> None:
    """With train.resume false, move the run's checkpoints aside (rank 0; the others wait) so it starts anew."""
    if not cfg.train.resume:
        if info.is_main:
            moved = set_aside(folder)
            if moved is not None:
                log(f"train.resume is false: the previous checkpoints were moved to {moved}")
        distributed.barrier(info)
