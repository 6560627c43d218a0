"""Photometric losses and regularisers of the regressor (METHOD.md, stage 2).

Images are [B, H, W, 3] in [0, 1] (the project's layout); masks [B, H, W] in [0, 1].

    loss = w_l1 · mean(weight · |render - gt|),  weight = 1 + w_mouth · blur(mouth mask)
         + w_ssim · (1 - SSIM(render, gt))       (11-px Gaussian window, sigma 1.5, 'valid' border)
         + w_alpha · mean|alpha - fg · keep|     (the render's opacity against the head's alpha)
         + w_vgg · VGG feature L1                (only with a weights file, see lib.models.vgg)
         + w_pos · mean(Δposition²)              (metres, as FLAME)
         + w_scale · mean(scale²)                (metres)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kernel(size: int, sigma: float, dtype=torch.float32, device=None) -> Tensor:
    """Normalised 1D Gaussian window. -> [size]"""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur(images: Tensor, size: int, sigma: float) -> Tensor:
    """Separable Gaussian blur of [B, C, H, W] with zero padding ('same' size)."""
    k = gaussian_kernel(size, sigma, images.dtype, images.device)
    C = images.shape[1]
    x = F.conv2d(images, k.view(1, 1, 1, -1).expand(C, 1, 1, size), padding=(0, size // 2), groups=C)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, size, 1), padding=(size // 2, 0), groups=C)


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5, reduce: bool = True,
         padding: str = "valid") -> Tensor:
    """SSIM of images [B, H, W, 3] in [0, 1] with a Gaussian window (C1/C2 of Wang et al.).

    padding="valid": the local statistics only where the window lies inside the image (the training
    loss's SSIM). padding="zero": the window slides over every pixel of a zero-padded image and the map
    is averaged over the full image, as 3DGS and GaussianAvatars compute their reported SSIM; every SSIM
    written to a metrics file is this one (``lib.train.metrics``). The two differ near the border.
    reduce=True -> mean over everything (scalar); False -> per image [B].
    """
    if padding not in ("valid", "zero"):
        raise ValueError(f"padding must be 'valid' or 'zero', got {padding!r}")
    x, y = a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    k = gaussian_kernel(window, sigma, x.dtype, x.device)
    C = x.shape[1]
    pad = window // 2 if padding == "zero" else 0

    def filt(img: Tensor) -> Tensor:  # separable filtering; with zero padding it equals the 2-D window's
        img = F.conv2d(img, k.view(1, 1, 1, -1).expand(C, 1, 1, window), padding=(0, pad), groups=C)
        return F.conv2d(img, k.view(1, 1, -1, 1).expand(C, 1, window, 1), padding=(pad, 0), groups=C)

    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean() if reduce else s.flatten(1).mean(1)


def mouth_weight(mouth: Tensor, strength: float, blur_px: int) -> Tensor:
    """Per-pixel L1 weight 1 + strength · blurred mouth mask. mouth [B, H, W] -> [B, H, W]"""
    if strength == 0:
        return torch.ones_like(mouth)
    size = 2 * blur_px + 1
    soft = blur(mouth[:, None], size, max(blur_px / 2, 0.5))[:, 0]
    return 1.0 + strength * soft


def composite_gt(image: Tensor, fg: Tensor, keep: Tensor, background: Tensor) -> Tensor:
    """Ground truth of the kept head on a background.

    image [B, H, W, 3]: the export's image, already composited on white with its foreground alpha a,
    I = F·a + (1 - a); fg [B, H, W]: that alpha a; keep [B, H, W]: the keep mask k (1 on the head,
    0 on neck and torso, ``lib.dataset.masks``); background [B, 3] -> [B, H, W, 3]

        GT = k · (I - (1 - a) · (1 - bg)) + (1 - k) · bg

    i.e. F·a + bg·(1 - a) where the head is kept (the foreground re-composited on bg, soft edges
    exact) and bg where it is removed. On white (bg = 1) it is the export's image where kept.
    """
    a, k = fg[..., None], keep[..., None]
    bg = background[:, None, None, :]
    return k * (image - (1 - a) * (1 - bg)) + (1 - k) * bg


def photometric(render: Tensor, gt: Tensor, weight: Tensor, w_l1: float, w_ssim: float) -> dict[str, Tensor]:
    """Weighted L1 and 1 - SSIM terms (already multiplied by their weights)."""
    l1 = (weight[..., None] * (render - gt).abs()).mean()
    out = {"l1": w_l1 * l1}
    if w_ssim > 0:
        out["ssim"] = w_ssim * (1 - ssim(render, gt))
    return out


def alpha_l1(alpha: Tensor, target: Tensor, w_alpha: float) -> dict[str, Tensor]:
    """w_alpha · mean |alpha - target|: the render's accumulated opacity [B, H, W, 1] against the head's
    alpha fg · keep [B, H, W]; no term when the weight is 0."""
    if w_alpha == 0:
        return {}
    return {"alpha": w_alpha * (alpha[..., 0] - target).abs().mean()}


def regularisers(position_residual: Tensor, scales: Tensor, w_pos: float, w_scale: float) -> dict[str, Tensor]:
    """w_pos · mean(Δposition²) and w_scale · mean(scale²); metres."""
    return {"position": w_pos * position_residual.pow(2).mean(), "scale": w_scale * scales.pow(2).mean()}
