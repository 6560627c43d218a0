"""LPIPS (Zhang et al. 2018, VGG variant, v0.1) from user-supplied weight files.

    d(x, y) = sum_l mean_hw( w_l · (f̂_l(x) - f̂_l(y))² ),  f̂ = channel-normalised VGG16 features

at the five block ends of VGG16; inputs are mapped to [-1, 1] and then shifted/scaled per channel
as the LPIPS weights expect. Two files are needed, neither downloadable here: the VGG16 backbone
(torchvision layout) and the linear layers (``lin{0..4}.model.1.weight``, the lpips package's
``weights/v0.1/vgg.pth``). ``load_lpips`` raises VggUnavailable with the reason when either is
missing, and the caller reports LPIPS as unavailable rather than computing it with other weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lib.models.vgg import VggFeatures, VggUnavailable, load_weights

_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_CHANNELS = (64, 128, 256, 512, 512)


class Lpips(nn.Module):
    def __init__(self, backbone: VggFeatures, lin_weights: list[Tensor]):
        super().__init__()
        self.net = backbone
        self.lins = nn.ParameterList([nn.Parameter(w.reshape(1, -1, 1, 1), requires_grad=False) for w in lin_weights])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """a, b [B, H, W, 3] in [0, 1] -> [B] distances."""
        def feats(x):
            x = (x.permute(0, 3, 1, 2) * 2 - 1 - self.shift) / self.scale
            return [f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for f in self.net(x)]
        return sum(((fa - fb).pow(2) * w).sum(1).mean((1, 2)) for fa, fb, w in zip(feats(a), feats(b), self.lins))


def load_lpips(backbone_path: str, lin_path: str) -> Lpips:
    """LPIPS from the two files (paths may be empty strings = not configured)."""
    if not backbone_path or not lin_path:
        raise VggUnavailable("LPIPS weights are not configured (test.lpips_backbone: a torchvision VGG16 "
                             "state_dict; test.lpips_weights: the lpips package's v0.1 vgg.pth); nothing "
                             "may be downloaded at run time")
    backbone = VggFeatures.from_file(backbone_path, 16)
    path = Path(lin_path)
    state = load_weights(path, "LPIPS linear weights")
    keys = [f"lin{i}.model.1.weight" for i in range(5)]
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise VggUnavailable(f"{path} has no {keys[0]} ... {keys[-1]}: not LPIPS v0.1 VGG weights")
    weights = [state[k].float() for k in keys]
    if [w.numel() for w in weights] != list(_CHANNELS):
        raise VggUnavailable(f"{path}: linear layers of sizes {[w.numel() for w in weights]}, expected {_CHANNELS}")
    return Lpips(backbone, weights).eval()
