"""Rendering an avatar's Gaussians into dataset cameras, and scoring the renders."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lib.dataset.vhap import Frame
from lib.gaussians.render import RenderOutput, render
from lib.models.avatar import Gaussians
from lib.train.metrics import image_metrics

WHITE = (1.0, 1.0, 1.0)  # evaluation background: the exports' own


def render_set(g: Gaussians, b: int, viewmats: Tensor, Ks: Tensor, width: int, height: int,
               background: Tensor) -> RenderOutput:
    """Set ``b`` of a Gaussians batch into cameras viewmats [C, 4, 4], Ks [C, 3, 3]: RGB, alpha and depth."""
    return render(g.means[b], g.quats[b], g.scales[b], g.opacities[b], g.colors[b], viewmats, Ks,
                  width, height, background)


def render_gaussians(g: Gaussians, b: int, viewmats: Tensor, Ks: Tensor, width: int, height: int,
                     background: Tensor) -> Tensor:
    """``render_set``'s RGB [C, H, W, 3]."""
    return render_set(g, b, viewmats, Ks, width, height, background).rgb


@torch.no_grad()
def render_frame(avatar, data, frame: Frame, refinement=None) -> tuple[Tensor, Tensor, Tensor]:
    """Render one dataset frame on white. -> (render [H, W, 3], ground truth [H, W, 3], head alpha [H, W])

    On white the ground truth is the export's image where the head is kept and white elsewhere
    (``Sample.ground_truth``); the head alpha fg · keep is the masked metrics' mask. refinement: FLAME
    corrections being learnt (the training curve), for ``ActorData.driving``."""
    sample = data.sample(frame)
    white = torch.tensor(WHITE, device=sample.image.device)
    g = avatar(*data.driving(frame.timestep_index, refinement))
    rgb = render_gaussians(g, 0, sample.viewmat[None], sample.K[None], frame.camera.width, frame.camera.height,
                           white)[0].clamp(0, 1)
    gt = sample.ground_truth(white)[0]
    return rgb, gt, sample.alpha


@torch.no_grad()
def score_frames(avatar, data, frames: list[Frame], refinement=None) -> dict[str, float]:
    """Mean metrics (psnr, psnr_masked, ssim, l1) over frames rendered on white."""
    rows = [image_metrics(*render_frame(avatar, data, f, refinement)) for f in frames]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
