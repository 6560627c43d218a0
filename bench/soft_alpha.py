"""Soft alpha, measured: the regressor on a soft-hair actor trained on the old ground truth and on the exact one.

    .venv/bin/python bench/soft_alpha.py CONFIG [section.key=value ...] [--steps 2000] [--name soft_alpha]

e.g. (the CPU default regressor on the default actor with flyaway hair, ``synthetic.hair_fringe``):

    .venv/bin/python bench/soft_alpha.py configs/default.yml actor.name=soft \\
        actor.data_dir=data/synthetic/actor_soft synthetic.hair_fringe=0.6

The actor of CONFIG and the overrides is generated and its masks rendered when missing. Two named runs,
``<name>_old_gt`` and ``<name>_exact_gt``, each fit the mesh PCA, train the regressor for --steps steps
(``train.iterations``, no time limit, no PSNR curve) and are scored by test.py's own evaluation (val and
test splits, on white, against the exact ground truth: ``lib.eval.evaluate``). The two differ only in the
ground truth they train on: ``_exact_gt`` on the library's (``lib.train.losses.composite_gt``), ``_old_gt``
on the formula this project used before soft alpha was handled, reproduced here for the comparison and
nowhere else (``old_formula_gt``), which on a pixel of alpha a and colour F is off by a(1 - a)(1 - F).
Same seed, same frames and backgrounds per step. A rerun resumes both runs (a larger --steps trains on).

Printed: val and test PSNR, full frame and masked (each run's metrics.json), and the PSNR pooled over the
soft pixels of the same frames (0.05 < fg < 0.95, kept by the keep mask). Written:
``experiments/<actor>/<name>.png``, a hair-edge crop of the val frame with the most soft pixels, on white
(top) and on dark grey (bottom): the exact ground truth (on white: the export's image) | the old
formula's | the render of the run trained on the old one | of the run trained on the exact one.
"""
import argparse
import sys
from pathlib import Path
from unittest import mock

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lib  # noqa: E402,F401  (before torch: how its OpenMP threads wait, lib/__init__.py)

import torch
import torch.nn.functional as F

import lib.train.data  # noqa: E402
from lib.cli import run  # noqa: E402
from lib.config import load_config  # noqa: E402
from lib.dataset.masks import render_masks  # noqa: E402
from lib.dataset.synthetic_actor import generate  # noqa: E402
from lib.dataset.vhap import VhapExport  # noqa: E402
from lib.eval.evaluate import evaluate, scored_frames  # noqa: E402
from lib.eval.render import render_gaussians  # noqa: E402
from lib.eval.video import to_uint8  # noqa: E402
from lib.flame.model import FlameModel, load_regions  # noqa: E402
from lib.models.avatar import load_regressor  # noqa: E402
from lib.paths import ActorPaths, resolve  # noqa: E402
from lib.train.data import ActorData  # noqa: E402
from lib.train.distributed import evaluation_device  # noqa: E402
from lib.train.fit_mesh_pca import fit_mesh_pca  # noqa: E402
from lib.train.trainer import train  # noqa: E402

KINDS = ("old_gt", "exact_gt")
DARK = (0.1, 0.1, 0.1)
CROP, ZOOM = 40, 6  # px of the crop, its magnification in the figure


def old_formula_gt(image, fg, keep, background):
    """THE OLD FORMULA, reproduced for this comparison only: GT = I·α + bg·(1 - α), α = fg·keep, with I the
    export's image already composited on white. Same arguments as ``composite_gt``. -> [B, H, W, 3]"""
    alpha = (fg * keep)[..., None]
    return image * alpha + background[:, None, None, :] * (1 - alpha)


def soft_pixels(sample) -> torch.Tensor:
    """Kept pixels of fractional foreground alpha. -> [H, W] bool"""
    return (sample.fg > 0.05) & (sample.fg < 0.95) & (sample.keep > 0.5)


@torch.no_grad()
def renders(cfg, frames: list, backgrounds: list) -> tuple[dict, float]:
    """The trained run's renders of ``frames`` on each background, and its PSNR pooled over their soft
    pixels on white (backgrounds[0]). -> ({(frame index, background index): [H, W, 3]}, dB)"""
    device = evaluation_device(cfg.train.device, cfg.train.threads)
    flame = FlameModel.from_config(cfg).to(device)
    avatar, info = load_regressor(cfg, ActorPaths(cfg), flame, device)
    data = ActorData(VhapExport.from_config(cfg), flame, device, keep_meshes=False, refinement=info["refinement"])
    out, sq_err, n = {}, 0.0, 0
    for i, frame in enumerate(frames):
        sample = data.sample(frame)
        g = avatar(*data.driving(frame.timestep_index))
        for j, bg in enumerate(backgrounds):
            bg = torch.tensor(bg, device=device)
            rgb = render_gaussians(g, 0, sample.viewmat[None], sample.K[None], frame.camera.width,
                                   frame.camera.height, bg)[0].clamp(0, 1)
            out[(i, j)] = rgb.cpu()
        soft = soft_pixels(sample)
        sq_err += float((out[(i, 0)].to(device) - sample.ground_truth(torch.tensor(backgrounds[0], device=device))[0])
                        .pow(2)[soft].sum())
        n += 3 * int(soft.sum())
    return out, float(-10 * np.log10(sq_err / n)) if n else float("nan")


