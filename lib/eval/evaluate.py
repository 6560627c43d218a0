"""test.py for the regressor: renders, videos and metrics of the latest checkpoint.

    val    the val split (the frontal camera on the training sequences: novel view)
    test   the test split seen from camera ``test.camera`` (held-out sequence: novel expression)
    spin   ``test.spin_views`` views orbiting the head over +- ``test.spin_yaw_deg`` of yaw about the
           world's up axis through the head's centre, at the identity timestep (no ground truth), from
           camera ``test.camera`` as the identity timestep's sequence places it

An empty val split (a one-camera export) is logged and recorded as skipped.

Tracking: for the splits in ``test.refit_tracking``, the FLAME tracking of the scored timesteps is first
refitted to those timesteps' other cameras, the avatar frozen and the scored camera never read
(``lib.train.fit_tracking``); each split's ``tracking`` entry in ``metrics.json`` says how, with the split's
figures as tracked (``as_tracked``) beside the refitted ones.

Everything is rendered on white, as the exports are. Per split: ``<split>/<t>_<c>.png`` renders,
``<split>/compare/<t>_<c>.png`` (render | ground truth | 4x error), ``<split>.mp4`` (render |
ground truth), and in ``metrics.json`` the means and per-frame values of PSNR over the full frame,
PSNR inside the ground-truth head mask, SSIM (zero-padded, as 3DGS reports it: ``lib.train.metrics``), L1
and LPIPS (or why LPIPS is unavailable).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lib.atomic import write_json
from lib.dataset.vhap import VhapExport
from lib.eval.lpips import load_lpips
from lib.eval.render import WHITE, render_frame, render_gaussians, score_frames
from lib.eval.video import VideoWriter, to_uint8, write_png
from lib.flame.model import FlameModel
from lib.geometry.rotations import axis_angle_to_matrix
from lib.lock import locks_run_folder
from lib.models.avatar import load_regressor
from lib.models.vgg import VggUnavailable
from lib.paths import ActorPaths, resolve
from lib.train.data import ActorData
from lib.train.distributed import evaluation_device
from lib.train.fit_tracking import split_refit
from lib.train.metrics import image_metrics


def orbit_viewmats(viewmat: Tensor, centre: Tensor, n: int, yaw_deg: float) -> Tensor:
    """Cameras orbiting ``centre`` [3]: the view [4, 4] turned by yaw(k) = yaw_deg · sin(2πk / n). -> [n, 4, 4]

    Turning the camera by θ about the world's y axis through the centre equals turning the scene by
    -θ, so viewmat_k = viewmat · T(c) · R_y(-θ_k) · T(-c).
    """
    yaw = torch.deg2rad(yaw_deg * torch.sin(2 * math.pi * torch.arange(n, dtype=torch.float32) / n))
    axis = torch.zeros(n, 3)
    axis[:, 1] = -yaw
    M = torch.eye(4).repeat(n, 1, 1)
    R = axis_angle_to_matrix(axis)
    M[:, :3, :3] = R
    M[:, :3, 3] = centre.cpu() - (R @ centre.cpu())
    return viewmat.cpu() @ M



def pick_frames(frames: list, count: int) -> list:
    """``count`` frames evenly spaced over the list (all of them when count is 0 or more than there are)."""
    if count <= 0 or count >= len(frames):
        return frames
    return [frames[i] for i in np.linspace(0, len(frames) - 1, count).round().astype(int)]


def scored_frames(cfg, export: VhapExport, split: str) -> list:
    """The frames test.py scores of a split: the test split's ``test.camera`` frames, every val frame; at
    most ``test.max_frames`` of them (``pick_frames``)."""
    frames = export.camera_frames(split, cfg.test.camera) if split == "test" else export.split(split)
    return pick_frames(frames, cfg.test.max_frames)


@torch.no_grad()
@locks_run_folder(lambda cfg: ActorPaths(cfg).regressor_eval, "the regressor evaluation folder")
def evaluate(cfg, log=print) -> dict:
    """Render and score the latest regressor checkpoint of ``cfg``; returns what metrics.json holds."""
    paths = ActorPaths(cfg)
    device = evaluation_device(cfg.train.device, cfg.train.threads)
    flame = FlameModel.from_config(cfg).to(device)
    avatar, regressor = load_regressor(cfg, paths, flame, device)
    export = VhapExport.from_config(cfg)
    data = ActorData(export, flame, device, keep_meshes=False, refinement=regressor["refinement"])
    out = paths.regressor_eval
    results: dict = {"checkpoint": regressor["path"], "step": regressor["step"], "background": "white"}
    try:
        lpips = load_lpips(str(resolve(cfg.test.lpips_backbone)) if cfg.test.lpips_backbone else "",
                           str(resolve(cfg.test.lpips_weights)) if cfg.test.lpips_weights else "").to(device)
        results["lpips"] = "LPIPS v0.1 (VGG16)"
    except VggUnavailable as e:
        lpips = None
        results["lpips"] = f"unavailable: {e}"
        log(f"LPIPS unavailable: {e}")

    for split in cfg.test.splits:
        if split == "spin":
            results["spin"] = _spin(cfg, avatar, data, export, out)
            log(f"spin: {cfg.test.spin_views} views -> {out / 'spin.mp4'}")
            continue
        if split == "val" and export.empty_split("val", "no val metrics", log):
            results["val"] = {"frames": 0, "skipped": f"the val split is empty ({export.split_path('val')})"}
            continue
        frames = scored_frames(cfg, export, split)
        refit, tracking = _refit(cfg, avatar, data, export, split, frames, regressor["path"], log)
        rows = []
        with VideoWriter(out / f"{split}.mp4", cfg.test.fps) as video:
            for frame in frames:
                rgb, gt, mask = render_frame(avatar, data, frame, refit)
                row = {"timestep": frame.timestep_index, "camera": frame.camera_index,
                       **image_metrics(rgb, gt, mask)}
                if lpips is not None:
                    row["lpips"] = float(lpips(rgb[None], gt[None])[0])
                rows.append(row)
                name = f"{frame.timestep_index:05d}_{frame.camera_index:02d}.png"
                write_png(out / split / name, to_uint8(rgb))
                compare = np.concatenate([to_uint8(rgb), to_uint8(gt), to_uint8((4 * (rgb - gt).abs()))], 1)
                write_png(out / split / "compare" / name, compare)
                video.append(np.concatenate([to_uint8(rgb), to_uint8(gt)], 1))
        keys = [k for k in rows[0] if k not in ("timestep", "camera")]
        mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        results[split] = {"frames": len(rows), **mean, "tracking": tracking, "per_frame": rows}
        log(f"{split}: {len(rows)} frames, PSNR {mean['psnr']:.2f} dB (masked {mean['psnr_masked']:.2f} dB), "
            f"SSIM {mean['ssim']:.4f}, L1 {mean['l1']:.4f}" + (f", LPIPS {mean['lpips']:.4f}" if "lpips" in mean else ""))
    write_json(out / "metrics.json", results)
    log(f"metrics -> {out / 'metrics.json'}")
    return results


def _refit(cfg, avatar, data: ActorData, export: VhapExport, split: str, frames: list, checkpoint: str, log):
    """The refitted tracking of a split's scored frames (``lib.train.fit_tracking``), or None when the split
    is not refitted or no other camera shows its timesteps. -> (refinement or None, what metrics.json says
    of the split's tracking: how it was refitted and the split's figures as tracked)"""
    if split not in cfg.test.refit_tracking:
        return None, {"refit": False}
    refit, info = split_refit(cfg, avatar, data, export, split, frames, checkpoint, log)
    if refit is not None:
        info["as_tracked"] = scores = score_frames(avatar, data, frames)
        log(f"{split}: as tracked: PSNR {scores['psnr']:.2f} dB (masked {scores['psnr_masked']:.2f} dB)")
    return refit, info


def _spin(cfg, avatar, data: ActorData, export: VhapExport, out: Path) -> dict:
    timestep = cfg.actor.identity_timestep if cfg.actor.identity_timestep in data.timesteps else data.timesteps[0]
    cam = export.camera_at(timestep, cfg.test.camera)  # where the camera stood for this timestep's sequence
    g = avatar(*data.driving(timestep))
    centre = g.means[0].mean(0)
    viewmats = orbit_viewmats(cam.viewmat, centre, cfg.test.spin_views, cfg.test.spin_yaw_deg).to(centre.device)
    white = torch.tensor(WHITE, device=centre.device)
    with VideoWriter(out / "spin.mp4", cfg.test.fps) as video:
        for k in range(viewmats.shape[0]):
            rgb = to_uint8(render_gaussians(g, 0, viewmats[k:k + 1], cam.K[None].to(centre.device), cam.width,
                                            cam.height, white)[0])
            write_png(out / "spin" / f"{k:03d}.png", rgb)
            video.append(rgb)
    return {"views": video.frames, "yaw_deg": cfg.test.spin_yaw_deg, "timestep": timestep, "camera": cfg.test.camera}
