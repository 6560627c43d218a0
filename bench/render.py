"""Benchmark the Gaussian renderer.

CPU: our sparse-pair compositor (lib/gaussians/render.py) against a naive tiled torch
compositor written below (16x16 tiles, every tile padded to the largest per-tile count,
dense cumprod compositing, autograd backward), on head-shell scenes framed like
NeRSemble (crown to chin ~60% of the image height). CUDA (if present): gsplat at
802x550 with 65,536 Gaussians.

    .venv/bin/python bench/render.py [--quick] [--threads N]

Times are wall-clock medians; on a shared machine compare the load averages printed
at the start and the end (other processes on the same cores slow both sides).
"""

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci  # noqa: E402

from lib.gaussians.render import render  # noqa: E402
from lib.gaussians.render_cpu import ALPHA_MAX, ALPHA_MIN, EPS2D, T_MIN  # noqa: E402

HEAD_AXES = (0.075, 0.11, 0.095)  # half extents of the head shell (m): crown to chin 0.22 m
CAMERA_DISTANCE = 1.0  # m


def head_scene(n: int, width: int, height: int, seed: int = 0, device: str = "cpu"):
    """N Gaussians on an ellipsoidal head shell, seen from the front at 1 m.

    Returns means [N,3], quats [N,4], scales [N,3], opacities [N], colors [N,3],
    viewmats [1,4,4], Ks [1,3,3]. Scales follow the shell's Gaussian spacing so that
    the surface is covered about once, as in a trained avatar.
    """
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n, 3, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    means = dirs * torch.tensor(HEAD_AXES)
    a, b, c = HEAD_AXES
    area = 4 * math.pi * ((a * b) ** 1.6 + (a * c) ** 1.6 + (b * c) ** 1.6) ** (1 / 1.6) / 3 ** (1 / 1.6)
    spacing = math.sqrt(area / n)
    scales = spacing * (0.3 + 0.7 * torch.rand(n, 3, generator=g))
    quats = torch.randn(n, 4, generator=g)
    opacities = 0.3 + 0.7 * torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    viewmats = torch.eye(4)[None].clone()
    viewmats[0, 2, 3] = CAMERA_DISTANCE
    focal = 0.6 * height * CAMERA_DISTANCE / (2 * HEAD_AXES[1])
    Ks = torch.tensor([[[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]]])
    return [t.to(device) for t in (means, quats, scales, opacities, colors, viewmats, Ks)]


