"""Refitting the tracking of the scored timesteps to their other cameras, with the avatar frozen
(``test.refit_tracking``).

A tracker's FLAME fit jitters from frame to frame, and the Gaussians ride that mesh. Training can
correct the train timesteps (``train.refine_flame``), but the test split is a held-out sequence whose
parameters stay as tracked, and the scored camera's image then shows a head a millimetre or two away
from where the avatar puts it: several dB lost to the tracker, not to the avatar.

The protocol scores one camera per split: ``test.camera`` on the held-out sequence (test) and the
frontal camera on the training timesteps (val). Every other camera of those timesteps is an image the
tracker had too (VHAP tracks every camera), and none of them is scored. So before scoring, the
per-timestep corrections of ``FlameRefinement`` (those of ``test.refit_keys`` among rotation, translation,
neck, jaw, eyes and expression, in its units,
pulled towards the tracker by ``loss.flame_refine`` as in training) are fitted by Adam to those other
cameras' frames, the avatar frozen; the scored camera's frames are never read. It is a better tracker
for the frames the avatar is asked to show, not a fit to the images it is scored on.

The avatar's network input is the mesh without the corrections' gradient (``GaussianAvatar.network_input``),
so the fit moves the geometry the Gaussians ride, as training's refinement does, and the networks run once
per timestep, at the starting tracking. A refit of the global pose alone (``test.refit_keys``: rotation,
translation) leaves the head-space mesh as tracked: each step turns the timestep's Gaussians (``turned``)
and renders them. A refit of any other key (neck, jaw, eyes, expression) re-poses FLAME every step and
places the networks' held outputs (``held_outputs``) on the new mesh (``GaussianAvatar.assemble``): their
input's values lag the corrections (a millimetre or so) where their gradient never reached it. A refit is fitted with
the regressor and kept beside it (``split_refit``), so the mapping network's self-reenactment poses GEM
with the same tracking the regressor's evaluation scored.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from lib.atomic import load_torch, save_torch
from lib.dataset.vhap import SPLITS, Frame, VhapExport
from lib.eval.render import WHITE, render_gaussians
from lib.geometry.rotations import matrix_to_quat, normalize_quat, quat_multiply
from lib.models.avatar import TexelOutputs
from lib.models.flame_refinement import FlameRefinement, refinement_from_state
from lib.paths import ActorPaths
from lib.train.data import ActorData
from lib.train.losses import mouth_weight, photometric


class RefitFileError(RuntimeError):
    """A kept refit that cannot be read (it is then fitted again)."""


def fitting_frames(frames: list[Frame], scored: list[Frame]) -> dict[int, list[Frame]]:
    """The frames a refit may read for each scored timestep: those of ``frames`` at the scored timesteps
    from cameras no scored frame uses. -> {timestep: frames} (only timesteps that have any)"""
    timesteps = {f.timestep_index for f in scored}
    cameras = {f.camera_index for f in scored}
    out: dict[int, list[Frame]] = {}
    for f in frames:
        if f.timestep_index in timesteps and f.camera_index not in cameras:
            out.setdefault(f.timestep_index, []).append(f)
    return out


def refit_tracking(avatar, data: ActorData, frames: dict[int, list[Frame]], cfg) -> FlameRefinement:
    """Corrections of the timesteps of ``frames`` ({timestep: frames of other cameras}, ``fitting_frames``)
    fitted to those frames with the avatar frozen: ``test.refit_steps`` steps, each rendering every
    timestep once (its cameras in turn) and taking one Adam step (rate ``test.refit_lr``, decaying
    linearly to a tenth). ``data``'s parameters are the starting point (already refined where training
    refined them)."""
    device = data.device
    timesteps = sorted(frames)
    refinement = FlameRefinement(timesteps, data.params["expr"].shape[1], cfg.test.refit_keys,
                                 data.rotation_pivot()).to(device)
    steps, lr = cfg.test.refit_steps, cfg.test.refit_lr
    opt = torch.optim.Adam(refinement.parameters(), lr=lr)
    white = torch.tensor(WHITE, device=device)
    frozen = [p for p in avatar.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        # The networks run once per timestep, at the starting tracking: the global pose alone turns the
        # timestep's head-space Gaussians; jaw and expression re-pose the mesh the networks' outputs ride.
        heads = {t: head_gaussians(avatar, data, t) for t in timesteps} if refinement.rigid else {}
        outputs = {} if refinement.rigid else {t: held_outputs(avatar, data, t) for t in timesteps}
        with torch.enable_grad():
            for step in range(steps):
                for group in opt.param_groups:
                    group["lr"] = lr * (1.0 - 0.9 * step / max(steps - 1, 1))
                opt.zero_grad(set_to_none=True)
                for t in timesteps:
                    frame = frames[t][step % len(frames[t])]
                    sample = data.sample(frame)
                    d = data.driving(t, refinement)  # the Gaussians at the cut keep the export's pose
                    if heads:
                        g = avatar.follow_tracking(turned(heads[t], d.R, d.t), d.R, d.t, d.tracked)
                    else:
                        g = avatar.assemble(outputs[t], avatar.riding_mesh(d.verts_head), d.R, d.t, d.tracked)
                    render = render_gaussians(g, 0, sample.viewmat[None], sample.K[None], frame.camera.width,
                                              frame.camera.height, white)
                    weight = mouth_weight(sample.mouth[None], cfg.loss.mouth, cfg.loss.mouth_blur_px)
                    terms = photometric(render, sample.ground_truth(white), weight, cfg.loss.l1, cfg.loss.ssim)
                    loss = sum(terms.values()) + cfg.loss.flame_refine * refinement.penalty([t])
                    loss.backward()
                opt.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return refinement.requires_grad_(False)


@torch.no_grad()
def head_gaussians(avatar, data: ActorData, timestep: int):
    """The avatar's Gaussians of a timestep in head space (global pose R = I, t = 0), as tracked."""
    d = data.driving(timestep)
    return avatar(d.verts_head, torch.eye(3, device=d.R.device)[None], d.R.new_zeros(1, 3))


