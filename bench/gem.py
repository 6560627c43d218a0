"""Benchmark GEM rendering: coefficients -> Gaussians -> image (lib.models.gem.render_gem: the head
pose is folded into the camera, so GEM adds only its basis products to the rasterizer's work).

CUDA (when present): at H x W = 802 x 550 (NeRSemble), GEM frames per second (evaluate the bases for a new coefficient
vector and the head pose, then gsplat) against gsplat alone rasterizing the same, already evaluated
Gaussians, in one run; goal GEM >= 0.85x the rasterizer's own throughput. Gaussian counts: UV 256
(65,536) and 262,144, with the default component counts (50 / 40 / 40 / 50).
CPU: a GEM the size of the default actor's (the synthetic head's UV 128 layout without the neck:
12,808 Gaussians), fitted to frames of that head's canonical Gaussians (placed, oriented and sized as
the regressor starts them, configs/default.yml) with small random deformations; GEM frames per
second at NeRSemble's H x W = 802 x 550 and the CPU default 200 x 137, through the native CPU path
render() uses and through the torch path it replaced, with 1 and 2 threads, in one run.

With --config CONFIG [overrides]: the trained GEM of that config's run instead (its fitted frames'
coefficients, the identity frame's pose and camera, scaled to each resolution), e.g. the default actor's
after ./run.sh: --config configs/default.yml. With --parts, the native path's frame split into its parts
(basis product, projection, binning, compositing kernel; the rest is glue), per resolution and thread count.

    .venv/bin/python bench/gem.py [--frames 200] [--cpu-only | --cuda-only] [--threads 1 2] [--parts] [--config CONFIG [overrides]]
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lib  # noqa: E402,F401  (before torch: how its OpenMP threads wait, lib/__init__.py)

import torch  # noqa: E402

from lib.gaussians.render import render  # noqa: E402
from lib.geometry.rotations import axis_angle_to_matrix, normalize_quat  # noqa: E402
from lib.models.gem import GaussianEigenModel, GaussianSet, pose_viewmats, render_gem  # noqa: E402

COMPONENTS = {"positions": 50, "rotations": 40, "scales": 40, "opacities": 50}
HEAD_AXES = (0.075, 0.11, 0.095)  # half extents of the head shell (m)


def synthetic_gaussians(uv_size: int, init_scale: float = 0.5, seed: int = 0) -> GaussianSet:
    """The synthetic head's canonical Gaussians at ``uv_size`` (neck removed), one frame:
    surface points, tangent frames, k-NN scales x init_scale, opacity 0.7, random colours."""
    from lib.flame.synthetic import build_head_model
    from lib.geometry.rotations import matrix_to_quat
    from lib.geometry.uv import knn_log_scale, surface_points, texel_frames, texel_map, texel_regions

    head = build_head_model(0)
    uvs, faces_uv = torch.as_tensor(head.uvs, dtype=torch.float32), torch.as_tensor(head.faces_uv).long()
    faces = torch.as_tensor(head.faces).long()
    full = texel_map(uvs, faces_uv, uv_size)
    tm = full.subset(~texel_regions({"neck": head.masks["neck"]}, faces, full)["neck"])
    verts = torch.as_tensor(head.v_template, dtype=torch.float32)[None]
    means = surface_points(verts, faces, tm)[0]
    quats = matrix_to_quat(texel_frames(verts, faces, uvs, faces_uv, tm)[0])
    scales = (knn_log_scale(means).float().exp() * init_scale)[:, None].expand(-1, 3)
    n = means.shape[0]
    colors = torch.rand(n, 3, generator=torch.Generator().manual_seed(seed))
    return GaussianSet(means[None], quats[None], scales[None].contiguous(), torch.full((1, n), 0.7), colors[None])


def deformed(base: GaussianSet, frames: int, seed: int = 0) -> GaussianSet:
    """``frames`` small random deformations of one set of Gaussians (a stand-in for expressions)."""
    g = torch.Generator().manual_seed(seed)
    n = base.means.shape[1]
    spacing = float(base.scales.mean())
    wave = torch.randn(frames, 1, 1, generator=g)
    means = base.means + spacing * (wave * torch.randn(1, n, 3, generator=g) + 0.3 * torch.randn(frames, n, 3, generator=g))
    quats = normalize_quat(base.quats + 0.05 * torch.randn(frames, n, 4, generator=g))
    scales = base.scales * (1 + 0.1 * torch.rand(frames, n, 3, generator=g))
    opacities = (base.opacities + 0.05 * torch.randn(frames, n, generator=g)).clamp(0, 1)
    return GaussianSet(means, quats, scales, opacities, base.colors.expand(frames, n, 3))


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


def camera(width: int, height: int, device, centre=(0.0, 0.0, 0.0), half_height: float = HEAD_AXES[1]):
    """Frontal camera 1 m in front of ``centre`` (looking along +z), crown to chin (2 x half_height)
    ~60% of the image height (NeRSemble framing)."""
    viewmats = torch.eye(4, device=device)[None].clone()
    viewmats[0, :3, 3] = -torch.tensor(centre, device=device) + torch.tensor([0.0, 0.0, 1.0], device=device)
    focal = 0.6 * height / (2 * half_height)
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


def graphed_evaluation(model: GaussianEigenModel, coeffs: dict, R, t, viewmats):
    """GEM's part of a frame (bases -> Gaussians, the pose folded into the cameras) captured as one CUDA
    graph: a replay is one launch where the eager evaluation launches a kernel per operation.
    -> fn(coeffs, R, t) -> (GaussianSet, posed viewmats), outputs overwritten by the next call"""
    inputs = ({a: c.clone() for a, c in coeffs.items()}, R.clone(), t.clone())

    def part():
        c, r, tt = inputs
        return model.reconstruct(c), pose_viewmats(viewmats, r[0], tt[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (fills the model's scaled-basis cache)
        for _ in range(3):
            part()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = part()

    def run(c, r, tt):
        for a, value in c.items():
            inputs[0][a].copy_(value)
        inputs[1].copy_(r)
        inputs[2].copy_(tt)
        graph.replay()
        return out
    return run


@torch.no_grad()
def bench(n: int, width: int, height: int, frames: int, device) -> tuple[float, float, float, float | None]:
    """-> (GEM fps, rasterizer-alone fps, evaluation-alone fps, GEM fps with its evaluation as a CUDA graph
    (None where capture failed)) for N Gaussians."""
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
    graphed = None
    try:
        evaluation = graphed_evaluation(model, coeffs[0], *poses[0], viewmats)

        def graphed_frame(i):
            g, posed = evaluation(coeffs[i % T], *poses[i % T])
            return render(g.means[0], g.quats[0], g.scales[0], g.opacities[0], g.colors[0], posed, Ks, width, height,
                          background).rgb
        worst = max((graphed_frame(i) - gem_frame(i)).abs().max().item() for i in range(3))
        print(f"  N={n:7d}: GEM with a graphed evaluation differs from the eager frame by {worst:.1e} at most")
        graphed = max(timed(graphed_frame, frames, device) for _ in range(3))
    except Exception as e:  # a capture that fails says why; the eager figures stand
        print(f"  N={n:7d}: CUDA graph capture failed: {type(e).__name__}: {e}")
    return max(gem_fps), max(raster_fps), timed(eval_frame, frames, device), graphed


def use_cpu_path(native: bool) -> None:
    """Point render() at the native CPU path or at the torch one it replaced."""
    from lib.gaussians import project_numba, render_cpu, render_numba
    from lib.gaussians import render as render_module

    render_module.cpu_projector = project_numba.project if native else render_cpu.project
    render_module.cpu_compositor = render_numba.composite if native else render_cpu.composite


def synthetic_scene():
    """A GEM of the default actor's size fitted to deformed canonical Gaussians, a turning head pose
    per frame and a camera facing it. -> (model, poses, viewmat [4, 4], Ks(height, width), description)"""
    base = synthetic_gaussians(128)
    model = GaussianEigenModel.fit(deformed(base, max(COMPONENTS.values()) + 1), COMPONENTS)
    T = next(iter(model.coefficients.values())).shape[0]
    poses = [(axis_angle_to_matrix(torch.tensor([[0.0, float(y), 0.0]])), torch.zeros(1, 3))
             for y in torch.linspace(-0.3, 0.3, T)]
    pts = base.means[0]
    centre = pts.mean(0)
    half_height = float(pts[:, 1].max() - pts[:, 1].min()) / 2
    # Facing the head (FLAME: y up, the face looks along +z): OpenCV camera 1 m in front, y down.
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
    viewmat = torch.eye(4)
    viewmat[:3, :3] = flip
    viewmat[:3, 3] = -flip @ (centre + torch.tensor([0.0, 0.0, 1.0]))

    def Ks(height, width):
        focal = 0.6 * height / (2 * half_height)
        return torch.tensor([[[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]]])

    return model, poses, viewmat, Ks, (f"GEM of the default actor's size ({base.means.shape[1]} Gaussians, synthetic "
                                       f"head UV 128 without the neck), components {COMPONENTS}")


def trained_scene(config: list[str]):
    """The trained GEM of a config's run, the identity frame's pose and camera (scaled to each resolution)."""
    from lib.config import load_config
    from lib.paths import ActorPaths
    from lib.viewer.sweeps import identity_view

    cfg = load_config(config[0], config[1:])
    path = ActorPaths(cfg).gem
    model = GaussianEigenModel.load(path)
    camera, R, t = identity_view(cfg)

    def Ks(height, width):
        K = camera.K.clone()
        K[0] *= width / camera.width
        K[1] *= height / camera.height
        return K[None]

    components = {a: model.n_components(a) for a in COMPONENTS}
    return model, [(R, t)], camera.viewmat, Ks, f"trained GEM {path} ({model.n_gaussians} Gaussians), components {components}"


@torch.no_grad()
def cpu_bench(threads: list[int], quick: bool, config: list[str] | None = None) -> None:
    """GEM frames per second on the CPU: native vs torch path, per resolution and thread count."""
    cpu = torch.device("cpu")
    model, poses, viewmat, Ks_at, what = trained_scene(config) if config else synthetic_scene()
    T = next(iter(model.coefficients.values())).shape[0]
    coeffs = [{a: c[i:i + 1] for a, c in model.coefficients.items()} for i in range(T)]
    background = torch.ones(3)
    print(f"CPU: {what}; cores usable {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.2f}")
    for height, width in ((802, 550), (200, 137)):
        Ks = Ks_at(height, width)

        def gem_frame(i):
            return render_gem(model, coeffs[i % T], *poses[i % len(poses)], viewmat[None], Ks, width, height, background)

        fps = {}
        for t in threads:
            torch.set_num_threads(t)
            for native in (True, False):
                use_cpu_path(native)
                frames = (40 if native else 8) if height > 200 else (80 if native else 30)
                frames = max(3, frames // 4) if quick else frames
                fps[t, native] = max(timed(gem_frame, frames, cpu) for _ in range(2))  # best of two rounds
        use_cpu_path(True)
        coverage = float(gem_frame(0).alpha.mean())
        for t in threads:
            line = (f"  H x W = {height} x {width} (head covers {100 * coverage:.0f}%), {t} thread(s): native "
                    f"{fps[t, True]:6.1f} fps ({1e3 / fps[t, True]:6.1f} ms)  torch {fps[t, False]:5.2f} fps "
                    f"({1e3 / fps[t, False]:7.1f} ms)  speed-up {fps[t, True] / fps[t, False]:5.1f}x")
            if t != threads[0]:
                line += (f"; {t} vs {threads[0]} threads: native {fps[t, True] / fps[threads[0], True]:4.2f}x, "
                         f"torch {fps[t, False] / fps[threads[0], False]:4.2f}x")
            print(line, flush=True)
    print(f"  load average at the end {os.getloadavg()[0]:.2f}")


@torch.no_grad()
def cpu_parts(threads: list[int], config: list[str] | None = None) -> None:
    """Milliseconds per native GEM frame of each part, 1 and more threads: where the serial time is."""
    from lib.gaussians import render_numba
    from lib.gaussians import render as render_module

    model, poses, viewmat, Ks_at, what = trained_scene(config) if config else synthetic_scene()
    T = next(iter(model.coefficients.values())).shape[0]
    coeffs = [{a: c[i:i + 1] for a, c in model.coefficients.items()} for i in range(T)]
    spent: dict[str, float] = {}

    def timing(name, fn):
        def timed_fn(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
            return out
        return timed_fn

    use_cpu_path(True)
    patches = [(model, "reconstruct", "basis product"), (render_module, "cpu_projector", "projection"),
               (render_numba, "bin_tiles", "binning"), (render_numba, "_forward", "compositing")]
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    for (owner, attr, name), (_, _, fn) in zip(patches, originals):
        setattr(owner, attr, timing(name, fn))
    print(f"CPU parts of a native GEM frame: {what}")
    try:
        for height, width in ((802, 550), (200, 137)):
            Ks, n = Ks_at(height, width), (20 if height > 200 else 60)
            for t in threads:
                torch.set_num_threads(t)
                frame = lambda i: render_gem(model, coeffs[i % T], *poses[i % len(poses)], viewmat[None], Ks,  # noqa: E731
                                             width, height, torch.ones(3))
                for i in range(5):
                    frame(i)
                spent.clear()
                start = time.perf_counter()
                for i in range(n):
                    frame(i)
                total = (time.perf_counter() - start) / n
                parts = "  ".join(f"{k} {1e3 * v / n:.2f}" for k, v in spent.items())
                print(f"  H x W = {height} x {width}, {t} thread(s): frame {1e3 * total:.2f} ms = {parts}  "
                      f"glue {1e3 * (total - sum(spent.values()) / n):.2f} ms")
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help="frames per timing (CPU: a tenth)")
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--cuda-only", action="store_true", help="only the CUDA figures (a GPU machine's time is short)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts to compare")
    parser.add_argument("--quick", action="store_true", help="CPU: fewer frames")
    parser.add_argument("--parts", action="store_true", help="CPU: time the native frame's parts instead")
    parser.add_argument("--config", nargs="+", metavar="CONFIG", help="time the trained GEM of this config's run "
                        "(CONFIG [section.key=value ...])")
    args = parser.parse_args()

    if args.parts:
        cpu_parts(args.threads, config=args.config)
        return
    if torch.cuda.is_available() and not args.cpu_only:
        device = torch.device("cuda")
        print(f"CUDA: {torch.cuda.get_device_name(0)}, H x W = 802 x 550, components {COMPONENTS}")
        for n in (65536, 262144):
            gem_fps, raster_fps, eval_fps, graphed_fps = bench(n, 550, 802, args.frames, device)
            print(f"  N={n:7d}: GEM {gem_fps:7.1f} fps ({1e3 / gem_fps:.3f} ms)  gsplat alone {raster_fps:7.1f} fps "
                  f"({1e3 / raster_fps:.3f} ms)  ratio {gem_fps / raster_fps:.3f} (goal >= 0.85); "
                  f"evaluation alone {1e3 / eval_fps:.3f} ms")
            if graphed_fps is not None:
                print(f"  N={n:7d}: GEM, evaluation as a CUDA graph {graphed_fps:7.1f} fps ({1e3 / graphed_fps:.3f} ms)"
                      f"  ratio {graphed_fps / raster_fps:.3f}")
    if args.cuda_only:
        if not torch.cuda.is_available():
            print("CUDA not available: nothing timed (--cuda-only)")
        return
    cpu_bench(args.threads, quick=args.quick, config=args.config)

if __name__ == "__main__":
    main()
