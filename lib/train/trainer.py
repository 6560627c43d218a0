"""Training of the Gaussian texture regressor (stage 2): the whole loop, top to bottom.

One step: a random training image (camera and timestep), a random background colour, the avatar's
Gaussians for that timestep rendered into that camera, L1 (mouth-weighted) + SSIM (+ VGG) against
the ground truth composited on the same background, the regularisers, Adam with gradient clipping
and a step-wise learning-rate schedule. Checkpoints every ``train.checkpoint_every`` steps are
atomic and a rerun resumes from the newest. A non-finite gradient restores the last good state
kept in memory. Rank 0 logs TensorBoard scalars, progress images and the val PSNR-versus-minutes
curve; under torchrun all ranks train (DDP averages the gradients).
"""
from __future__ import annotations

import copy
import csv
import math
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from lib.cli import progress_bar
from lib.config import save_config
from lib.dataset.vhap import VhapExport
from lib.errors import ProjectError
from lib.eval.curve import curve_frames, plot_curve
from lib.eval.render import render_gaussians, score_frames
from lib.flame.model import FlameModel
from lib.gaussians.render import warm_up
from lib.lock import locks_run_folder
from lib.models.avatar import GaussianAvatar, build_avatar
from lib.models.vgg import VggFeatures, VggPerceptual, VggUnavailable
from lib.paths import ActorPaths, resolve
from lib.train import distributed
from lib.train.checkpoint import (
    check_resume, latest_checkpoint, load_checkpoint, load_into, save_checkpoint, set_aside, shaping_config,
)
from lib.train.data import ActorData, TrainingImages
from lib.train.losses import mouth_weight, photometric, regularisers
from lib.train.schedule import lr_factor, progress

_MAX_NAN_RESTORES = 10  # consecutive non-finite steps before training gives up


class TrainingDiverged(ProjectError, RuntimeError):
    """The NaN guard restored the last good state too often in a row."""


def make_optimizer(avatar: GaussianAvatar, cfg) -> torch.optim.Adam:
    """Adam with two groups: the networks (train.lr) and the learned UV feature maps (train.lr_features)."""
    features = [p for n, p in avatar.named_parameters() if n.endswith("features")]
    ids = {id(p) for p in features}
    nets = [p for p in avatar.parameters() if id(p) not in ids]
    opt = torch.optim.Adam([{"params": nets, "lr": cfg.train.lr}, {"params": features, "lr": cfg.train.lr_features}])
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]
    return opt


def perceptual_loss(cfg, weight: float, log) -> VggPerceptual | None:
    """The VGG19 perceptual loss when loss.vgg_weights is set and its weight is positive, else None
    (said in the log)."""
    if not cfg.loss.vgg_weights or weight <= 0:
        log("VGG perceptual loss off: loss.vgg_weights is not set (a torchvision VGG19 state_dict; nothing "
            "is downloaded at run time)")
        return None
    try:
        return VggPerceptual(VggFeatures.from_file(resolve(cfg.loss.vgg_weights), 19))
    except VggUnavailable as e:
        log(f"VGG perceptual loss off: {e}")
        return None


