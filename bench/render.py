"""Benchmark the Gaussian renderer.

CPU: the native renderer render() uses (numba projection + tiled compositor, lib/gaussians/
project_numba.py, render_numba.py) against the torch path it replaced (gsplat's torch projection +
the sparse-pair torch compositor, lib/gaussians/render_cpu.py), on the same head-shell scenes framed
like NeRSemble (crown to chin ~60% of the image height), forward (no gradients) and forward +
backward, with 1 and 2 threads in one run. The 12,808-Gaussian cases are the default actor's size
(UV 128) at the CPU default (H x W = 200 x 137) and NeRSemble (802 x 550) resolutions. `--naive`
adds a naive tiled torch compositor (16x16 tiles padded to the busiest, dense cumprod, autograd).
CUDA (if present): gsplat at 802x550 with 65,536 Gaussians.

    .venv/bin/python bench/render.py [--quick] [--naive] [--threads 1 2] [--cuda-only]

Times are medians of wall clock and of process CPU time; on a shared machine compare the load
averages printed at the start and the end (other processes on the same cores slow both sides).
"""

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lib  # noqa: E402,F401  (before torch: how its OpenMP threads wait, lib/__init__.py)

import torch  # noqa: E402

from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci  # noqa: E402

from lib.gaussians import render as render_module  # noqa: E402
from lib.gaussians import render_cpu  # noqa: E402
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


def use_cpu_path(native: bool) -> None:
    """Point render() at the native CPU path or at the torch one it replaced."""
    import lib.gaussians.project_numba as project_numba
    import lib.gaussians.render_numba as render_numba

    render_module.cpu_projector = project_numba.project if native else render_cpu.project
    render_module.cpu_compositor = render_numba.composite if native else render_cpu.composite


def cpu_case(n: int, height: int, width: int, repeats: int, threads: list[int], with_naive: bool) -> None:
    scene = head_scene(n, width, height)
    means, quats, scales, opacities, colors, viewmats, Ks = scene
    params = [t.clone().requires_grad_() for t in (means, quats, scales, opacities, colors)]
    background = torch.ones(3)
    weights = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(1))

    def fwd():
        with torch.no_grad():
            return render(*params, viewmats, Ks, width, height, background=background).rgb

    def fwd_bwd():
        out = render(*params, viewmats, Ks, width, height, background=background)
        ((out.rgb * weights).sum() + out.alpha.sum()).backward()

    times = {}
    images = {}
    for t in threads:
        torch.set_num_threads(t)
        for native in (True, False):
            use_cpu_path(native)
            images[native] = fwd()
            times[t, native] = timed(fwd, repeats), timed(fwd_bwd, repeats)
    use_cpu_path(True)
    diff = (images[True] - images[False]).abs().max().item()
    for t in threads:
        (f, f_cpu), (fb, fb_cpu) = times[t, True]
        (of, of_cpu), (ofb, ofb_cpu) = times[t, False]
        line = (f"{n:>6} {height:>4}x{width:<4} {t} thr | native: fwd {f:6.1f} ms ({1e3 / f:5.1f} fps)  fwd+bwd"
                f" {fb:6.1f} ms | torch: fwd {of:6.1f} ms  fwd+bwd {ofb:6.1f} ms | native/torch speed-up: fwd"
                f" {of / f:5.1f}x  fwd+bwd {ofb / fb:5.1f}x (cpu time {of_cpu / f_cpu:5.1f}x / {ofb_cpu / fb_cpu:5.1f}x)")
        if t != threads[0]:
            (f1, _), (fb1, _) = times[threads[0], True]
            (of1, _), (ofb1, _) = times[threads[0], False]
            line += (f" | {t} vs {threads[0]} thr: native fwd {f1 / f:4.2f}x fwd+bwd {fb1 / fb:4.2f}x,"
                     f" torch fwd {of1 / of:4.2f}x fwd+bwd {ofb1 / ofb:4.2f}x")
        else:
            line += f" | max|diff| {diff:.1e}"
        print(line, flush=True)
    if with_naive:
        torch.set_num_threads(threads[0])

        def naive_fwd():
            with torch.no_grad():
                return tiled_naive(*params, viewmats, Ks, width, height, background)

        def naive_fwd_bwd():
            rgb = tiled_naive(*params, viewmats, Ks, width, height, background)
            (rgb * weights).sum().backward()

        (f, _), (fb, _) = times[threads[0], True]
        naive_repeats = max(1, repeats // 2)
        (nf, _), (nfb, _) = timed(naive_fwd, naive_repeats), timed(naive_fwd_bwd, naive_repeats)
        print(f"{'':>6} {'':>9} {threads[0]} thr | naive tiled: fwd {nf:7.1f} ms  fwd+bwd {nfb:7.1f} ms"
              f" | native speed-up fwd {nf / f:5.1f}x  fwd+bwd {nfb / fb:5.1f}x"
              f" | max|diff| {(fwd() - naive_fwd()).abs().max().item():.1e}", flush=True)


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
    parser.add_argument("--quick", action="store_true", help="fewer repeats, only the 12,808-Gaussian cases")
    parser.add_argument("--naive", action="store_true", help="also time the naive tiled torch compositor")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts to compare")
    parser.add_argument("--cuda-only", action="store_true", help="only the gsplat case (a GPU machine's time is short)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    print(f"torch {torch.__version__}, threads {args.threads} (cores usable: {len(os.sched_getaffinity(0))}), "
          f"load average {os.getloadavg()[0]:.2f}; sizes are HxW; times are medians")  # fmt: skip
    cases = [(12808, 200, 137), (12808, 802, 550)]
    if not args.quick:
        cases = [(5000, 128, 88), (20000, 256, 176)] + cases
    for n, height, width in cases if not args.cuda_only else ():
        cpu_case(n, height, width, repeats, args.threads, with_naive=args.naive and height <= 256)
    if torch.cuda.is_available():
        cuda_case(65536, 802, 550, repeats)
    else:
        print("CUDA not available: gsplat case skipped")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
