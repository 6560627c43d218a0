"""Training of the Gaussian texture regressor (stage 2): its setup and its step, top to bottom; the
loop around the step (schedule, NaN guard, logging, checkpoints) is ``lib.train.loop``'s.

One step: a random training image (camera and timestep), with train.views_per_step > 1 other cameras
of its timestep too, a random background colour per image, the avatar's Gaussians for that timestep
(one evaluation of the networks) rendered into those cameras, L1 (mouth-weighted) + SSIM (+ VGG)
against the ground truths composited on the same backgrounds (means over the images; with
train.refine_masks on keep masks rendered from the step's corrected mesh), the regularisers, Adam
with gradient clipping and a step-wise learning-rate schedule. Checkpoints every
``train.checkpoint_every`` steps are atomic and a rerun resumes from the newest. A non-finite
gradient restores the last good state kept in memory. Rank 0 logs TensorBoard scalars, progress
images and the val PSNR-versus-minutes curve; under torchrun all ranks train (DDP averages the
gradients).
"""
from __future__ import annotations

import csv
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lib.config import save_config
from lib.dataset.masks import MaskRegions
from lib.dataset.vhap import VhapExport
from lib.eval.curve import curve_frames, plot_curve
from lib.eval.render import render_set, score_frames
from lib.flame.model import FlameModel, load_regions
from lib.gaussians.render import warm_up
from lib.lock import locks_run_folder
from lib.models.avatar import GaussianAvatar, build_avatar
from lib.models.flame_refinement import RIGID, FlameRefinement
from lib.models.vgg import VggFeatures, VggPerceptual, VggUnavailable
from lib.paths import ActorPaths, resolve
from lib.train import distributed
from lib.train.checkpoint import (
    check_resume, latest_checkpoint, load_checkpoint, load_into, save_checkpoint, shaping_config,
)
from lib.train.data import ActorData, TrainingImages, remasked
from lib.train.losses import alpha_l1, mouth_weight, photometric, regularisers
from lib.train.loop import NanGuard, Phase, StepOutput, TrainingLoop, start_over
from lib.train.schedule import configured_schedule


def make_optimizer(avatar: GaussianAvatar, cfg, refinement: FlameRefinement | None = None) -> torch.optim.Adam:
    """Adam with two groups: the networks (train.lr) and the learned UV feature maps (train.lr_features);
    a third for the FLAME corrections (train.lr_flame) when they are learnt."""
    features = [p for n, p in avatar.named_parameters() if n.endswith("features")]
    ids = {id(p) for p in features}
    nets = [p for p in avatar.parameters() if id(p) not in ids]
    groups = [{"params": nets, "lr": cfg.train.lr}, {"params": features, "lr": cfg.train.lr_features}]
    if refinement is not None:
        groups.append({"params": refinement.learnt(), "lr": cfg.train.lr_flame})
    opt = torch.optim.Adam(groups)
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]
    return opt


