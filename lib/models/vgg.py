"""VGG16 / VGG19 feature extractors in torchvision's ``features.{i}`` parameter layout.

torchvision is not installable on the CPU path, and nothing may be downloaded at run time: the
network is built here and its weights come from a state_dict file the user supplies (e.g. saved
from ``torchvision.models.vgg19(weights=...)`` on another machine). Without such a file there is
no VGG: callers skip what needs it and say so; random weights are never used for a number.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LAYOUTS = {  # conv widths, "M" = 2x2 max pooling (torchvision's configurations D and E)
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
# Index in ``features`` of the ReLU closing each block (the taps of perceptual losses and LPIPS).
BLOCK_ENDS = {16: (3, 8, 15, 22, 29), 19: (3, 8, 17, 26, 35)}


class VggUnavailable(RuntimeError):
    """No usable VGG weights: the message says why (callers log it and skip)."""


class VggFeatures(nn.Module):
    """The convolutional part of VGG; ``forward`` returns the activations at the block ends."""

    def __init__(self, depth: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _LAYOUTS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers)
        self.taps = BLOCK_ENDS[depth]

    def forward(self, x: Tensor) -> list[Tensor]:
        """x [B, 3, H, W] (already normalised as the weights expect) -> 5 feature maps."""
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
                if len(out) == len(self.taps):
                    break
        return out

    @classmethod
    def from_file(cls, path: str | Path, depth: int) -> "VggFeatures":
        """Load torchvision-layout weights (``features.{i}.weight`` / ``.bias``; other keys ignored)."""
        path = Path(path)
        state = load_weights(path, f"VGG{depth} weights")
        net = cls(depth)
        wanted = {k: v for k, v in state.items() if k.startswith("features.")} if isinstance(state, dict) else {}
        missing = set(net.state_dict()) - set(wanted)
        if missing:
            raise VggUnavailable(f"{path} is not a torchvision VGG{depth} state_dict (missing {sorted(missing)[:3]}...)")
        net.load_state_dict(wanted)
        return net.eval().requires_grad_(False)


class VggPerceptual(nn.Module):
    """Mean L1 between VGG feature maps of two images [B, H, W, 3] in [0, 1] (ImageNet normalisation)."""

    def __init__(self, features: VggFeatures):
        super().__init__()
        self.net = features
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        fa = self.net((a.permute(0, 3, 1, 2) - self.mean) / self.std)
        fb = self.net((b.permute(0, 3, 1, 2) - self.mean) / self.std)
        return sum(F.l1_loss(x, y) for x, y in zip(fa, fb)) / len(fa)


def load_weights(path: Path, what: str):
    """A weights file read safely (``weights_only``); VggUnavailable naming the file if it cannot be."""
    if not path.is_file():
        raise VggUnavailable(f"{what} not found at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise VggUnavailable(f"cannot read {what} {path} ({e})") from None
