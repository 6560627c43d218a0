"""Timings of lib/geometry/rasterize.py at the sizes the pipeline uses.

    .venv/bin/python bench/rasterize.py [--threads 2] [--device cpu] [--repeats 5]

Meshes are lat-long ellipsoids (a head of 10k faces, and head + hair shell + torso, 40k faces)
seen by an OpenCV camera 1 m away framing the head like a NeRSemble view (802 x 550, H x W),
plus UV rasterizations of the head's lat-long layout and a worst case of huge triangles.
Prints the median and the fastest of `repeats` runs.
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import lib  # noqa: E402,F401  (before torch: how its OpenMP threads wait, lib/__init__.py)

import torch

from lib.geometry.rasterize import interpolate, rasterize, rasterize_camera, rasterize_uv


def ellipsoid(n_lat: int, n_lon: int, radii, centre) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lat-long ellipsoid: verts [V, 3], faces [2*n_lat*n_lon, 3] (outward, CCW), uvs [V, 2]."""
    theta = torch.linspace(0, math.pi, n_lat + 1, dtype=torch.float64)
    phi = torch.linspace(0, 2 * math.pi, n_lon + 1, dtype=torch.float64)
    th, ph = torch.meshgrid(theta, phi, indexing="ij")
    unit = torch.stack([th.sin() * ph.sin(), th.cos(), th.sin() * ph.cos()], dim=-1).reshape(-1, 3)
    verts = unit * torch.tensor(radii, dtype=torch.float64) + torch.tensor(centre, dtype=torch.float64)
    uvs = torch.stack([ph / (2 * math.pi), 1 - th / math.pi], dim=-1).reshape(-1, 2)
    i, j = torch.meshgrid(torch.arange(n_lat), torch.arange(n_lon), indexing="ij")
    a = (i * (n_lon + 1) + j).reshape(-1)
    b, c, d = a + n_lon + 1, a + n_lon + 2, a + 1
    faces = torch.cat([torch.stack([a, b, c], -1), torch.stack([a, c, d], -1)])
    return verts.float(), faces, uvs.float()


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median, min) seconds over `repeats` calls after one warm-up; the min is the figure least
    disturbed by other processes on a shared machine."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    head_v, head_f, head_uv = ellipsoid(50, 100, (0.09, 0.12, 0.10), (0.0, 0.0, 0.0))
    parts = [(head_v, head_f)]
    parts.append(ellipsoid(100, 100, (0.10, 0.13, 0.11), (0.0, 0.02, -0.01))[:2])  # hair shell
    parts.append(ellipsoid(50, 100, (0.20, 0.12, 0.12), (0.0, -0.25, -0.02))[:2])  # torso
    all_v, all_f, offset = [], [], 0
    for v, f in parts:
        all_v.append(v)
        all_f.append(f + offset)
        offset += v.shape[0]
    scene_v, scene_f = torch.cat(all_v), torch.cat(all_f)

    def camera(H: int, W: int, n: int):
        f = 2000.0 * H / 802
        K = torch.tensor([[f, 0, W / 2 + 7.0], [0, f, H / 2 - 5.0], [0, 0, 1]]).expand(n, 3, 3)
        views = []
        for k in range(n):
            yaw = math.radians(-20 + 40 * k / max(n - 1, 1))
            R = torch.tensor([[math.cos(yaw), 0, math.sin(yaw)], [0, -1, 0],
                              [math.sin(yaw), 0, -math.cos(yaw)]])  # looks at -z, y flipped: OpenCV
            V = torch.eye(4)
            V[:3, :3] = R
            V[2, 3] = 1.0
            views.append(V)
        return torch.stack(views).to(dev), K.contiguous().to(dev)

    print(f"device={dev} threads={torch.get_num_threads()} torch={torch.__version__}")
    rows = []
    for name, verts, faces in [("head", head_v, head_f), ("head+hair+torso", scene_v, scene_f)]:
        verts, faces = verts.to(dev), faces.to(dev)
        for H, W, n in [(802, 550, 1), (200, 137, 1), (802, 550, 8)]:
            viewmat, K = camera(H, W, n)
            batch = verts[None].expand(n, -1, -1)

            def run():
                frags = rasterize_camera(batch, faces, viewmat, K, H, W)
                sync()
                return frags

            frags = run()
            cover = (frags.pix_to_face[0] >= 0).float().mean().item()
            rows.append((f"camera {name} F={faces.shape[0]} {H}x{W} B={n}", timed(run, args.repeats),
                         f"coverage {cover:.0%}"))
    head_uv, head_f = head_uv.to(dev), head_f.to(dev)
    for size in (64, 128, 256):
        def run_uv():
            frags = rasterize_uv(head_uv, head_f, size)
            sync()
            return frags

        rows.append((f"uv head F={head_f.shape[0]} {size}x{size}", timed(run_uv, args.repeats), ""))
    frags = rasterize_uv(head_uv, head_f, 256)
    posed = head_v.to(dev)[None].expand(8, -1, -1)

    def run_interp():
        out = interpolate(frags, posed, head_f)
        sync()
        return out

    rows.append(("interpolate uv 256, 8 position maps", timed(run_interp, args.repeats), ""))

    # Worst case for candidate pairs: 20 stacked triangles each covering the whole 802 x 550 frame
    # (8.8M pairs, chunked).
    n = 20
    big = torch.tensor([[-5000.0, -5000.0, 1.0], [5000.0, -5000.0, 1.0], [0.0, 5000.0, 1.0]]).repeat(n, 1)
    big[:, 2] += torch.arange(n).repeat_interleave(3)
    big_v, big_f = big[None].to(dev), torch.arange(3 * n, device=dev).view(n, 3)

    def run_big():
        frags = rasterize(big_v, big_f, 802, 550)
        sync()
        return frags

    rows.append(("screen 20 full-frame triangles 802x550", timed(run_big, args.repeats), "8.8M pairs"))
    print(f"{'case':<48} {'median':>9}    {'min':>9}")
    for label, (median, fastest), note in rows:
        print(f"{label:<48} {median * 1e3:9.1f} ms {fastest * 1e3:9.1f} ms  {note}")


if __name__ == "__main__":
    main()
