"""One entry point for rendering 3D Gaussians: `render`.

Conventions (project-wide, stated here for the renderer): OpenCV cameras, `viewmats`
world-to-camera [C, 4, 4] (x right, y down, z forward), `Ks` [C, 3, 3] in pixels with
pixel (row i, col j) centred at (j + 0.5, i + 0.5); quaternions wxyz (need not be
unit); scales linear (not log); opacities in [0, 1] (not logits); images [C, H, W, 3].

CUDA tensors go to `gsplat.rasterization`; CPU tensors to `render_cpu.py` (projection),
which follows gsplat's rules (see there), so both give the same image. The CPU's projection
and per-pixel compositing run in native code (`project_numba.py`, `render_numba.py`) when
numba is installed, else in torch (`render_cpu.project` / `composite`, the reference the
tests hold the native ones to).
"""

import sys
from typing import NamedTuple

import torch
from torch import Tensor

from lib.gaussians import render_cpu
from lib.gaussians.gaussians import check_gaussian_shapes
from lib.gaussians.render_cpu import EPS2D, rasterize_cpu

try:
    from lib.gaussians.project_numba import project as cpu_projector
    from lib.gaussians.render_numba import composite as cpu_compositor
except ImportError as error:  # numba is a wheel on every platform torch has; a broken install still renders
    print(f"lib.gaussians.render: numba unavailable ({error}); the CPU renderer uses the torch compositor, "
          "several times slower (pip install numba)", file=sys.stderr)
    cpu_projector, cpu_compositor = render_cpu.project, render_cpu.composite


class RenderOutput(NamedTuple):
    rgb: Tensor  # [C, H, W, 3] composited over the background
    alpha: Tensor  # [C, H, W, 1] accumulated opacity, 1 - final transmittance
    depth: Tensor  # [C, H, W, 1] expected camera z: sum_k w_k z_k / alpha (gsplat "ED")


def render(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] wxyz
    scales: Tensor,  # [N, 3] linear
    opacities: Tensor,  # [N] in [0, 1]
    colors: Tensor,  # [N, 3] RGB, or [N, K, 3] SH coefficients
    viewmats: Tensor,  # [C, 4, 4] world-to-camera
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    background: Tensor | None = None,  # [3] or [C, 3]; None = black
    sh_degree: int | None = None,
    near: float = 0.01,
    far: float = 100.0,
) -> RenderOutput:
    """Render N Gaussians into C cameras.

    With SH coefficients, `sh_degree` (0..3) picks how many bands are used (default:
    all K = (d + 1)^2 of them) and the colour is max(SH(dir) + 0.5, 0) with dir from the
    camera centre to the Gaussian, as in gsplat.
    """
    n = means.shape[0]
    n_cams = viewmats.shape[0]
    _check_shapes(means, quats, scales, opacities, colors, viewmats, Ks)
    if colors.dim() == 3 and sh_degree is None:
        sh_degree = round(colors.shape[1] ** 0.5) - 1
        if (sh_degree + 1) ** 2 != colors.shape[1]:
            raise ValueError(
                f"render: colors has {colors.shape[1]} SH coefficients per channel, not a square "
                "number; pass sh_degree explicitly"
            )
    if colors.dim() == 2 and sh_degree is not None:
        raise ValueError("render: sh_degree was given but colors is [N, 3] RGB; pass SH coefficients [N, K, 3]")
    if sh_degree is not None and (sh_degree + 1) ** 2 > colors.shape[1]:
        raise ValueError(
            f"render: sh_degree {sh_degree} needs {(sh_degree + 1) ** 2} coefficients, colors has {colors.shape[1]}"
        )
    if background is not None:
        background = background.to(means).expand(n_cams, 3)

    if n == 0:  # answered here for both devices: no kernel launches on empty inputs
        zeros = means.new_zeros(n_cams, height, width, 1)
        rgb = zeros.expand(n_cams, height, width, 3) if background is None else (
            background[:, None, None, :].expand(n_cams, height, width, 3)
        )
        return RenderOutput(rgb=rgb.clone(), alpha=zeros, depth=zeros.clone())
    if means.is_cuda:
        from gsplat import rasterization

        out, alpha, _ = rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            near_plane=near, far_plane=far, eps2d=EPS2D, sh_degree=sh_degree, packed=False,
            backgrounds=background, render_mode="RGB+ED", rasterize_mode="classic",
        )
        return RenderOutput(rgb=out[..., :3], alpha=alpha, depth=out[..., 3:4])
    rgb, alpha, depth = rasterize_cpu(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        background, sh_degree, near, far, projector=cpu_projector, compositor=cpu_compositor,
    )
    return RenderOutput(rgb=rgb, alpha=alpha, depth=depth)


def warm_up(device: torch.device) -> None:
    """Have the CPU path's native kernels ready now: numba loads them from its cache on first use
    (~0.6 s) or, on a fresh install, compiles them (~15 s). Call before a time budget's clock
    starts, so that the budget is not spent there. A no-op on CUDA and on the torch fallback."""
    if device.type != "cpu" or cpu_compositor is render_cpu.composite:
        return
    # One Gaussian 1 m in front of a 4 x 4 camera, in training's dtype, with and without gradients.
    viewmats = torch.eye(4)[None]
    Ks = torch.tensor([[[4.0, 0.0, 2.0], [0.0, 4.0, 2.0], [0.0, 0.0, 1.0]]])
    params = [torch.tensor(v).requires_grad_() for v in
              ([[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0, 0.0]], [[0.2, 0.2, 0.2]], [0.5], [[0.5, 0.5, 0.5]])]
    render(*params, viewmats, Ks, 4, 4).rgb.sum().backward()
    with torch.no_grad():
        render(*params, viewmats, Ks, 4, 4)


def _check_shapes(means, quats, scales, opacities, colors, viewmats, Ks) -> None:
    check_gaussian_shapes(means, quats, scales, opacities, colors, "render")
    C = viewmats.shape[0]
    for name, tensor, shape in (("viewmats", viewmats, (C, 4, 4)), ("Ks", Ks, (C, 3, 3))):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"render: {name} has shape {tuple(tensor.shape)}, expected {shape}")
