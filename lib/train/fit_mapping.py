"""Stage 4: training of the mapping network (a driving signal -> GEM coefficients), into
experiments/<actor>/<run>/mapping/.

Targets are the GEM's own coefficients of the training timesteps (stage 3 stores them: the projection
of the regressor's Gaussians). One step counter runs through two phases:

    warm-up      mapping.warmup_iterations steps, the batch = every train timestep: L1 of the network's
                 coefficients to the GEM's (each weighted by its variance share with
                 mapping.weighting = variance) + mapping.magnitude * mean(c^2). With mapping.basis_lr > 0
                 (the method's warm-up) each step also renders the ground-truth coefficients of one
                 random training image and fine-tunes the GEM's means and bases on it with Adam, the
                 bases re-orthonormalised every ORTHONORMALISE_EVERY steps; the fine-tuned GEM is saved
                 whole in every checkpoint (``mapping_gem``) and frozen after the warm-up. With a frozen
                 basis such a render would train nothing, so none is made: on a CPU the warm-up then
                 takes seconds.
    photometric  mapping.iterations steps, or mapping.time_limit_minutes: one random training image
                 per step (and per DDP rank); the network's coefficients are rendered by GEM into that
                 camera at the frame's GEM pose and compared with the image on a random background:
                 mapping.l1 * L1 + mapping.ssim * (1 - SSIM) (+ mapping.vgg * VGG when
                 loss.vgg_weights is set) + mapping.regression * L1(c, c_gt) + mapping.magnitude * mean(c^2).

Both phases use AdamW (mapping.lr, mapping.weight_decay); the photometric phase decays the rate with
train.lr_schedule over its own progress. Both run on the regressor's loop (``lib.train.loop``):
atomic checkpoints every train.checkpoint_every steps and at the end, resume from the newest, the NaN
guard, TensorBoard scalars and images on rank 0, DDP under torchrun. A checkpoint holds the network,
the optimiser, the step, the photometric phase's elapsed seconds, and the signal and architecture it
was trained for.
"""
from __future__ import annotations


import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lib.config import Config, save_config
from lib.dataset.vhap import SPLITS, DatasetError, VhapExport
from lib.flame.model import FlameModel
from lib.gaussians.render import warm_up
from lib.models.flame_refinement import load_refinement
from lib.models.gem import GaussianEigenModel, GemError, render_gem
from lib.models.image_encoder import encoder_signal
from lib.models.mapping import (
    FLAME_SIGNAL_KEYS, MappingNetwork, coefficient_loss, coefficient_parts, flame_signal, flatten_coefficients,
    relative_to_identity, split_coefficients, variance_weights,
)
from lib.lock import locks_run_folder
from lib.models.mesh_pca import MeshPCA
from lib.paths import ActorPaths
from lib.train import distributed
from lib.train.checkpoint import (
    CheckpointError, check_resume, latest_checkpoint, load_checkpoint, load_into, save_checkpoint, shaping_config,
)
from lib.train.data import ActorData, TrainingImages
from lib.train.fit_gem import timestep_files
from lib.train.losses import photometric
from lib.train.loop import NanGuard, Phase, StepOutput, TrainingLoop, start_over
from lib.train.schedule import configured_schedule
from lib.train.trainer import perceptual_loss

# Warm-up steps between re-orthonormalisations of a fine-tuned basis: one costs about 40 ms on a CPU
# core for the synthetic actor's GEM, and ten Adam steps at 1e-5 leave the rows orthonormal to about 2e-4.
ORTHONORMALISE_EVERY = 10