@torch.no_grad()
def held_outputs(avatar, data: ActorData, timestep: int) -> TexelOutputs:
    """The avatar's networks' outputs of a timestep at its starting tracking, held while a refit moves the mesh."""
    return avatar.texel_outputs(data.driving(timestep)[0])[0]


def turned(head, R: Tensor, t: Tensor):
    """Head-space Gaussians under the global pose world = x @ R^T + t (R [1, 3, 3], t [1, 3]): what the
    avatar computes with that pose, as its head-space output does not depend on it."""
    means = head.means @ R.transpose(-1, -2) + t[:, None]
    quats = normalize_quat(quat_multiply(matrix_to_quat(R)[:, None], head.quats))
    return dataclasses.replace(head, means=means, quats=quats)


def _refit_plan(cfg, export: VhapExport, split: str, scored: list[Frame], checkpoint) -> tuple[dict, dict, Path]:
    """What a split's refit fits and what identifies it. -> (pool: timestep -> frames, key, kept file)"""
    pool = fitting_frames([f for s in SPLITS for f in export.split(s)], scored)
    stat = Path(checkpoint).stat()  # the file's identity: a retrained run may write a checkpoint of the same name
    key = {"checkpoint": f"{checkpoint} {stat.st_size} {stat.st_mtime_ns}", "timesteps": sorted(pool),
           "frames": sum(len(v) for v in pool.values()), "steps": cfg.test.refit_steps, "lr": cfg.test.refit_lr,
           "keys": list(cfg.test.refit_keys), "turned_about": "the head's centre", "networks": "held",
           "cut_band": cfg.regressor.cut_band,  # the Gaussians at the cut keep the tracked pose
           **{k: getattr(cfg.loss, k) for k in ("l1", "ssim", "mouth", "mouth_blur_px", "flame_refine")}}
    return pool, key, ActorPaths(cfg).regressor / "tracking_refit" / f"{split}.pt"


def kept_refit(cfg, export: VhapExport, split: str, scored: list[Frame], checkpoint,
               log=print) -> FlameRefinement | None:
    """The refit ``split_refit`` kept for these scored frames, regressor checkpoint and settings, or None
    when there is none (or it was fitted for something else, or cannot be read); fits nothing."""
    return _load_kept(split, *_refit_plan(cfg, export, split, scored, checkpoint), log)


def _load_kept(split: str, pool: dict, key: dict, path: Path, log) -> FlameRefinement | None:
    if not pool or not path.is_file():
        return None
    try:
        kept = load_torch(path, RefitFileError, "it is fitted again")
        if kept["key"] == key:
            log(f"{split}: tracking of {len(pool)} timesteps as refitted before ({path})")
            return refinement_from_state(kept["refinement"])
    except (RefitFileError, KeyError, TypeError, RuntimeError) as e:
        log(f"{split}: the kept refit {path} cannot be used ({e})")
    return None


def split_refit(cfg, avatar, data: ActorData, export: VhapExport, split: str, scored: list[Frame], checkpoint,
                log=print) -> tuple[FlameRefinement | None, dict]:
    """The refitted tracking of a split's scored frames, fitted once per regressor checkpoint, scored timesteps
    and settings, and kept in ``<run>/regressor/tracking_refit/<split>.pt``, so the regressor's evaluation and
    the mapping network's (which poses GEM with it) score the same tracking. -> (the corrections, or None when
    no other camera shows the scored timesteps; what a metrics file says of the refit)"""
    pool, key, path = _refit_plan(cfg, export, split, scored, checkpoint)
    if not pool:
        log(f"{split}: no other camera shows its timesteps; scored as tracked (test.refit_tracking)")
        return None, {"refit": False, "why": "no other camera shows the scored timesteps"}
    info = {"refit": True, "timesteps": len(pool), "fitting_frames": key["frames"], "steps": cfg.test.refit_steps,
            "lr": cfg.test.refit_lr, "keys": list(cfg.test.refit_keys)}
    kept = _load_kept(split, pool, key, path, log)
    if kept is not None:
        return kept.to(data.device), info  # read on the CPU; it corrects parameters on data's device
    refit = refit_tracking(avatar, data, pool, cfg)
    save_torch(path, {"key": key, "refinement": refit.state_dict()})
    log(f"{split}: tracking of {len(pool)} timesteps refitted to {key['frames']} frames of other cameras "
        f"({cfg.test.refit_steps} steps) -> {path}")
    return refit, info
