"""Image quality metrics. Images [H, W, 3] in [0, 1]; masks [H, W].

PSNR = 20 log10(1 / RMSE) over the full frame (the field's protocol: composited on white) and
inside the head mask, because a white background that fills most of the frame inflates the
full-frame figure. The head mask is the ground truth's head alpha a·k (foreground alpha of the export
times the keep mask, ``lib.train.data.Sample.alpha``); a pixel counts as inside when a·k > 0.5: kept
(not neck or torso) and at least half opaque, so a soft hair edge counts where it is mostly hair.

SSIM is the 3DGS / GaussianAvatars figure: 11-px Gaussian window, sigma 1.5, zero padding, mean over
the full image (``lib.train.losses.ssim(padding="zero")``); the training loss keeps the 'valid' one.
"""
from __future__ import annotations

import math

from torch import Tensor

from lib.train.losses import ssim


def psnr(pred: Tensor, gt: Tensor, mask: Tensor | None = None) -> float:
    """PSNR in dB over all pixels, or over the pixels where mask > 0.5 (all channels)."""
    err = (pred.float() - gt.float()).pow(2)
    if mask is not None:
        inside = mask > 0.5
        if not inside.any():
            return float("nan")
        err = err[inside]
    mse = float(err.mean())
    return float("inf") if mse == 0 else -10.0 * math.log10(mse)


def image_metrics(pred: Tensor, gt: Tensor, mask: Tensor) -> dict[str, float]:
    """psnr (full frame), psnr_masked (inside mask > 0.5), ssim (zero-padded), l1 of one image."""
    return {
        "psnr": psnr(pred, gt),
        "psnr_masked": psnr(pred, gt, mask),
        "ssim": float(ssim(pred[None].float(), gt[None].float(), padding="zero")),
        "l1": float((pred.float() - gt.float()).abs().mean()),
    }