def step_losses(loss, rgb: Tensor, alpha: Tensor, gt: Tensor, mouth: Tensor, head_alpha: Callable[[], Tensor],
                gaussians) -> dict[str, Tensor]:
    """The regressor step's terms but VGG, weighted by config section ``loss``: the photometric ones (the L1
    raised in the mouth), the render's alpha [B, H, W, 1] against the head's, and the regularisers.
    rgb, gt [B, H, W, 3]; mouth [B, H, W]; head_alpha: -> fg · keep [B, H, W], called only when the term is on."""
    terms = photometric(rgb, gt, mouth_weight(mouth, loss.mouth, loss.mouth_blur_px), loss.l1, loss.ssim)
    if loss.alpha > 0:
        terms.update(alpha_l1(alpha, head_alpha(), loss.alpha))
    terms.update(regularisers(gaussians.position_residual, gaussians.scales, loss.position, loss.scale))
    return terms


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
    # every step poses its timestep anew when its head-space mesh is being refined: nothing to keep
    rigid = set(cfg.train.refine_keys) <= set(RIGID)
    data = ActorData(export, flame, device, keep_meshes=not cfg.train.refine_flame or rigid)
    avatar = build_avatar(cfg, paths, flame).to(device)
    avatar.bf16 = cfg.train.bf16 and device.type == "cuda"
    refinement = None
    if cfg.train.refine_flame:  # corrections of the train timesteps' tracked parameters, learnt alongside
        refinement = FlameRefinement([t for t, _ in export.timesteps("train")], data.params["expr"].shape[1],
                                     cfg.train.refine_keys, data.rotation_pivot()).to(device)
    regions = None  # with train.refine_masks, the training images' masks follow the corrected meshes
    if refinement is not None and cfg.train.refine_masks:
        regions = MaskRegions.of_model(flame, load_regions(resolve(cfg.actor.flame_masks), flame.v_template.shape[0]))
    opt = make_optimizer(avatar, cfg, refinement)
    vgg = perceptual_loss(cfg, cfg.loss.vgg, log)
    vgg = vgg.to(device) if vgg is not None else None

    step, elapsed = 0, 0.0
    start_over(cfg, paths.regressor_checkpoints, info, log)
    latest = latest_checkpoint(paths.regressor_checkpoints)
    if latest is not None:
        # read on the CPU: loading copies the weights to the device, and Adam's step counts stay on the CPU
        # (on the GPU every step would read them back, two syncs per parameter)
        state = load_checkpoint(latest)
        check_resume(state, cfg, "regressor", latest)
        load_into(avatar, state["model"], latest, "regressor")
        load_into(opt, state.get("optimizer"), latest, "optimizer")
        if refinement is not None:
            load_into(refinement, state.get("flame_refinement"), latest, "FLAME refinement")
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
    total, limit = cfg.train.iterations, cfg.train.time_limit_minutes
    learnt = avatar if refinement is None else torch.nn.ModuleList([avatar, refinement])  # what the guard clips and restores
    guard = NanGuard(learnt, opt, cfg.train.nan_snapshot_every, "lower train.lr or check the data")
    curve = cfg.train.curve_every_minutes > 0 and info.is_main and bool(val_frames)  # no val frames: no curve
    curve_next = elapsed + 60.0 * cfg.train.curve_every_minutes if curve else math.inf
    if step == 0 and curve:
        _curve_point(paths, avatar, data, val_frames, step, 0.0, refinement, fresh=True)
    images = TrainingImages(export, frames, cfg, info.rank, info.world_size, step, total, device,
                            views=cfg.train.views_per_step)

    def train_step(step: int) -> StepOutput:
        samples, bg, gt = images.views(step)  # one timestep, one or more cameras
        frame = samples[0].frame
        if regions is not None:
            samples, gt = remasked(samples, bg, regions, *data.world_mesh(frame.timestep_index, refinement))
        gaussians = model(*data.driving(frame.timestep_index, refinement))
        out = render_set(gaussians, 0, torch.stack([s.viewmat for s in samples]),
                         torch.stack([s.K for s in samples]), frame.camera.width, frame.camera.height, bg)
        render = out.rgb
        terms = step_losses(cfg.loss, render, out.alpha, gt, torch.stack([s.mouth for s in samples]),
                            lambda: torch.stack([s.alpha for s in samples]), gaussians)
        if vgg is not None and step >= cfg.loss.vgg_from:
            terms["vgg"] = cfg.loss.vgg * vgg(render, gt)
        if refinement is not None:
            terms["flame_refine"] = cfg.loss.flame_refine * refinement.penalty([frame.timestep_index])
        return StepOutput(terms, render, gt)

    def share_corrections(step: int) -> None:  # DDP averages the avatar's gradients, not these
        distributed.average_gradients(info, refinement.learnt())

    def after_step(step: int, elapsed: float) -> None:
        nonlocal curve_next
        if refinement is not None and cfg.train.refine_centred:
            refinement.centre_()
        if elapsed >= curve_next:
            _curve_point(paths, avatar, data, val_frames, step, elapsed, refinement)
            curve_next += 60.0 * cfg.train.curve_every_minutes

    def save(step: int, elapsed: float) -> None:
        state = {"model": avatar.state_dict(), "optimizer": opt.state_dict(), "step": step,
                 "elapsed": elapsed, "shaping": shaping_config(cfg, "regressor")}
        if refinement is not None:
            state["flame_refinement"] = refinement.state_dict()
        save_checkpoint(state, paths.regressor_checkpoints, step, cfg.train.keep_checkpoints)

    loop = TrainingLoop(cfg, info, opt, guard, save, paths.regressor_tensorboard, total, step, log)
    first_step = step
    warm_up(device)  # native CPU kernels loaded (or compiled) before the clock starts
    step, elapsed = loop.run(Phase("loss", 0, total, limit, configured_schedule(cfg.train)), train_step, step, elapsed,
                             after_step=after_step, before_step=share_corrections if refinement is not None else None)
    loop.close()

    minutes = elapsed / 60.0
    if curve and step > first_step:  # a finished run adds no point
        _curve_point(paths, avatar, data, val_frames, step, elapsed, refinement)
        plot_curve(paths.regressor_curve, paths.regressor_curve.with_suffix(".png"))
    log(f"trained {step} steps in {minutes:.2f} min; checkpoint in {paths.regressor_checkpoints}")
    distributed.teardown(info)
    return avatar


def _curve_point(paths: ActorPaths, avatar, data: ActorData, frames, step: int, seconds: float,
                 refinement: FlameRefinement | None, fresh: bool = False) -> None:
    """Append (minutes, step, val PSNR full / masked) to the run's curve CSV."""
    scores = score_frames(avatar, data, frames, refinement)
    path = paths.regressor_curve
    path.parent.mkdir(parents=True, exist_ok=True)
    new = fresh or not path.is_file()
    with open(path, "w" if new else "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["minutes", "step", "val_psnr", "val_psnr_masked"])
        w.writerow([f"{seconds / 60.0:.3f}", step, f"{scores['psnr']:.3f}", f"{scores['psnr_masked']:.3f}"])
