"""Sweeps of GEM components: one component of one attribute moved from -sigma to +sigma, all others
at the mean, rendered from a dataset camera; written as PNG strips and MP4 videos.

The head is shown in the pose of the actor's identity frame (``actor.identity_timestep``) seen from
the identity camera (``actor.identity_camera``), so a sweep reads like the original images.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from torch import Tensor

from lib.dataset.cameras import Camera
from lib.dataset.vhap import SPLITS, VhapExport
from lib.eval.video import VideoWriter, to_uint8, write_png
from lib.flame.model import FlameModel
from lib.models.gem import ATTRIBUTES, GaussianEigenModel, gem_pose, render_gem


def identity_view(cfg) -> tuple[Camera, Tensor, Tensor]:
    """The identity camera and the identity timestep's GEM pose. -> (camera, R [1, 3, 3], t [1, 3])"""
    export = VhapExport.from_config(cfg)
    flame = FlameModel.from_config(cfg)
    # the camera where it stood in the identity timestep's sequence (each sequence of a union has its own)
    camera = export.camera_at(cfg.actor.identity_timestep, cfg.actor.identity_camera, "actor.identity_camera")
    params = next(export.load_flame(f) for split in SPLITS for f in export.split(split)
                  if f.timestep_index == cfg.actor.identity_timestep)  # camera_at found one
    with torch.no_grad():
        R, t = gem_pose(flame, params)
    return camera, R, t


def sweep_targets(model: GaussianEigenModel, components: int) -> list[tuple[str, int, str]]:
    """(attribute, coefficient index, file stem) of the first ``components`` components of every
    attribute (of every part, with parts)."""
    out = []
    for attr in ATTRIBUTES:
        for index, (part, k) in enumerate(model.component_labels(attr)):
            if k < components:
                stem = f"{attr}_{k:02d}" if part == "all" else f"{attr}_{part}_{k:02d}"
                out.append((attr, index, stem))
    return out


@torch.no_grad()
def sweep_images(model: GaussianEigenModel, attr: str, index: int, values: Tensor, camera: Camera,
                 R: Tensor, t: Tensor, background: Tensor) -> Iterator[Tensor]:
    """Renders with coefficient ``index`` of ``attr`` at each of values [S] (sigma units), the rest
    at the mean, one at a time. R [1, 3, 3], t [1, 3]: GEM pose. -> S images [H, W, 3] in [0, 1]"""
    device = model.colors.device
    viewmats, Ks = camera.viewmat[None].to(device), camera.K[None].to(device)
    for value in values.tolist():
        coeffs = model.zero_coefficients()
        coeffs[attr][0, index] = value
        yield render_gem(model, coeffs, R.to(device), t.to(device), viewmats, Ks, camera.width, camera.height,
                         background.to(device)).rgb[0].clamp(0, 1)


def render_sweep(model: GaussianEigenModel, attr: str, index: int, values: Tensor, camera: Camera,
                 R: Tensor, t: Tensor, background: Tensor) -> Tensor:
    """``sweep_images`` stacked, for a few values (a strip). -> [S, H, W, 3]"""
    return torch.stack(list(sweep_images(model, attr, index, values, camera, R, t, background)))


def write_strip(images: Tensor, values: Tensor, path: Path) -> Path:
    """Images [S, H, W, 3] side by side, each labelled with its coefficient, as one PNG."""
    tiles = to_uint8(images).copy()
    scale = max(0.3, tiles.shape[1] / 400.0)
    for tile, v in zip(tiles, values.tolist()):
        cv2.putText(tile, f"c={v:+.1f}", (3, int(14 * scale / 0.4)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    write_png(path, np.concatenate(list(tiles), axis=1))
    return path


def write_sweeps(model: GaussianEigenModel, camera: Camera, R: Tensor, t: Tensor, out_dir: Path, components: int,
                 sigma: float, strip_steps: int, video_frames: int, fps: int, background: Tensor,
                 log=print) -> list[Path]:
    """A PNG strip (``strip_steps`` values from -sigma to +sigma) and an MP4 (0 -> +sigma -> -sigma
    -> 0, ``video_frames`` frames) per swept component. -> the written paths"""
    strip_values = torch.linspace(-sigma, sigma, strip_steps)
    phase = torch.arange(video_frames, dtype=torch.float32) * (2.0 * math.pi / video_frames)
    video_values = sigma * torch.sin(phase)
    written = []
    for attr, index, stem in sweep_targets(model, components):
        written.append(write_strip(render_sweep(model, attr, index, strip_values, camera, R, t, background),
                                   strip_values, out_dir / f"{stem}.png"))
        with VideoWriter(out_dir / f"{stem}.mp4", fps) as video:
            for image in sweep_images(model, attr, index, video_values, camera, R, t, background):
                video.append(to_uint8(image))
        written.append(video.path)
        log(f"  {stem}: {written[-2].name}, {written[-1].name}")
    return written