def driving_signals(cfg, export: VhapExport, timesteps: list[int], data: ActorData | None = None,
                    source_cfg=None, fit: bool = False) -> Tensor:
    """The relative driving signal (cfg.mapping.signal) of timesteps of an export. -> [T, S]

    cfg: the avatar's config: the signal's kind and the actor whose PCA files project it. export, data:
    whose motion it is: the avatar's own, or a source actor's for cross-identity reenactment, whose
    config (its identity timestep and camera) is then source_cfg. data (the tracking, with whatever
    refinement or refit the caller applied to it) is needed by the mesh_pca and encoder signals; the flame
    signal reads it too when given (else the export's files), so that every signal describes the tracking
    the avatar and GEM were posed with. fit: fit the encoder signal's per-actor PCA to these timesteps
    (training) instead of loading it.
    """
    motion_cfg = cfg if source_cfg is None else source_cfg
    files = timestep_files(export, SPLITS)
    identity = motion_cfg.actor.identity_timestep
    for t in (identity, *timesteps):
        if t not in files:
            what = "actor.identity_timestep" if t == identity else "timestep"
            raise DatasetError(f"{what} {t} is not a timestep of {export.root} (it has {min(files)}..{max(files)})"
                               + ("; set it to the actor's neutral frame" if t == identity else ""))
    kind = cfg.mapping.signal
    if kind != "flame" and data is None:
        raise ValueError(f"the {kind} signal needs the actor's posed meshes (ActorData)")
    if kind == "encoder":
        encoder_cfg = cfg if source_cfg is None else _with_mapping(source_cfg, cfg)
        return encoder_signal(encoder_cfg, export, data, timesteps, identity, ActorPaths(cfg).encoder_pca, fit).cpu()
    steps = [identity, *timesteps]
    if kind == "flame" and data is not None:  # the tracking the avatar is posed with (refined, refitted)
        signal = flame_signal(data.flame_params(steps, FLAME_SIGNAL_KEYS)).cpu()
    elif kind == "flame":
        signal = torch.cat([flame_signal(export.load_flame(files[t])) for t in steps])
    else:
        pca = MeshPCA.load(ActorPaths(cfg).mesh_pca).to(data.device)
        signal = pca.coefficients(data.meshes(steps), min(cfg.mapping.n_mesh_pca, pca.n_components)).cpu()
    return relative_to_identity(signal[1:], signal[0])


def _with_mapping(source_cfg, cfg):
    """The source actor's config with the avatar's mapping section (the encoder and its settings)."""
    values = source_cfg.to_dict()
    values["mapping"] = cfg.mapping.to_dict()
    return Config(values)


def build_mapping(cfg, gem: GaussianEigenModel, n_signal: int, signal_scale: Tensor | None = None) -> MappingNetwork:
    _, labels = coefficient_parts(gem)
    return MappingNetwork(n_signal, labels, cfg.mapping.width, cfg.mapping.dropout, signal_scale,
                          attention=cfg.mapping.architecture == "attention")


def save_mapping(cfg, net: MappingNetwork, opt: torch.optim.Optimizer | None, step: int, elapsed: float = 0.0,
                 gem: GaussianEigenModel | None = None, basis_opt: torch.optim.Optimizer | None = None):
    """Write a mapping checkpoint (atomic; the train.keep_checkpoints newest kept); gem: a fine-tuned
    GEM, stored whole with its optimiser. -> its path"""
    state = {"model": net.state_dict(), "step": step, "elapsed": elapsed, "signal": cfg.mapping.signal,
             "architecture": cfg.mapping.architecture, "n_signal": int(net.signal_scale.shape[0]),
             "shaping": shaping_config(cfg, "mapping")}
    if opt is not None:
        state["optimizer"] = opt.state_dict()
    if gem is not None:
        state["gem"] = gem.state()
    if basis_opt is not None:
        state["basis_optimizer"] = basis_opt.state_dict()
    return save_checkpoint(state, ActorPaths(cfg).mapping_checkpoints, step, cfg.train.keep_checkpoints)


def load_mapping(cfg, gem: GaussianEigenModel, device, resuming: bool = False) -> tuple[MappingNetwork, dict]:
    """The newest mapping checkpoint, in eval mode; resuming: refuse it when a key that shapes the model
    changed since (check_resume). -> (network, checkpoint state)"""
    folder = ActorPaths(cfg).mapping_checkpoints
    ckpt = latest_checkpoint(folder)
    if ckpt is None:
        raise CheckpointError(f"no mapping checkpoint in {folder}; train it first (python train.py CONFIG with "
                              "train.stage: mapping)")
    state = load_checkpoint(ckpt, map_location="cpu")
    if resuming:
        check_resume(state, cfg, "mapping", ckpt)
    for key in ("signal", "architecture"):
        trained = state.get(key, "parts" if key == "architecture" else None)
        if trained != getattr(cfg.mapping, key):
            raise CheckpointError(f"checkpoint {ckpt} was trained with mapping.{key} = '{trained}', the config "
                                  f"asks for '{getattr(cfg.mapping, key)}'; set it accordingly or retrain")
    net = build_mapping(cfg, gem, int(state["n_signal"]))
    load_into(net, state["model"], ckpt, "mapping network of this config and GEM")
    state["path"] = str(ckpt)
    return net.to(device).eval(), state


