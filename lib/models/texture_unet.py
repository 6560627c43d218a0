"""The Gaussian texture generator: a style-modulated U-Net over UV maps (StyleGAN2-style convs).

Every convolution is modulated by a style vector w that a small MLP computes from a conditioning
vector (here the posed mesh's whitened mesh-PCA coefficients): the input channels are scaled by an
affine function of w and the output is demodulated to unit expected variance (StyleGAN2). Written
in the fused form conv(x * s, W) * d, which equals the per-sample weight W * s * d and lets the
batch share one convolution.

Layout: encoder levels at size, size/2, ... down to 8x8, each ``convs_per_level`` modulated 3x3
convs then 2x average pooling; decoder levels back up (bilinear 2x upsampling, skip concatenation,
modulated convs); a 1x1 output conv. Widths are per level, from the full resolution down to 8x8.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LRELU_GAIN = math.sqrt(2.0)  # keeps unit variance through leaky ReLU(0.2) (StyleGAN2)


class ModulatedConv2d(nn.Module):
    """k x k convolution whose input channels are scaled by an affine map of a style vector."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, style_dim: int, demodulate: bool = True):
        super().__init__()
        # Equalised learning rate: unit-variance weights, scaled by 1/sqrt(fan_in) at run time.
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.affine = nn.Linear(style_dim, in_ch)
        nn.init.zeros_(self.affine.weight)
        nn.init.ones_(self.affine.bias)  # starts as a plain convolution
        self.scale = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.demodulate = demodulate
        self.padding = kernel // 2

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        """x [B, in, H, W], style [B, style_dim] -> [B, out, H, W] (before the activation)."""
        s = self.affine(style)  # [B, in]
        w = self.weight * self.scale
        out = F.conv2d(x * s[:, :, None, None], w, padding=self.padding)
        if self.demodulate:
            # d[b, o] = 1 / |W[o] * s[b]|: sum over in-channels and taps of (W s)^2.
            d = torch.rsqrt((s * s) @ (w * w).sum((2, 3)).T + 1e-8)  # [B, out]
            out = out * d[:, :, None, None]
        return out + self.bias[None, :, None, None]


class _StyledBlock(nn.Module):
    """``n`` modulated 3x3 convs with leaky ReLU."""

    def __init__(self, in_ch: int, out_ch: int, n: int, style_dim: int):
        super().__init__()
        self.convs = nn.ModuleList(
            ModulatedConv2d(in_ch if i == 0 else out_ch, out_ch, 3, style_dim) for i in range(n))

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.leaky_relu(conv(x, style), 0.2) * _LRELU_GAIN
        return x


class TextureUNet(nn.Module):
    """Style-modulated U-Net: (UV input maps, conditioning vector) -> UV output maps.

    The input is the caller's maps concatenated with a learned ``feature_ch``-channel map (one
    free feature vector per texel, shared by all frames).
    """

    def __init__(self, size: int, in_ch: int, out_ch: int, cond_dim: int, widths: list[int],
                 feature_ch: int = 32, style_dim: int = 64, convs_per_level: int = 1):
        super().__init__()
        n_levels = int(round(math.log2(size / 8))) + 1
        if size < 8 or 2 ** (n_levels - 1) * 8 != size:
            raise ValueError(f"UV size {size} must be 8 times a power of two (8, 16, ..., 256)")
        if len(widths) != n_levels:
            raise ValueError(f"regressor.widths needs one width per level from {size} down to 8 "
                             f"({n_levels} values), got {len(widths)}: {widths}")
        self.size = size
        self.features = nn.Parameter(0.1 * torch.randn(feature_ch, size, size))
        self.style = nn.Sequential(nn.Linear(cond_dim, style_dim), nn.LeakyReLU(0.2),
                                   nn.Linear(style_dim, style_dim), nn.LeakyReLU(0.2))
        c = in_ch + feature_ch
        self.encoder = nn.ModuleList()
        for w in widths:
            self.encoder.append(_StyledBlock(c, w, convs_per_level, style_dim))
            c = w
        self.decoder = nn.ModuleList(
            _StyledBlock(widths[i + 1] + widths[i], widths[i], convs_per_level, style_dim)
            for i in reversed(range(n_levels - 1)))
        self.head = nn.Conv2d(widths[0], out_ch, 1)
        # Zero residuals at the start: the avatar begins as its canonical Gaussians on the mesh.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, maps: Tensor, cond: Tensor) -> Tensor:
        """maps [B, in_ch, S, S], cond [B, cond_dim] -> [B, out_ch, S, S]"""
        style = self.style(cond)
        x = torch.cat([maps, self.features[None].expand(maps.shape[0], -1, -1, -1)], 1)
        skips = []
        for i, block in enumerate(self.encoder):
            if i > 0:
                x = F.avg_pool2d(x, 2)
            x = block(x, style)
            skips.append(x)
        for block, skip in zip(self.decoder, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1), style)
        return self.head(x)


class ColourHead(nn.Module):
    """RGB logits per texel from the canonical position map (colour does not change with expression).

    A 3x3 conv stack over the canonical position map and a learned per-texel feature map: the
    position map gives the conv a smooth coordinate frame, the features the texture's detail.
    """

    def __init__(self, size: int, width: int, feature_ch: int = 16):
        super().__init__()
        self.features = nn.Parameter(0.1 * torch.randn(feature_ch, size, size))
        self.net = nn.Sequential(
            nn.Conv2d(3 + feature_ch, width, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 3, 1))

    def forward(self, position_map: Tensor) -> Tensor:
        """position_map [1, 3, S, S] (normalised canonical positions) -> RGB logits [1, 3, S, S]"""
        return self.net(torch.cat([position_map, self.features[None]], 1))
