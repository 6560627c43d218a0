"""The native CPU renderer (numba projection + compositor) gives the torch reference's images and gradients."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.gaussians import render as render_module
from lib.gaussians import project_numba, render_cpu, render_numba
from lib.gaussians.render import render

ROOT = Path(__file__).resolve().parents[2]
HEAD_AXES = (0.075, 0.11, 0.095)  # half extents of a head shell (m)
PARAMS = ("means", "quats", "scales", "opacities", "colors", "viewmats")


def head_frame(n, width, height, seed=0, n_cams=1, dtype=torch.float32):
    """N Gaussians covering a head shell about once (as a trained avatar's do), seen from the
    front at 1 m with crown to chin ~60% of the image height; extra cameras turn around it."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)
    means = dirs * torch.tensor(HEAD_AXES, dtype=torch.float64)
    a, b, c = HEAD_AXES
    area = 4 * math.pi * ((a * b) ** 1.6 + (a * c) ** 1.6 + (b * c) ** 1.6) ** (1 / 1.6) / 3 ** (1 / 1.6)
    scales = math.sqrt(area / n) * (0.3 + 0.7 * torch.rand(n, 3, generator=g, dtype=torch.float64))
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    opacities = 0.3 + 0.7 * torch.rand(n, generator=g, dtype=torch.float64)
    colors = torch.rand(n, 3, generator=g, dtype=torch.float64)
    viewmats = torch.eye(4, dtype=torch.float64).repeat(n_cams, 1, 1)
    for i in range(n_cams):
        yaw = 0.4 * i
        viewmats[i, 0, 0], viewmats[i, 0, 2] = math.cos(yaw), math.sin(yaw)
        viewmats[i, 2, 0], viewmats[i, 2, 2] = -math.sin(yaw), math.cos(yaw)
        viewmats[i, 2, 3] = 1.0
    focal = 0.6 * height / (2 * HEAD_AXES[1])
    Ks = torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]],
                      dtype=torch.float64).repeat(n_cams, 1, 1)
    return [t.to(dtype) for t in (means, quats, scales, opacities, colors, viewmats, Ks)]


BACKENDS = {"numba": (project_numba.project, render_numba.composite),
            "torch": (render_cpu.project, render_cpu.composite)}


def use(backend, monkeypatch):
    projector, compositor = BACKENDS[backend]
    monkeypatch.setattr(render_module, "cpu_projector", projector)
    monkeypatch.setattr(render_module, "cpu_compositor", compositor)


def render_with(backend, scene, width, height, background, grad=True, monkeypatch=None):
    """Render on one CPU path; -> (images (rgb, alpha, depth), gradients of a fixed loss or None)."""
    use(backend, monkeypatch)
    params = [t.clone().requires_grad_(grad) for t in scene[:6]]
    out = render(*params, scene[6], width, height, background=background)
    if not grad:
        return out, None
    weights = torch.rand(out.rgb.shape[:-1] + (5,), generator=torch.Generator().manual_seed(3)).to(out.rgb)
    loss = (torch.cat([out.rgb, out.alpha, out.depth], -1) * weights).sum()
    return out, torch.autograd.grad(loss, params)


def assert_gradients_close(got, want, name):
    rel = float((got - want).norm() / want.norm())
    cos = float(torch.nn.functional.cosine_similarity(got.flatten().double(), want.flatten().double(), dim=0))
    assert want.norm() > 0, name
    assert rel <= 1e-4 and cos >= 0.9999, f"{name}: relative error {rel:.2e}, cosine {cos:.7f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "n, width, height, n_cams",
    [
        (12808, 137, 200, 1),  # the CPU default: UV 128's Gaussian count at H x W = 200 x 137
        (3000, 110, 160, 3),  # several cameras in one call, each its own tiles
        (2000, 33, 47, 1),  # image sides that are no multiple of the tile
    ],
)
def test_matches_torch_compositor_on_head_frames(n, width, height, n_cams, dtype, monkeypatch):
    scene = head_frame(n, width, height, seed=n, n_cams=n_cams, dtype=dtype)
    background = torch.tensor([1.0, 0.5, 0.25], dtype=dtype)
    ours, our_grads = render_with("numba", scene, width, height, background, monkeypatch=monkeypatch)
    ref, ref_grads = render_with("torch", scene, width, height, background, monkeypatch=monkeypatch)
    assert float(ref.alpha.detach().mean()) > 0.2  # the head is really in the frame
    for got, want in zip(ours, ref):
        diff = (got - want).detach().abs()
        if dtype == torch.float64:
            assert float(diff.max()) <= 1e-8
        else:
            # float32: the native path projects in float64, the reference in float32, so a pair
            # whose alpha lands within rounding of 1/255 (or whose T lands on the 1e-4 cutoff) is
            # kept by one and dropped by the other: a step at a handful of pixels. Everywhere
            # else the images agree to 1e-5.
            assert float((diff > 1e-5).float().mean()) <= 1e-3 and float(diff.mean()) <= 1e-6
    for name, got, want in zip(PARAMS, our_grads, ref_grads):
        assert_gradients_close(got, want, name)


def test_forward_only_path_gives_the_training_path_image(monkeypatch):
    scene = head_frame(4000, 120, 90, seed=1)
    with torch.no_grad():
        fast, _ = render_with("numba", scene, 120, 90, None, grad=False, monkeypatch=monkeypatch)
    full, _ = render_with("numba", scene, 120, 90, None, grad=True, monkeypatch=monkeypatch)
    assert fast.rgb.grad_fn is None and full.rgb.grad_fn is not None
    for got, want in zip(fast, full):
        assert torch.equal(got, want.detach())