def figure(sample, frame_index: int, rendered: dict, backgrounds: list) -> np.ndarray:
    """The hair-edge crop of one frame (its ``Sample``): rows = backgrounds; columns = exact GT, old formula's
    GT, render of the run trained on the old GT, of the one trained on the exact GT. -> uint8 RGB"""
    soft = soft_pixels(sample).float()
    size = min(CROP, *soft.shape)
    density = F.avg_pool2d(soft[None, None], size, stride=1)[0, 0]
    top, left = divmod(int(density.argmax()), density.shape[1])
    rows = []
    for j, bg in enumerate(backgrounds):
        bg = torch.tensor(bg)
        args = (sample.image[None], sample.fg[None], sample.keep[None], bg[None])
        tiles = [sample.ground_truth(bg)[0], old_formula_gt(*args)[0]] + [rendered[k][(frame_index, j)] for k in KINDS]
        rows.append(np.concatenate([np.pad(to_uint8(t[top:top + size, left:left + size]), ((0, 0), (0, 2), (0, 0)),
                                           constant_values=255) for t in tiles], 1))
    fig = cv2.resize(np.concatenate(rows, 0), None, fx=ZOOM, fy=ZOOM, interpolation=cv2.INTER_NEAREST)
    head = np.full((24, fig.shape[1], 3), 255, np.uint8)
    for c, label in enumerate(("exact GT", "old-formula GT", "trained on old GT", "trained on exact GT")):
        cv2.putText(head, label, (4 + c * (size + 2) * ZOOM, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return np.concatenate([head, fig], 0)


def bench(args) -> None:
    base = load_config(args.config, args.overrides)
    if base.synthetic.enabled:
        generate(base)
    export = VhapExport.from_config(base)
    flame = FlameModel.from_config(base)
    render_masks(export, flame, load_regions(resolve(base.actor.flame_masks), flame.v_template.shape[0]))
    runs = {}
    for kind in KINDS:
        cfg = load_config(args.config, args.overrides + [
            f"run.name={args.name}_{kind}", f"train.iterations={args.steps}", "train.time_limit_minutes=0",
            "train.curve_every_minutes=0", "test.splits=[val,test]", "test.refit_tracking=[]"])  # as tracked: exact
        fit_mesh_pca(cfg)
        if kind == "old_gt":
            with mock.patch.object(lib.train.data, "composite_gt", old_formula_gt):  # Sample.ground_truth's
                train(cfg)
        else:
            train(cfg)
        runs[kind] = (cfg, evaluate(cfg))  # the exact ground truth: nothing is patched here

    val, test = (scored_frames(base, export, split) for split in ("val", "test"))
    frames, backgrounds = val + test, [(1.0, 1.0, 1.0), DARK]
    rendered, soft_psnr = {}, {}
    for kind, (cfg, _) in runs.items():
        rendered[kind], soft_psnr[kind] = renders(cfg, frames, backgrounds)
    data = ActorData(export, flame, torch.device("cpu"), keep_meshes=False)
    pick = max(range(len(val) or len(frames)), key=lambda i: int(soft_pixels(data.sample(frames[i])).sum()))
    path = ActorPaths(base).actor / f"{args.name}.png"
    cv2.imwrite(str(path), figure(data.sample(frames[pick]), pick, rendered, backgrounds)[..., ::-1])

    print(f"\nregressor on {base.actor.name} (synthetic.hair_fringe = {base.synthetic.hair_fringe}), {args.steps} "
          "steps each, scored on white against the exact ground truth (dB)")
    print("| trained on | val PSNR full / masked | test PSNR full / masked | soft pixels PSNR (val + test) |")
    print("|---|---|---|---|")
    for kind, (_, m) in runs.items():
        v, t = m.get("val", {}), m["test"]
        print(f"| {kind} | {v.get('psnr', float('nan')):.2f} / {v.get('psnr_masked', float('nan')):.2f} | "
              f"{t['psnr']:.2f} / {t['psnr_masked']:.2f} | {soft_psnr[kind]:.2f} |")
    frame = frames[pick]
    print(f"hair-edge crop of frame {frame.timestep_index:05d}_{frame.camera_index:02d} -> {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of CONFIG")
    parser.add_argument("--steps", type=int, default=2000, help="training steps of each run")
    parser.add_argument("--name", default="soft_alpha", help="prefix of the two runs' names")
    args = parser.parse_intermixed_args()
    run(lambda: bench(args))


if __name__ == "__main__":
    main()
