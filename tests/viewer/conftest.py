"""A small GEM of a head-sized ellipsoid of Gaussians, for the viewer tests."""
import math

import pytest
import torch

from lib.models.gem import GaussianEigenModel, GaussianSet


def ellipsoid_gem(n: int = 2000, frames: int = 8, seed: int = 0) -> GaussianEigenModel:
    """A GEM of ``ellipsoid_frames``."""
    return GaussianEigenModel.fit(ellipsoid_frames(n, frames, seed), {"positions": 4, "rotations": 3, "scales": 3,
                                                                      "opacities": 3})


def ellipsoid_frames(n: int = 2000, frames: int = 8, seed: int = 0) -> GaussianSet:
    """Gaussians on an ellipsoid (9 x 11 x 10 cm) around (0, 0.02, 0); the sequence widens and
    lifts it, so positions component 0 visibly changes the head. Colours vary with height."""
    g = torch.Generator().manual_seed(seed)
    k = torch.arange(n, dtype=torch.float32) + 0.5
    polar = torch.acos(1 - 2 * k / n)
    azimuth = math.pi * (1 + 5 ** 0.5) * k  # Fibonacci sphere: even coverage
    unit = torch.stack([polar.sin() * azimuth.cos(), polar.cos(), polar.sin() * azimuth.sin()], -1)
    base = unit * torch.tensor([0.09, 0.11, 0.10]) + torch.tensor([0.0, 0.02, 0.0])
    widen = torch.linspace(-1.0, 1.0, frames)
    lift = torch.randn(frames, generator=g)
    means = (base[None] * (1 + 0.25 * widen[:, None, None] * torch.tensor([1.0, 0.0, 0.0]))
             + 0.01 * lift[:, None, None] * torch.tensor([0.0, 1.0, 0.0]))
    colors = torch.stack([0.85 - 0.3 * unit[:, 1], 0.55 + 0.2 * unit[:, 0], 0.4 + 0.0 * unit[:, 2]], -1)
    T = frames
    return GaussianSet(
        means=means,
        quats=torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(T, n, 4) + 0.01 * torch.randn(T, n, 4, generator=g),
        scales=torch.full((T, n, 3), 0.008 * (2000 / n) ** 0.5) + 0.001 * torch.rand(T, n, 3, generator=g),
        opacities=torch.full((T, n), 0.9) - 0.1 * torch.rand(T, n, generator=g),
        colors=colors.clamp(0, 1).expand(T, n, 3),
    )


@pytest.fixture(scope="module")
def head_gem() -> GaussianEigenModel:
    return ellipsoid_gem()


@pytest.fixture(scope="module")
def small_head_gem() -> GaussianEigenModel:
    """Fewer, larger Gaussians: cheap to render on the CPU."""
    return ellipsoid_gem(n=600)


@pytest.fixture(scope="module")
def parts_gem() -> GaussianEigenModel:
    """The ellipsoid with a basis per half (lower, upper): two blocks per attribute."""
    frames = ellipsoid_frames(n=1500)
    labels = (frames.means[0, :, 1] > 0.02).long()
    return GaussianEigenModel.fit(frames, {"positions": 3, "rotations": 2, "scales": 2, "opacities": 2},
                                  parts=(["lower", "upper"], labels))