def tiled_naive(means, quats, scales, opacities, colors, viewmats, Ks, width, height, background, tile=16):
    """The straightforward tiled compositor: one camera, every tile padded to the max count."""
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        means, covars, viewmats, Ks, width, height, eps2d=EPS2D, near_plane=0.01, far_plane=100.0
    )
    radii, means2d, depths, conics = radii[0], means2d[0], depths[0], conics[0]
    tiles_x, tiles_y = math.ceil(width / tile), math.ceil(height / tile)
    with torch.no_grad():
        visible = (radii > 0).all(-1)
        lo = ((means2d - radii) / tile).floor().long()
        hi = ((means2d + radii) / tile).floor().long()
        tx = torch.arange(tiles_x)
        ty = torch.arange(tiles_y)
        hit = (
            visible[None, None]
            & (lo[None, None, :, 0] <= tx[None, :, None]) & (hi[None, None, :, 0] >= tx[None, :, None])
            & (lo[None, None, :, 1] <= ty[:, None, None]) & (hi[None, None, :, 1] >= ty[:, None, None])
        ).reshape(tiles_y * tiles_x, -1)  # [T, N]
        order = torch.argsort(depths, stable=True)
        hit_sorted = hit[:, order]
        counts = hit_sorted.sum(-1)
        width_max = int(counts.max())
        # Stable sort puts each tile's hits first, in depth order; the rest is padding.
        rank = torch.argsort((~hit_sorted).to(torch.int8), dim=1, stable=True)[:, :width_max]
        ids = order[rank]  # [T, L]
        valid = torch.arange(width_max)[None] < counts[:, None]
    ys, xs = torch.meshgrid(torch.arange(tile), torch.arange(tile), indexing="ij")
    tile_y0 = (torch.arange(tiles_y * tiles_x) // tiles_x) * tile
    tile_x0 = (torch.arange(tiles_y * tiles_x) % tiles_x) * tile
    px = (tile_x0[:, None] + xs.reshape(1, -1)).to(means.dtype) + 0.5  # [T, 256]
    py = (tile_y0[:, None] + ys.reshape(1, -1)).to(means.dtype) + 0.5
    m2 = means2d[ids]  # [T, L, 2]
    con = conics[ids]
    dx = m2[:, None, :, 0] - px[:, :, None]  # [T, 256, L]
    dy = m2[:, None, :, 1] - py[:, :, None]
    sigma = 0.5 * (con[:, None, :, 0] * dx**2 + con[:, None, :, 2] * dy**2) + con[:, None, :, 1] * dx * dy
    alpha = (opacities[ids][:, None, :] * torch.exp(-sigma)).clamp_max(ALPHA_MAX)
    alpha = torch.where(valid[:, None, :] & (sigma >= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))
    after = torch.cumprod(1.0 - alpha, dim=-1)
    alpha = torch.where(after > T_MIN, alpha, torch.zeros_like(alpha))
    trans = torch.cumprod(1.0 - alpha, dim=-1)
    weight = alpha * torch.cat([torch.ones_like(trans[..., :1]), trans[..., :-1]], -1)
    rgb = torch.einsum("tpl,tlc->tpc", weight, colors[ids]) + trans[..., -1:] * background
    rgb = rgb.reshape(tiles_y, tiles_x, tile, tile, 3).permute(0, 2, 1, 3, 4).reshape(tiles_y * tile, tiles_x * tile, 3)
    return rgb[None, :height, :width]


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall time and median process CPU time (ms) of fn() over `repeats` runs, after a warm-up.

    With one thread the CPU time is what the run costs on an idle core even when other
    processes share the machine; with more threads it also counts their waiting.
    """
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def cpu_case(n: int, height: int, width: int, repeats: int, with_naive: bool) -> None:
    scene = head_scene(n, width, height)
    means, quats, scales, opacities, colors, viewmats, Ks = scene
    params = [t.clone().requires_grad_() for t in (means, quats, scales, opacities, colors)]
    background = torch.ones(3)
    weights = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(1))

    def ours_fwd():
        with torch.no_grad():
            return render(*params, viewmats, Ks, width, height, background=background).rgb

    def ours_fwd_bwd():
        out = render(*params, viewmats, Ks, width, height, background=background)
        ((out.rgb * weights).sum() + out.alpha.sum()).backward()

    (f, f_cpu), (fb, fb_cpu) = timed(ours_fwd, repeats), timed(ours_fwd_bwd, repeats)
    line = (f"{n:>6} {height:>4}x{width:<4} ours: fwd {f:7.1f} ms  fwd+bwd {fb:7.1f} ms ({1e3 / fb:5.1f} it/s;"
            f" cpu {f_cpu:6.1f} / {fb_cpu:6.1f} ms)")  # fmt: skip
    if with_naive:
        def naive_fwd():
            with torch.no_grad():
                return tiled_naive(*params, viewmats, Ks, width, height, background)

        def naive_fwd_bwd():
            rgb = tiled_naive(*params, viewmats, Ks, width, height, background)
            (rgb * weights).sum().backward()

        diff = (ours_fwd() - naive_fwd()).abs().max().item()
        naive_repeats = max(1, repeats // 2)
        (nf, nf_cpu), (nfb, nfb_cpu) = timed(naive_fwd, naive_repeats), timed(naive_fwd_bwd, naive_repeats)
        line += (
            f" | naive tiled: fwd {nf:7.1f} ms  fwd+bwd {nfb:7.1f} ms (cpu {nf_cpu:6.1f} / {nfb_cpu:6.1f} ms)"
            f" | speed-up fwd {nf / f:5.1f}x  fwd+bwd {nfb / fb:5.1f}x"
            f" (cpu {nf_cpu / f_cpu:5.1f}x / {nfb_cpu / fb_cpu:5.1f}x)"
            f" | max|diff| {diff:.1e}"
        )
    print(line, flush=True)


def cuda_case(n: int, height: int, width: int, repeats: int) -> None:
    means, quats, scales, opacities, colors, viewmats, Ks = head_scene(n, width, height, device="cuda")
    params = [t.clone().requires_grad_() for t in (means, quats, scales, opacities, colors)]
    background = torch.ones(3, device="cuda")

    def fwd():
        with torch.no_grad():
            render(*params, viewmats, Ks, width, height, background=background)
        torch.cuda.synchronize()

    def fwd_bwd():
        out = render(*params, viewmats, Ks, width, height, background=background)
        (out.rgb.sum() + out.alpha.sum()).backward()
        torch.cuda.synchronize()

    f, _ = timed(fwd, repeats * 5)
    fb, _ = timed(fwd_bwd, repeats * 5)
    device = torch.cuda.get_device_name()
    print(f"{n:>6} {height:>4}x{width:<4} gsplat CUDA ({device}): fwd {f:.2f} ms  fwd+bwd {fb:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, skip the largest naive case")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 10
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.2f}; "
          "sizes are HxW; times are medians")  # fmt: skip
    cpu_case(5000, 128, 128, repeats, with_naive=True)
    for n in (5000, 20000):
        for height, width in ((128, 88), (256, 176)):
            naive = not (args.quick and n == 20000 and height == 256)
            cpu_case(n, height, width, repeats, with_naive=naive)
    if torch.cuda.is_available():
        cuda_case(65536, 802, 550, repeats)
    else:
        print("CUDA not available: gsplat case skipped")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
