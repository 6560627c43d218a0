"""Benchmark one training iteration of the regressor and its parts.

    .venv/bin/python bench/train_step.py [CONFIG] [--gem] [--steps N] [--threads N] [--views N] [--data]

Builds the synthetic head (CONFIG's when it is there, else in a temporary folder), a mesh PCA of random
expressions, the avatar of CONFIG's ``regressor`` section (default: configs/default.yml) and a
NeRSemble-framed camera of the synthetic rig; then times full training steps (it/s) and, separately, each part of a step with its
backward pass: network (generator + colour head + assembly), renderer, losses, optimiser; with
``--views N`` (``train.views_per_step``) also whole steps rendering N cameras of one timestep from one
evaluation of the networks, and the images per second each step size trains on. ``--gem``
(the default on CUDA) uses GEM's settings: 802x550 images, UV 256, the schema's widths.
With ``--data``, data loading too: CONFIG's actor (generated or exported, with ``render_masks.py`` run)
through the training loader (``data.workers`` processes), alone (images/s it supplies) and inside full
steps that train on its images (the share of a step spent waiting for the next image).
Times are medians of wall clock (CUDA synchronised) and of process CPU time; on a shared machine
compare the load averages printed at the start and the end.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lib  # noqa: E402,F401  (before torch: how its OpenMP threads wait, lib/__init__.py)

import torch

from lib.config import SCHEMA, load_config  # noqa: E402
from lib.dataset.synthetic_actor import make_rig  # noqa: E402
from lib.dataset.vhap import VhapExport  # noqa: E402
from lib.flame.model import FlameModel  # noqa: E402
from lib.flame.safe_pickle import load_pickle  # noqa: E402
from lib.flame.synthetic import ensure_head_model, head_model_complete  # noqa: E402
from lib.geometry.obj_io import read_obj  # noqa: E402
from lib.models.avatar import GaussianAvatar, canonical_mesh, split_global_pose  # noqa: E402
from lib.models.mesh_pca import MeshPCA  # noqa: E402
from lib.paths import resolve  # noqa: E402
from lib.eval.render import render_set  # noqa: E402
from lib.train.data import TrainingImages  # noqa: E402
from lib.train.losses import composite_gt  # noqa: E402
from lib.train.trainer import make_optimizer, step_losses  # noqa: E402


def build(cfg, gem: bool, device: torch.device, folder: Path):
    head = resolve(cfg.synthetic.head_dir)  # the config's synthetic head when it is made, else one in `folder`
    paths = ensure_head_model(head) if head_model_complete(head, cfg.synthetic.head_mouth) else ensure_head_model(folder)
    flame = FlameModel.from_file(paths["flame_model"]).to(device)
    obj = read_obj(paths["uv_obj"])
    regions = load_pickle(paths["masks"])
    g = torch.Generator().manual_seed(0)
    n = 32
    params = {"expr": 0.7 * torch.randn(n, flame.n_expr, generator=g), "rotation": 0.1 * torch.randn(n, 3, generator=g),
              "jaw_pose": torch.stack([0.3 * torch.rand(n, generator=g), torch.zeros(n), torch.zeros(n)], 1),
              "translation": torch.zeros(n, 3)}
    params = {k: v.to(device) for k, v in params.items()}
    with torch.no_grad():
        verts, R, t = split_global_pose(flame, params)
        pca = MeshPCA.fit(verts.cpu(), 100)
        canonical = canonical_mesh(flame, {"shape": None, "neck_pose": None, "static_offset": None}, None, 20.0)
    r = SCHEMA["regressor"] if gem else None
    pick = (lambda key: r[key].default) if gem else (lambda key: getattr(cfg.regressor, key))
    avatar = GaussianAvatar(flame.faces.cpu(), torch.as_tensor(obj["uvs"]), torch.as_tensor(obj["faces_uv"]),
                            canonical.cpu(), regions, pca, pick("uv_size"), pick("n_pca"), pick("widths"),
                            pick("colour_width"), pick("feature_channels"), pick("style_dim"),
                            pick("convs_per_level"), tuple(pick("removed_regions")), pick("init_scale"),
                            pick("deform")).to(device)
    scale = 1.0 if gem else cfg.synthetic.scale
    rig = make_rig(flame.v_template.cpu(), {k: np.asarray(v) for k, v in regions.items()}, 16, scale)
    return avatar, (verts, R, t), rig[8:] + rig[:8]  # the frontal camera first


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall clock times it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median wall and process-CPU milliseconds of fn() after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/default.yml")
    parser.add_argument("--gem", action="store_true", help="GEM's settings (default on CUDA)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    parser.add_argument("--views", type=int, default=1, help="also time steps of 2..N views (train.views_per_step)")
    parser.add_argument("--data", action="store_true", help="also time data loading from CONFIG's actor")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gem = args.gem or device.type == "cuda"
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    cfg = load_config(args.config)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        avatar, (verts, R, t), rig = build(cfg, gem, device, Path(folder))
    cam = rig[0]
    opt = make_optimizer(avatar, cfg)
    W, H = cam.width, cam.height
    vm, K = cam.viewmat[None].to(device), cam.K[None].to(device)
    gen = torch.Generator().manual_seed(1)
    gt_image = torch.rand(1, H, W, 3, generator=gen).to(device)
    fg = keep = torch.ones(1, H, W, device=device)
    mouth = torch.zeros(1, H, W, device=device)
    bg = torch.rand(3, generator=gen).to(device)
    gt = composite_gt(gt_image, fg, keep, bg[None])
    bf16 = cfg.train.bf16 and device.type == "cuda"
    avatar.bf16 = bf16
    step = [0]

    def losses(rgb, alpha, g, target=gt, mouth_mask=mouth, head_alpha=fg * keep):  # the trainer's terms
        return sum(step_losses(cfg.loss, rgb, alpha, target, mouth_mask, lambda: head_alpha, g).values())

    def train_on(i, viewmat, Ks, width, height, background, target, mouth_mask, head_alpha):
        """One whole step on expression i, rendered in that camera and fitted to target."""
        i %= verts.shape[0]
        g = avatar(verts[i:i + 1], R[i:i + 1], t[i:i + 1])
        out = render_set(g, 0, viewmat, Ks, width, height, background)
        opt.zero_grad(set_to_none=True)
        losses(out.rgb, out.alpha, g, target, mouth_mask, head_alpha).backward()
        torch.nn.utils.clip_grad_norm_(avatar.parameters(), cfg.train.grad_clip)
        opt.step()

    def full_step():
        step[0] += 1
        train_on(step[0] - 1, vm, K, W, H, bg, gt, mouth, fg * keep)

    print(f"torch {torch.__version__} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    n_params = sum(p.numel() for p in avatar.parameters())
    print(f"{'GEM settings' if gem else args.config}: {H}x{W} images, UV {avatar.size}, {avatar.n_gaussians} Gaussians, "
          f"{n_params / 1e6:.2f}M parameters, bf16 {bf16}")
    # Fitting a random target drifts the Gaussians (and the renderer's work) away from a real run's:
    # both measurements start from the same initial state.
    initial = copy.deepcopy((avatar.state_dict(), opt.state_dict()))

    def start_again():
        avatar.load_state_dict(initial[0])
        opt.load_state_dict(initial[1])
    wall, cpu = timed(full_step, args.steps, device)
    print(f"full step: {wall:.1f} ms ({1e3 / wall:.1f} it/s), process CPU {cpu:.1f} ms")
    start_again()
    for n in range(2, args.views + 1):  # n cameras spread around the head, one evaluation of the networks
        cams = [rig[(k * len(rig)) // n] for k in range(n)]
        vms, Kn = torch.stack([c.viewmat for c in cams]).to(device), torch.stack([c.K for c in cams]).to(device)
        bgs, gts = bg.expand(n, 3), gt.expand(n, H, W, 3)

        def views_step(vms=vms, Kn=Kn, bgs=bgs, gts=gts, n=n):
            step[0] += 1
            train_on(step[0] - 1, vms, Kn, W, H, bgs, gts, mouth.expand(n, H, W), (fg * keep).expand(n, H, W))
        views_wall, _ = timed(views_step, args.steps, device)
        print(f"full step of {n} views: {views_wall:.1f} ms ({1e3 / views_wall:.1f} it/s, {n * 1e3 / views_wall:.1f} "
              f"images/s against {1e3 / wall:.1f} with one view)")
        start_again()

    # The same step cut into parts, each with its own backward pass (tensors handed over as leaves).
    parts = {"network": [], "renderer": [], "losses": [], "optimiser": []}
    for k in range(args.steps + 2):
        i = k % verts.shape[0]
        marks = [time.perf_counter()]

        def mark():
            sync(device)
            marks.append(time.perf_counter())
        g = avatar(verts[i:i + 1], R[i:i + 1], t[i:i + 1])
        fields = [g.means, g.quats, g.scales, g.opacities, g.colors]
        leaves = [f.detach().requires_grad_() for f in fields]
        mark()                                                         # network forward
        lg = type(g)(*leaves, g.position_residual.detach().requires_grad_())
        out = render_set(lg, 0, vm, K, W, H, bg)
        images = (out.rgb, out.alpha)
        image_leaves = [image.detach().requires_grad_() for image in images]
        mark()                                                         # renderer forward
        loss = losses(*image_leaves, lg)
        loss.backward()
        mark()                                                         # losses forward + backward
        torch.autograd.backward(images, [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                                         for leaf in image_leaves])
        mark()                                                         # renderer backward
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(fields + [g.position_residual],
                                [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                                 for leaf in leaves + [lg.position_residual]])
        mark()                                                         # network backward
        torch.nn.utils.clip_grad_norm_(avatar.parameters(), cfg.train.grad_clip)
        opt.step()
        mark()                                                         # optimiser
        if k >= 2:
            d = np.diff(marks) * 1e3
            parts["network"].append(d[0] + d[4])
            parts["renderer"].append(d[1] + d[3])
            parts["losses"].append(d[2])
            parts["optimiser"].append(d[5])
    med = {k: statistics.median(v) for k, v in parts.items()}
    total = sum(med.values())
    print("per part (forward + backward), median ms and share of their sum:")
    for k, v in med.items():
        print(f"  {k:10s} {v:8.2f} ms  {100 * v / total:5.1f}%")
    if args.data:
        start_again()
        time_data_loading(cfg, train_on, args.steps, device)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


def time_data_loading(cfg, train_on, steps: int, device: torch.device) -> None:
    """The training loader alone (images/s), then full steps (``train_on``) on its images with the wait for each
    image timed."""
    export = VhapExport.from_config(cfg)
    frames = export.split("train")
    n = 4 * steps
    images = TrainingImages(export, frames, cfg, 0, 1, 0, 2 * n + 4, device)
    images.at(0)  # the workers start and fill their queues
    sync(device)
    t0 = time.perf_counter()
    for k in range(1, n + 1):
        images.at(k)
    sync(device)
    alone = n / (time.perf_counter() - t0)
    print(f"data loading alone: {alone:.1f} images/s ({cfg.data.workers} workers, {len(frames)} training images of "
          f"{export.root})")
    waits, totals = [], []
    for k in range(n + 1, 2 * n + 1):
        sync(device)
        t0 = time.perf_counter()
        sample, bg, gt = images.at(k)
        sync(device)
        t1 = time.perf_counter()
        cam = sample.frame.camera
        train_on(k, sample.viewmat[None], sample.K[None], cam.width, cam.height, bg, gt, sample.mouth[None],
                 sample.alpha[None])
        sync(device)
        waits.append(t1 - t0)
        totals.append(time.perf_counter() - t0)
    wait, total = 1e3 * statistics.median(waits), 1e3 * statistics.median(totals)
    print(f"full step on the loader's images: {total:.1f} ms ({1e3 / total:.1f} it/s), of which waiting for the "
          f"image {wait:.2f} ms ({100 * wait / total:.1f}%; mean {100 * sum(waits) / sum(totals):.1f}%)")


if __name__ == "__main__":
    main()