def mapping_gem(state: dict, gem: GaussianEigenModel, device) -> GaussianEigenModel:
    """The GEM a mapping checkpoint renders with: the one its warm-up fine-tuned, or stage 3's."""
    return gem if "gem" not in state else GaussianEigenModel.from_state(state["gem"]).to(device)


@locks_run_folder(lambda cfg: ActorPaths(cfg).mapping, "the mapping run folder")
def fit_mapping(cfg, log=print) -> MappingNetwork:
    info = distributed.setup(cfg.train.device, cfg.train.threads)
    log = log if info.is_main else (lambda *a, **k: None)
    device = info.device
    torch.manual_seed(cfg.train.seed)
    paths = ActorPaths(cfg)
    gem = GaussianEigenModel.load(paths.gem, device=device)
    flame = FlameModel.from_config(cfg).to(device)
    export = VhapExport.from_config(cfg)
    # the GEM poses of the train timesteps as the regressor (and so GEM) saw them: refined if it refined them
    data = ActorData(export, flame, device, refinement=load_refinement(paths))
    gem_rows = {int(t): i for i, t in enumerate(gem.timesteps)}
    train_steps = [t for t, _ in export.timesteps("train") if t in gem_rows]
    if not train_steps:
        raise GemError(f"none of the train timesteps of {export.root} is in the GEM {paths.gem}; rebuild the "
                       "GEM (python pca_gauss.py CONFIG) for this actor")
    row = {t: i for i, t in enumerate(train_steps)}
    start_over(cfg, paths.mapping_checkpoints, info, log)
    resuming = latest_checkpoint(paths.mapping_checkpoints) is not None
    if cfg.mapping.signal == "encoder" and not resuming and not info.is_main:
        distributed.barrier(info)  # wait for the PCA rank 0 fits, then read it
    x = driving_signals(cfg, export, train_steps, data, fit=info.is_main and not resuming).to(device)
    if cfg.mapping.signal == "encoder" and not resuming and info.is_main:
        distributed.barrier(info)
    y = flatten_coefficients(gem.coefficients)[[gem_rows[t] for t in train_steps]].to(device)
    R, t = data.gem_pose(train_steps)
    # a channel that never moves (e.g. eyes in a sequence without gaze) keeps scale 1, not a division by ~0
    scale = x.std(0)
    scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))

    weights = variance_weights(gem).to(device) if cfg.mapping.weighting == "variance" else None
    step, elapsed, state = 0, 0.0, None
    if resuming:
        net, state = load_mapping(cfg, gem, device, resuming=True)
        gem = mapping_gem(state, gem, device)
        step, elapsed = int(state["step"]), float(state.get("elapsed", 0.0))
        log(f"resumed from {state['path']} (step {step})")
    else:
        net = build_mapping(cfg, gem, x.shape[1], scale).to(device)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.mapping.lr, weight_decay=cfg.mapping.weight_decay)
    if state is not None and "optimizer" in state:
        load_into(opt, state["optimizer"], state["path"], "optimizer")
    for group in opt.param_groups:  # the config's rate, also over a checkpoint's (decayed) one
        group["base_lr"] = cfg.mapping.lr
    warmup, total = cfg.mapping.warmup_iterations, cfg.mapping.warmup_iterations + cfg.mapping.iterations
    basis, basis_opt = [], None
    if cfg.mapping.basis_lr > 0 and warmup > 0:  # a fine-tuned GEM is saved whole with every checkpoint
        basis = gem.fine_tunable()
        basis_opt = torch.optim.Adam(basis, lr=cfg.mapping.basis_lr)
        if state is not None and "basis_optimizer" in state:
            load_into(basis_opt, state["basis_optimizer"], state["path"], "basis optimizer")
        _freeze(basis, step >= warmup)
    if info.is_main:
        save_config(cfg, paths.mapping / "config.yml")
    model = net
    if info.enabled:
        model = DistributedDataParallel(net, device_ids=[info.local_rank] if device.type == "cuda" else None)
    log(f"mapping: {cfg.mapping.signal} signal ({x.shape[1]} values) -> {y.shape[1]} GEM coefficients, "
        f"{len(net.mlps)} part MLP(s) ({cfg.mapping.architecture}), {len(train_steps)} train timesteps")

    frames = [f for f in export.split("train") if f.timestep_index in row]
    vgg = perceptual_loss(cfg, cfg.mapping.vgg, log) if cfg.mapping.iterations > 0 else None
    vgg = vgg.to(device) if vgg is not None else None
    guard = NanGuard(net, opt, cfg.train.nan_snapshot_every, "lower mapping.lr or check the data")
    images = TrainingImages(export, frames, cfg, info.rank, info.world_size, step if basis else max(step, warmup),
                            total, device)

    def save(step: int, elapsed: float) -> None:  # elapsed: the photometric phase's seconds (0 in the warm-up)
        save_mapping(cfg, net, opt, step, elapsed if step > warmup else 0.0, gem if basis else None, basis_opt)

    loop = TrainingLoop(cfg, info, opt, guard, save, paths.mapping_tensorboard, total, step, log)

    def render_image(coefficients: Tensor, sample, bg: Tensor, gt: Tensor, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        """GEM render of a training image with flat coefficients [1, D] of its timestep (row i), on
        background bg, scored against gt. -> (render [1, H, W, 3], photometric terms)"""
        cam = sample.frame.camera
        rgb = render_gem(gem, split_coefficients(gem, coefficients), R[i:i + 1], t[i:i + 1], sample.viewmat[None],
                         sample.K[None], cam.width, cam.height, bg).rgb
        return rgb, photometric(rgb, gt, torch.ones_like(sample.alpha[None]), cfg.mapping.l1, cfg.mapping.ssim)

    def warmup_step(step: int) -> StepOutput:
        """Every train timestep's coefficients regressed; with a basis to fine-tune, one training image
        rendered with its ground-truth coefficients (only the basis learns from it)."""
        if basis:  # the image before the dropout: the loader's start draws from torch's generator
            sample, bg, gt = images.at(step)
            basis_opt.zero_grad(set_to_none=True)
        pred = model(x)
        out = StepOutput({"regression": coefficient_loss(pred, y, 0.0, weights),
                          "magnitude": cfg.mapping.magnitude * pred.pow(2).mean()})
        if basis:
            i = row[sample.frame.timestep_index]
            out.render, basis_terms = render_image(y[i:i + 1], sample, bg, gt, i)
            out.gt = gt
            out.terms.update({f"basis_{k}": v for k, v in basis_terms.items()})
        return out

    def basis_step(step: int, grad_norm: Tensor) -> None:
        distributed.average_gradients(info, basis)
        if torch.isfinite(grad_norm) and all(torch.isfinite(p.grad).all() for p in basis if p.grad is not None):
            basis_opt.step()
        if (step + 1) % ORTHONORMALISE_EVERY == 0 or step + 1 == warmup:
            gem.orthonormalise()

    def photometric_step(step: int) -> StepOutput:
        """One training image rendered with the network's coefficients for its timestep."""
        sample, bg, gt = images.at(step)
        i = row[sample.frame.timestep_index]
        pred = model(x[i:i + 1])
        render, terms = render_image(pred, sample, bg, gt, i)
        if vgg is not None:
            terms["vgg"] = cfg.mapping.vgg * vgg(render, gt)
        terms["regression"] = cfg.mapping.regression * coefficient_loss(pred, y[i:i + 1], 0.0, weights)
        terms["magnitude"] = cfg.mapping.magnitude * pred.pow(2).mean()
        return StepOutput(terms, render, gt)

    warm_up(device)  # native CPU kernels loaded (or compiled) before the clock starts
    first_step = step
    step, _ = loop.run(Phase("warmup", 0, warmup), warmup_step, step, after_backward=basis_step if basis else None)
    if first_step < warmup <= step < total:
        log(f"warm-up done ({warmup} steps): coefficient L1 {_train_l1(net, x, y):.4f} sigma")
    _freeze(basis, True)
    step, _ = loop.run(Phase("photometric", warmup, total, cfg.mapping.time_limit_minutes,
                             configured_schedule(cfg.train)), photometric_step, step, elapsed)
    loop.close()
    net.eval()
    log(f"train coefficient L1 (eval mode) {_train_l1(net, x, y):.4f} sigma after {step} steps "
        f"({warmup} warm-up); checkpoint in {paths.mapping_checkpoints}")
    distributed.teardown(info)
    return net


def _freeze(params: list[Tensor], frozen: bool) -> None:
    for p in params:
        p.requires_grad_(not frozen)


@torch.no_grad()
def _train_l1(net: MappingNetwork, x: Tensor, y: Tensor) -> float:
    was_training = net.training
    net.eval()
    l1 = (net(x) - y).abs().mean().item()
    net.train(was_training)
    return l1
