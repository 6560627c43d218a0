"""Stage 4, first version: the mapping network regressed onto the GEM's own per-frame coefficients.

The GEM of stage 3 stores the sigma-unit coefficients of every timestep it was fitted to (train + val
share the training timesteps). Over the ``train`` timesteps, the network maps each timestep's
relative driving signal (``lib.models.mapping``) to those coefficients with
L1 + mapping.magnitude * mean(c^2), full batch, AdamW; with mapping.weighting = variance the L1 of
each coefficient is weighted by its share of the variance (``lib.models.mapping.variance_weights``). No image is rendered, so a CPU trains it in
seconds; the method's photometric fine-tuning is not part of this version.

Checkpoints (``experiments/<actor>/mapping/checkpoints``) hold the network, the optimiser, the step
and the signal's name and size; a rerun resumes from the newest one.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from lib.config import save_config
from lib.dataset.vhap import SPLITS, DatasetError, VhapExport, read_flame_params
from lib.flame.model import FlameModel
from lib.models.gem import GaussianEigenModel, GemError
from lib.models.mapping import (
    MappingNetwork, coefficient_loss, coefficient_parts, flame_signal, flatten_coefficients, relative_to_identity,
    variance_weights,
)
from lib.models.mesh_pca import MeshPCA
from lib.paths import ActorPaths, resolve
from lib.train import distributed
from lib.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from lib.train.data import ActorData


def driving_signals(cfg, export: VhapExport, data: ActorData | None = None) -> tuple[list[int], Tensor]:
    """The relative driving signal (mapping.signal) of every timestep of the export.

    data: the posed meshes, needed by the mesh_pca signal only. -> (timesteps [T], signal [T, S])
    """
    files = {}
    for split in SPLITS:
        for t, path in export.timesteps(split):
            files.setdefault(t, path)
    timesteps = sorted(files)
    identity = cfg.actor.identity_timestep
    if identity not in files:
        raise DatasetError(f"actor.identity_timestep = {identity} is not a timestep of {export.root} "
                         f"(it has {timesteps[0]}..{timesteps[-1]}); set it to the actor's neutral frame")
    if cfg.mapping.signal == "flame":
        signal = torch.cat([flame_signal(read_flame_params(files[t])) for t in timesteps])
    else:
        if data is None:
            raise ValueError("the mesh_pca signal needs the actor's posed meshes (ActorData)")
        pca = MeshPCA.load(ActorPaths(cfg).mesh_pca).to(data.device)
        rows = torch.tensor([data.timesteps.index(t) for t in timesteps], device=data.device)
        signal = pca.coefficients(data.verts_head[rows], min(cfg.mapping.n_mesh_pca, pca.n_components)).cpu()
    return timesteps, relative_to_identity(signal, signal[timesteps.index(identity)])


def build_mapping(cfg, gem: GaussianEigenModel, n_signal: int, signal_scale: Tensor | None = None) -> MappingNetwork:
    _, labels = coefficient_parts(gem)
    return MappingNetwork(n_signal, labels, cfg.mapping.width, cfg.mapping.dropout, signal_scale)


def save_mapping(cfg, net: MappingNetwork, opt: torch.optim.Optimizer | None, step: int):
    """Write a mapping checkpoint (atomic; the train.keep_checkpoints newest kept). -> its path"""
    state = {"model": net.state_dict(), "step": step, "signal": cfg.mapping.signal,
             "n_signal": int(net.signal_scale.shape[0])}
    if opt is not None:
        state["optimizer"] = opt.state_dict()
    return save_checkpoint(state, ActorPaths(cfg).mapping_checkpoints, step, cfg.train.keep_checkpoints)


def load_mapping(cfg, gem: GaussianEigenModel, device) -> tuple[MappingNetwork, dict]:
    """The newest mapping checkpoint, in eval mode. -> (network, checkpoint state)"""
    folder = ActorPaths(cfg).mapping_checkpoints
    ckpt = latest_checkpoint(folder)
    if ckpt is None:
        raise CheckpointError(f"no mapping checkpoint in {folder}; train it first (python train.py CONFIG with "
                              "train.stage: mapping)")
    state = load_checkpoint(ckpt, map_location="cpu")
    if state.get("signal") != cfg.mapping.signal:
        raise CheckpointError(f"checkpoint {ckpt} was trained on the '{state.get('signal')}' signal, the config "
                              f"asks for '{cfg.mapping.signal}'; set mapping.signal accordingly or retrain")
    net = build_mapping(cfg, gem, int(state["n_signal"]))
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"checkpoint {ckpt} does not fit the mapping network of this config and GEM "
                              f"({first}); use the config it was trained with, or retrain") from None
    state["path"] = str(ckpt)
    return net.to(device).eval(), state


def fit_mapping(cfg, log=print) -> MappingNetwork:
    info = distributed.setup(cfg.train.device, cfg.train.threads)
    device = info.device
    torch.manual_seed(cfg.train.seed)
    paths = ActorPaths(cfg)
    gem = GaussianEigenModel.load(paths.gem)
    export = VhapExport.from_config(cfg)
    data = None
    if cfg.mapping.signal == "mesh_pca":
        flame = FlameModel.from_file(resolve(cfg.actor.flame_model), cfg.actor.n_shape, cfg.actor.n_expr).to(device)
        data = ActorData(export, flame, device)
    timesteps, signal = driving_signals(cfg, export, data)

    gem_rows = {int(t): i for i, t in enumerate(gem.timesteps)}
    train_steps = [t for t, _ in export.timesteps("train") if t in gem_rows]
    if not train_steps:
        raise GemError(f"none of the train timesteps of {export.root} is in the GEM {paths.gem}; rebuild the "
                       "GEM (python pca_gauss.py CONFIG) for this actor")
    x = signal[[timesteps.index(t) for t in train_steps]].to(device)
    y = flatten_coefficients(gem.coefficients)[[gem_rows[t] for t in train_steps]].to(device)
    # a channel that never moves (e.g. eyes in a sequence without gaze) keeps scale 1, not a division by ~0
    scale = x.std(0)
    scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))

    weights = variance_weights(gem).to(device) if cfg.mapping.weighting == "variance" else None
    step, state = 0, None
    if latest_checkpoint(paths.mapping_checkpoints) is not None:
        net, state = load_mapping(cfg, gem, device)
        step = int(state["step"])
        log(f"resumed from {state['path']} (step {step})")
    else:
        net = build_mapping(cfg, gem, x.shape[1], scale).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.mapping.lr, weight_decay=cfg.mapping.weight_decay)
    if state is not None and "optimizer" in state:
        opt.load_state_dict(state["optimizer"])
    log(f"mapping: {cfg.mapping.signal} signal ({x.shape[1]} values) -> {y.shape[1]} GEM coefficients, "
        f"{len(net.mlps)} part MLP(s), {len(train_steps)} train timesteps")

    start = time.perf_counter()
    net.train()
    while step < cfg.mapping.iterations:
        loss = coefficient_loss(net(x), y, cfg.mapping.magnitude, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % max(1, cfg.mapping.iterations // 10) == 0 or step == 1:
            log(f"step {step:6d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.1f} s)")
        if step % cfg.mapping.checkpoint_every == 0 and step < cfg.mapping.iterations:
            save_mapping(cfg, net, opt, step)
    path = save_mapping(cfg, net, opt, step)
    net.eval()
    with torch.no_grad():
        l1 = (net(x) - y).abs().mean().item()
    log(f"train coefficient L1 (eval mode) {l1:.4f} sigma; {time.perf_counter() - start:.1f} s -> {path}")
    save_config(cfg, paths.mapping / "config.yml")
    return net
