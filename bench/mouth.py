"""The open mouth, measured: PSNR inside the mouth region on the test frames where the mouth is open.

    .venv/bin/python bench/mouth.py CONFIG RUN [RUN ...] [--jaw 0.15]

For each named run of the config's actor (``run.name``, e.g. one trained with ``actor.close_mouth=true``
and one without) the regressor is loaded with the config it was trained with (``regressor/config.yml``)
and the test split's frames whose tracked jaw opening (FLAME ``jaw_pose`` about x, radians) exceeds
--jaw are rendered on white. Printed per run: PSNR over the mouth region (the pixels of
render_masks.py's mouth mask that the head alpha keeps, pooled over every frame: one mean squared
error, then PSNR), and full-frame and head-masked PSNR (means over the frames) of the same frames.

Example (the FLAME-like synthetic actor, with and without the faces closing the mouth):
    .venv/bin/python render_masks.py configs/synthetic_open.yml
    for r in hole strip; do c=$([ $r = strip ] && echo true || echo false)
      .venv/bin/python pca_mesh.py configs/synthetic_open.yml run.name=$r actor.close_mouth=$c
      .venv/bin/python train.py configs/synthetic_open.yml run.name=$r actor.close_mouth=$c; done
    .venv/bin/python bench/mouth.py configs/synthetic_open.yml hole strip
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lib  # noqa: E402,F401  (before torch: how its OpenMP threads wait, lib/__init__.py)

import torch

from lib.config import load_config  # noqa: E402
from lib.dataset.vhap import VhapExport  # noqa: E402
from lib.eval.render import render_frame  # noqa: E402
from lib.flame.model import FlameModel  # noqa: E402
from lib.models.avatar import load_regressor  # noqa: E402
from lib.paths import ActorPaths  # noqa: E402
from lib.train.data import ActorData  # noqa: E402
from lib.train.metrics import psnr  # noqa: E402


def open_mouth_frames(export: VhapExport, jaw: float):
    """The test frames whose tracked jaw opening exceeds ``jaw`` radians."""
    return [f for f in export.split("test") if float(export.load_flame(f)["jaw_pose"][0, 0]) > jaw]


@torch.no_grad()
def score_run(cfg, jaw: float) -> dict:
    paths = ActorPaths(cfg)
    trained = load_config(paths.regressor / "config.yml")  # the avatar as it was trained (close_mouth...)
    export = VhapExport.from_config(trained)
    flame = FlameModel.from_config(trained)
    avatar, info = load_regressor(trained, paths, flame, torch.device("cpu"))
    data = ActorData(export, flame, torch.device("cpu"), keep_meshes=False)
    frames = open_mouth_frames(export, jaw)
    if not frames:
        raise SystemExit(f"no test frame opens the jaw beyond {jaw} rad; lower --jaw")
    sq_err, n_px, full, masked = 0.0, 0, [], []
    for frame in frames:
        rgb, gt, alpha = render_frame(avatar, data, frame)
        region = data.sample(frame).mouth.bool() & (alpha > 0.5)
        sq_err += float((rgb - gt).pow(2)[region].sum())
        n_px += int(region.sum()) * 3
        full.append(psnr(rgb, gt))
        masked.append(psnr(rgb, gt, alpha))
    mouth = -10.0 * math.log10(sq_err / n_px) if n_px else float("nan")
    return {"run": cfg.run.name, "close_mouth": trained.actor.close_mouth, "step": info["step"],
            "gaussians": avatar.n_gaussians, "frames": len(frames), "mouth_pixels": n_px // 3,
            "mouth_psnr": mouth, "psnr": float(np.mean(full)), "psnr_masked": float(np.mean(masked))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--jaw", type=float, default=0.15, help="jaw opening (rad) above which a mouth is open")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"test frames with the jaw open beyond {args.jaw} rad; PSNR on white (dB)")
    print("| run | actor.close_mouth | steps | Gaussians | frames | mouth pixels | mouth PSNR | full PSNR | masked PSNR |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        r = score_run(load_config(args.config, [f"run.name={run}"]), args.jaw)
        print(f"| {r['run']} | {r['close_mouth']} | {r['step']} | {r['gaussians']:,} | {r['frames']} | "
              f"{r['mouth_pixels']:,} | {r['mouth_psnr']:.2f} | {r['psnr']:.2f} | {r['psnr_masked']:.2f} |")


if __name__ == "__main__":
    main()
