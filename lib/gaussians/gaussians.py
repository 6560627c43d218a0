"""The record of a set of 3D Gaussians, in the renderer's conventions.

Quaternions wxyz (need not be unit), scales linear (not log), opacities in [0, 1]
(not logits), colours RGB in [0, 1] or spherical-harmonics coefficients [N, K, 3]
(K = (degree + 1)^2, gsplat's basis; colour = max(SH(dir) + 0.5, 0)).
"""

from dataclasses import dataclass, fields

from torch import Tensor


def check_gaussian_shapes(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor,
                          who: str) -> None:
    """ValueError naming ``who`` and the field unless the five tensors describe one set of N Gaussians."""
    n = means.shape[0]
    expected = {"means": (means, (n, 3)), "quats": (quats, (n, 4)), "scales": (scales, (n, 3)),
                "opacities": (opacities, (n,))}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{who}: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    if not (colors.shape[0] == n and colors.shape[-1] == 3 and colors.dim() in (2, 3)):
        raise ValueError(f"{who}: colors has shape {tuple(colors.shape)}, expected [{n}, 3] or [{n}, K, 3]")


@dataclass
class Gaussians:
    means: Tensor  # [N, 3] world, metres
    quats: Tensor  # [N, 4] wxyz
    scales: Tensor  # [N, 3] linear
    opacities: Tensor  # [N]
    colors: Tensor  # [N, 3] RGB, or [N, K, 3] SH coefficients

    def __post_init__(self) -> None:
        check_gaussian_shapes(self.means, self.quats, self.scales, self.opacities, self.colors, "Gaussians")

    def __len__(self) -> int:
        return self.means.shape[0]

    def to(self, *args, **kwargs) -> "Gaussians":
        """Same as Tensor.to on every field (device and/or dtype)."""
        return Gaussians(**{f.name: getattr(self, f.name).to(*args, **kwargs) for f in fields(self)})