@locks_run_folder(lambda cfg: ActorPaths(cfg).regressor, "the regressor run folder")
def train(cfg, log=print) -> GaussianAvatar:
    """Train (or resume) the regressor of ``cfg``; returns the trained avatar (also checkpointed)."""
    info = distributed.setup(cfg.train.device, cfg.train.threads)
    log = log if info.is_main else (lambda *a, **k: None)
    paths = ActorPaths(cfg)
    device = info.device
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

    flame = FlameModel.from_config(cfg).to(device)
    export = VhapExport.from_config(cfg)
    data = ActorData(export, flame, device)
    avatar = build_avatar(cfg, paths, flame).to(device)
    avatar.bf16 = cfg.train.bf16 and device.type == "cuda"
    opt = make_optimizer(avatar, cfg)
    vgg = perceptual_loss(cfg, cfg.loss.vgg, log)
    vgg = vgg.to(device) if vgg is not None else None

    step, elapsed = 0, 0.0
    start_over(cfg, paths.regressor_checkpoints, info, log)
    latest = latest_checkpoint(paths.regressor_checkpoints)
    if latest is not None:
        state = load_checkpoint(latest, map_location=device)
        check_resume(state, cfg, "regressor", latest)
        load_into(avatar, state["model"], latest, "regressor")
        load_into(opt, state.get("optimizer"), latest, "optimizer")
        step, elapsed = int(state["step"]), float(state.get("elapsed", 0.0))
        log(f"resuming from {latest} (step {step})")
    if info.is_main:
        save_config(cfg, paths.regressor / "config.yml")
    model = avatar
    if info.enabled:
        model = DistributedDataParallel(avatar, device_ids=[info.local_rank] if device.type == "cuda" else None,
                                        forward_sync_buffers=False)

    frames = export.split("train")
    val_frames = curve_frames(export, cfg.train.curve_views, log if info.is_main else lambda *a: None)
    total = cfg.train.iterations
    writer = open_tensorboard(paths.regressor_tensorboard) if info.is_main else None
    guard = NanGuard(avatar, opt, cfg.train.nan_snapshot_every, "lower train.lr or check the data")
    curve_next = elapsed + 60.0 * cfg.train.curve_every_minutes if cfg.train.curve_every_minutes > 0 else math.inf
    if step == 0 and info.is_main and cfg.train.curve_every_minutes > 0:
        _curve_point(paths, avatar, data, val_frames, step, 0.0, fresh=True)

    images = TrainingImages(export, frames, cfg, info.rank, info.world_size, step, total, device)
    first_step = step
    limit = cfg.train.time_limit_minutes
    bar = progress_bar(total, step, info.is_main)
    warm_up(device)  # native CPU kernels loaded (or compiled) before the clock starts
    t_start = time.perf_counter() - elapsed
    done = progress(step, total, elapsed, limit)
    while done < 1.0:
        sample, bg, gt = images.at(step)
        frame = sample.frame

        gaussians = model(*data.driving(frame.timestep_index))
        render = render_gaussians(gaussians, 0, sample.viewmat[None], sample.K[None],
                                  frame.camera.width, frame.camera.height, bg)
        weight = mouth_weight(sample.mouth[None], cfg.loss.mouth, cfg.loss.mouth_blur_px)
        terms = photometric(render, gt, weight, cfg.loss.l1, cfg.loss.ssim)
        terms.update(regularisers(gaussians.position_residual, gaussians.scales, cfg.loss.position, cfg.loss.scale))
        if vgg is not None and step >= cfg.loss.vgg_from:
            terms["vgg"] = cfg.loss.vgg * vgg(render, gt)
        loss = sum(terms.values())

        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(done, cfg.train.lr_schedule, cfg.train.lr_milestones,
                                                       cfg.train.lr_gamma, cfg.train.lr_final)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # After backward the gradients are averaged across ranks, so every rank sees the same norm
        # and takes the same decision in the guard.
        grad_norm = guard.step(step, cfg.train.grad_clip, log)
        step += 1  # after a restore too: the same sample would give the same NaN
        bar.update(1)
        elapsed = time.perf_counter() - t_start
        if limit > 0:  # under DDP every rank follows rank 0's clock, so all stop and decay together
            elapsed = distributed.broadcast_float(info, elapsed)
        done = progress(step, total, elapsed, limit)

        if writer is not None and step % cfg.train.log_every == 0:
            for name, value in terms.items():
                writer.add_scalar(f"loss/{name}", value.item(), step)
            writer.add_scalar("loss/total", loss.item(), step)
            writer.add_scalar("train/lr", opt.param_groups[0]["lr"], step)
            writer.add_scalar("train/grad_norm", float(grad_norm), step)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if writer is not None and step % cfg.train.image_every == 0:
            writer.add_image("render|gt", torch.cat([render[0], gt[0]], 1).clamp(0, 1), step, dataformats="HWC")
        if info.is_main and elapsed >= curve_next:
            _curve_point(paths, avatar, data, val_frames, step, elapsed)
            curve_next += 60.0 * cfg.train.curve_every_minutes
        if step % cfg.train.checkpoint_every == 0 or done >= 1.0:
            if info.is_main:
                save_checkpoint({"model": avatar.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                 "elapsed": elapsed, "shaping": shaping_config(cfg, "regressor")},
                                paths.regressor_checkpoints, step, cfg.train.keep_checkpoints)
            distributed.barrier(info)
    bar.close()

    minutes = (time.perf_counter() - t_start) / 60.0
    if info.is_main and cfg.train.curve_every_minutes > 0 and step > first_step and val_frames:  # a finished run adds no point
        _curve_point(paths, avatar, data, val_frames, step, minutes * 60.0)
        plot_curve(paths.regressor_curve, paths.regressor_curve.with_suffix(".png"))
    log(f"trained {step} steps in {minutes:.2f} min; checkpoint in {paths.regressor_checkpoints}")
    if writer is not None:
        writer.close()
    distributed.teardown(info)
    return avatar


def start_over(cfg, folder, info, log) -> None:
    """With train.resume false, move the run's checkpoints aside (rank 0; the others wait) so it starts anew."""
    if not cfg.train.resume:
        if info.is_main:
            moved = set_aside(folder)
            if moved is not None:
                log(f"train.resume is false: the previous checkpoints were moved to {moved}")
        distributed.barrier(info)


class NanGuard:
    """The optimiser step behind a NaN guard.

    The gradient norm is clipped; a non-finite one restores the last good state kept in memory
    (snapshotted every ``every`` steps) instead of stepping, and more than ``_MAX_NAN_RESTORES`` such
    steps in a row raise ``TrainingDiverged`` with ``hint`` (what the user can change).
    """

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, every: int, hint: str):
        self.model, self.opt, self.every, self.hint = model, opt, every, hint
        self.good, self.restores = snapshot(model, opt), 0

    def step(self, step: int, grad_clip: float, log) -> torch.Tensor:
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


def snapshot(avatar, opt) -> dict:
    """In-memory copy of a model's and its optimiser's state (what the NaN guard restores)."""
    return {"model": copy.deepcopy(avatar.state_dict()), "optimizer": copy.deepcopy(opt.state_dict())}


def restore(avatar, opt, good: dict) -> None:
    avatar.load_state_dict(good["model"])
    opt.load_state_dict(good["optimizer"])


def open_tensorboard(folder):
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only on rank 0

    return SummaryWriter(str(folder))


def _curve_point(paths: ActorPaths, avatar, data: ActorData, frames, step: int, seconds: float,
                 fresh: bool = False) -> None:
    """Append (minutes, step, val PSNR full / masked) to the run's curve CSV."""
    if not frames:  # an empty val split: no curve (curve_frames said so)
        return
    scores = score_frames(avatar, data, frames)
    path = paths.regressor_curve
    path.parent.mkdir(parents=True, exist_ok=True)
    new = fresh or not path.is_file()
    with open(path, "w" if new else "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["minutes", "step", "val_psnr", "val_psnr_masked"])
        w.writerow([f"{seconds / 60.0:.3f}", step, f"{scores['psnr']:.3f}", f"{scores['psnr_masked']:.3f}"])