def test_one_and_two_threads_give_identical_results_and_leave_torch_threads_alone(monkeypatch):
    scene = head_frame(4000, 120, 90, seed=2)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(render_with("numba", scene, 120, 90, None, monkeypatch=monkeypatch))
            assert torch.get_num_threads() == threads  # the renderer follows torch's count, never sets it
    finally:
        torch.set_num_threads(before)
    (out1, grads1), (out2, grads2) = results
    for a, b in zip(list(out1) + list(grads1), list(out2) + list(grads2)):
        assert torch.equal(a, b)  # per-slot gradient rows: no race, no dependence on the thread count


def test_gradcheck_float64_on_overlapping_gaussians(monkeypatch):
    # A tiny head: overlapping, partly opaque Gaussians across tile borders (tiles are 16 px).
    use("numba", monkeypatch)
    scene = head_frame(12, 24, 20, seed=5, dtype=torch.float64)
    scene[2] = scene[2] * 4.0  # scales: each Gaussian spans several pixels

    def fn(*params):
        out = render(*params, scene[6], 24, 20, background=torch.tensor([0.2, 0.3, 0.4], dtype=torch.float64))
        return out.rgb, out.alpha, out.depth

    params = [t.clone().requires_grad_() for t in scene[:6]]
    # fast mode: random projections of the Jacobian (the full one needs a backward pass per pixel)
    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_without_numba_render_falls_back_to_the_torch_compositor_with_one_message():
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "from lib.gaussians import render, render_cpu\n"
        "assert render.cpu_compositor is render_cpu.composite and render.cpu_projector is render_cpu.project\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "numba" in line]
    assert len(lines) == 1 and "torch compositor" in lines[0], done.stderr


@pytest.mark.parametrize("n_feat", [1, 3, 6])
def test_any_feature_count_matches_the_torch_compositor(n_feat):
    # The native kernel composites 4 channels: fewer are padded, more go to the torch compositor.
    scene = head_frame(500, 40, 56, seed=9, dtype=torch.float64)
    radii, means2d, depths, conics = render_cpu.project(*scene[:3], scene[5], scene[6], 40, 56, 0.3, 0.01, 100.0)
    keep = (radii[0] > 0).all(-1)
    features = torch.rand(int(keep.sum()), n_feat, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    args = (means2d[0][keep], conics[0][keep], scene[3][keep], features.requires_grad_(), depths[0][keep],
            torch.zeros(int(keep.sum()), dtype=torch.long), 1, 40, 56)
    ours, ref = render_numba.composite(*args), render_cpu.composite(*args)
    assert ours[0].shape == (1, 56, 40, n_feat)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    (got,) = torch.autograd.grad(ours[0].sum(), features)
    (want,) = torch.autograd.grad(ref[0].sum(), features)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


def test_tile_lists_are_front_to_back_with_ties_in_index_order_and_bound_their_pairs():
    # Many Gaussians on few depth values, on two cameras: each tile's list holds exactly the boxes that
    # touch it, front to back, ties in index order (gsplat's stable sort), and the pair record's bound is
    # the tile area those boxes cover.
    g = torch.Generator().manual_seed(5)
    n, width, height, n_cams = 6000, 70, 50, 2
    means2d = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) * 1.2 - 5
    conics = torch.stack([torch.full((n,), 0.05), torch.zeros(n), torch.full((n,), 0.08)], -1)
    conics += 0.02 * torch.rand(n, 3, generator=g) * torch.tensor([1.0, 0.0, 1.0])
    opacities = 0.1 + 0.9 * torch.rand(n, generator=g)
    depths = torch.randint(1, 12, (n,), generator=g).float()
    cams = torch.randint(0, n_cams, (n,), generator=g)
    b = render_numba.bin_tiles(means2d, conics, opacities, depths, cams, n_cams, width, height, True)
    tiles_x, tiles_y, tw, th = b.tiles_x, b.tiles_y, render_numba.TILE_W, render_numba.TILE_H
    lists = [[] for _ in range(n_cams * tiles_x * tiles_y)]
    area = [0] * len(lists)
    for i in sorted(range(n), key=lambda i: (float(depths[i]), i)):
        if b.x1[i] < b.x0[i] or b.y1[i] < b.y0[i]:
            continue
        for ty in range(b.y0[i] // th, b.y1[i] // th + 1):
            for tx in range(b.x0[i] // tw, b.x1[i] // tw + 1):
                t = int(cams[i]) * tiles_x * tiles_y + ty * tiles_x + tx
                lists[t].append(i)
                rows = min(b.y1[i], ty * th + th - 1) - max(b.y0[i], ty * th) + 1
                area[t] += rows * (min(b.x1[i], tx * tw + tw - 1) - max(b.x0[i], tx * tw) + 1)
    assert sum(map(len, lists)) > 2 * n  # boxes span several tiles
    assert [b.tile_ids[b.tile_start[t]:b.tile_start[t + 1]].tolist() for t in range(len(lists))] == lists
    assert np.diff(b.pair_start).tolist() == area
    counts = np.diff(b.tile_start)
    assert sorted(b.tiles.tolist()) == np.flatnonzero(counts).tolist()  # every non-empty tile, heaviest first
    assert (np.diff(counts[b.tiles]) <= 0).all()
