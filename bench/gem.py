"""Benchmark GEM rendering: coefficients -> Gaussians -> image (lib.models.gem.render_gem: the head
pose is folded into the camera, so GEM adds only its basis products to the rasterizer's work).

CUDA (when present): at H x W = 802 x 550 (NeRSemble), GEM frames per second (evaluate the bases for a new coefficient
vector and the head pose, then gsplat) against gsplat alone rasterizing the same, already evaluated
Gaussians, in one run; goal GEM >= 0.85x the rasterizer's own throughput. Gaussian counts: UV 256
(65,536) and 262,144, with the default component counts (50 / 40 / 40 / 50).
CPU: GEM frames per second at the CPU default resolution (H x W = 200 x 137) with the Gaussian count of the
synthetic head's UV 64 layout (neck removed), through lib/gaussians/render (our compositor).

    .venv/bin/python bench/gem.py [--frames 200] [--cpu-only]
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.gaussians.render import render  # noqa: E402
from lib.geometry.rotations import axis_angle_to_matrix, normalize_quat  # noqa: E402
from lib.models.gem import GaussianEigenModel, GaussianSet, render_gem  # noqa: E402

COMPONENTS = {"positions": 50, "rotations": 40, "scales": 40, "opacities": 50}
HEAD_AXES = (0.075, 0.11, 0.095)  # half extents of the head shell (m)


def uv64_count() -> int:
    """Gaussians of the synthetic head at UV 64: valid texels outside the neck region."""
    from lib.flame.synthetic import build_head_model
    from lib.geometry.uv import texel_map, texel_regions

    head = build_head_model(0)
    tm = texel_map(torch.as_tensor(head.uvs, dtype=torch.float32), torch.as_tensor(head.faces_uv).long(), 64)
    neck = texel_regions({"neck": head.masks["neck"]}, torch.as_tensor(head.faces).long(), tm)["neck"]
    return int((~neck).sum())


def head_sequence(n: int, frames: int, seed: int = 0) -> GaussianSet:
    """`frames` random deformations of N Gaussians on a head shell covering it about once."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    base = dirs * torch.tensor(HEAD_AXES)
    a, b, c = HEAD_AXES
    area = 4 * math.pi * ((a * b) ** 1.6 + (a * c) ** 1.6 + (b * c) ** 1.6) ** (1 / 1.6) / 3 ** (1 / 1.6)
    spacing = math.sqrt(area / n)
    wave = torch.randn(frames, 1, 1, generator=g)
    means = base[None] + 0.003 * wave * torch.randn(1, n, 3, generator=g) + 0.001 * torch.randn(frames, n, 3, generator=g)
    quats = normalize_quat(torch.randn(n, 4, generator=g))[None] + 0.05 * torch.randn(frames, n, 4, generator=g)
    scales = spacing * (0.4 + 0.6 * torch.rand(1, n, 3, generator=g)) * (1 + 0.1 * torch.rand(frames, n, 3, generator=g))
    opacities = (0.5 + 0.4 * torch.rand(1, n, generator=g) + 0.05 * torch.randn(frames, n, generator=g)).clamp(0, 1)
    colors = torch.rand(1, n, 3, generator=g).expand(frames, n, 3)
    return GaussianSet(means, quats, scales, opacities, colors)


def camera(width: int, height: int, device):
    """Frontal camera at 1 m, crown to chin ~60% of the image height (NeRSemble framing)."""
    viewmats = torch.eye(4, device=device)[None].clone()
    viewmats[0, 2, 3] = 1.0
    focal = 0.6 * height / (2 * HEAD_AXES[1])
    Ks = torch.tensor([[[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]]], device=device)
    return viewmats, Ks


def build(n: int, device) -> GaussianEigenModel:
    """A GEM with the default component counts (one more frame than components)."""
    frames = max(COMPONENTS.values()) + 1
    return GaussianEigenModel.fit(head_sequence(n, frames), COMPONENTS).to(device)


def timed(fn, frames: int, device) -> float:
    """Frames per second of fn(i) over `frames` calls (after a warm-up)."""
    for i in range(5):
        fn(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(frames):
        fn(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return frames / (time.perf_counter() - start)


@torch.no_grad()
def bench(n: int, width: int, height: int, frames: int, device) -> tuple[float, float, float]:
    """-> (GEM fps, rasterizer-alone fps, evaluation-alone fps) for N Gaussians."""
    model = build(n, device)
    viewmats, Ks = camera(width, height, device)
    background = torch.ones(3, device=device)
    T = next(iter(model.coefficients.values())).shape[0]
    coeffs = [{a: c[i:i + 1].to(device) for a, c in model.coefficients.items()} for i in range(T)]
    yaw = torch.linspace(-0.3, 0.3, T)
    poses = [(axis_angle_to_matrix(torch.tensor([[0.0, float(y), 0.0]])).to(device), torch.zeros(1, 3, device=device))
             for y in yaw]

    def gem_frame(i):
        return render_gem(model, coeffs[i % T], *poses[i % T], viewmats, Ks, width, height, background).rgb

    evaluated = [model.evaluate(coeffs[i], *poses[i]) for i in range(T)]

    def raster_frame(i):
        g = evaluated[i % T]
        return render(g.means[0], g.quats[0], g.scales[0], g.opacities[0], g.colors[0], viewmats, Ks, width, height,
                      background).rgb

    def eval_frame(i):
        return model.evaluate(coeffs[i % T], *poses[i % T])

    # Interleave the two so that clocks and caches treat them alike; best of three rounds.
    gem_fps, raster_fps = [], []
    for _ in range(3):
        raster_fps.append(timed(raster_frame, frames, device))
        gem_fps.append(timed(gem_frame, frames, device))
    return max(gem_fps), max(raster_fps), timed(eval_frame, frames, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help="frames per timing (CPU: a tenth)")
    parser.add_argument("--cpu-only", action="store_true")
    args = parser.parse_args()

    if torch.cuda.is_available() and not args.cpu_only:
        device = torch.device("cuda")
        print(f"CUDA: {torch.cuda.get_device_name(0)}, H x W = 802 x 550, components {COMPONENTS}")
        for n in (65536, 262144):
            gem_fps, raster_fps, eval_fps = bench(n, 550, 802, args.frames, device)
            print(f"  N={n:7d}: GEM {gem_fps:7.1f} fps ({1e3 / gem_fps:.3f} ms)  gsplat alone {raster_fps:7.1f} fps "
                  f"({1e3 / raster_fps:.3f} ms)  ratio {gem_fps / raster_fps:.3f} (goal >= 0.85); "
                  f"evaluation alone {1e3 / eval_fps:.3f} ms")
    n = uv64_count()
    print(f"CPU ({torch.get_num_threads()} threads), H x W = 200 x 137, UV 64 = {n} Gaussians, components {COMPONENTS}")
    gem_fps, raster_fps, eval_fps = bench(n, 137, 200, max(10, args.frames // 10), torch.device("cpu"))
    print(f"  GEM {gem_fps:.1f} fps ({1e3 / gem_fps:.1f} ms)  renderer alone {raster_fps:.1f} fps "
          f"({1e3 / raster_fps:.1f} ms)  ratio {gem_fps / raster_fps:.3f}; evaluation alone {1e3 / eval_fps:.2f} ms")


if __name__ == "__main__":
    main()
