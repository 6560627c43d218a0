"""The record of a set of 3D Gaussians, in the renderer's conventions.

Quaternions wxyz (need not be unit), scales linear (not log), opacities in [0, 1]
(not logits), colours RGB in [0, 1] or spherical-harmonics coefficients [N, K, 3]
(K = (degree + 1)^2, gsplat's basis; colour = max(SH(dir) + 0.5, 0)).
"""

from dataclasses import dataclass, fields

from torch import Tensor


@dataclass
class Gaussians:
    means: Tensor  # [N, 3] world, metres
    quats: Tensor  # [N, 4] wxyz
    scales: Tensor  # [N, 3] linear
    opacities: Tensor  # [N]
    colors: Tensor  # [N, 3] RGB, or [N, K, 3] SH coefficients

    def __post_init__(self) -> None:
        n = self.means.shape[0]
        expected = {"means": (n, 3), "quats": (n, 4), "scales": (n, 3), "opacities": (n,)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"Gaussians: {name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")
        if not (self.colors.shape[0] == n and self.colors.shape[-1] == 3 and self.colors.dim() in (2, 3)):
            shape = tuple(self.colors.shape)
            raise ValueError(f"Gaussians: colors has shape {shape}, expected [{n}, 3] or [{n}, K, 3]")

    def __len__(self) -> int:
        return self.means.shape[0]

    def to(self, *args, **kwargs) -> "Gaussians":
        """Same as Tensor.to on every field (device and/or dtype)."""
        return Gaussians(**{f.name: getattr(self, f.name).to(*args, **kwargs) for f in fields(self)})
