"""Where a regressor's error lies in the image: at the neck cut, at the silhouette, in the mouth, elsewhere;
and, against a baseline run (e.g. the same actor without tracking jitter), where the extra error lies.

    .venv/bin/python bench/error_regions.py CONFIG [section.key=value ...] [--baseline section.key=value ...]

e.g. a jittered actor against its noise-free twin (same seed, same photos, exact tracking), both trained and
scored by train.py and test.py (``test.splits`` val and test):

    .venv/bin/python bench/error_regions.py configs/default.yml actor.name=gen_s6 \\
        actor.data_dir=data/synthetic/gen_s6 synthetic.seed=6 synthetic.tracking_noise=0.05 \\
        --baseline actor.name=gen_s6n0 actor.data_dir=data/synthetic/gen_s6n0 synthetic.tracking_noise=0

The baseline's overrides are applied on top of the run's. Nothing is rendered: the figures come from the
images test.py wrote (``eval/<split>/compare/``: the render beside its ground truth, 8-bit) and from each
run's own masks, over the frames test.py scores. The regions of a frame, each pixel in the first that
holds it:
- cut: within --band pixels of the keep mask's edge, the line where the keep masks cut the head from the
  neck (drawn from the tracked mesh, ``lib.dataset.masks``; with a baseline, either run's line);
- silhouette: within --band pixels of the edge of the head's alpha (foreground alpha times keep mask);
- mouth: the mouth mask;
- rest: everything else.
Printed per split and region: its share of the pixels, its mean squared error and its share of the
run's squared error; with a baseline, the baseline's, the region's share of the run's extra error, and the
PSNR gap that would remain (full frame) if the region's error were the same in both runs.
"""
import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lib  # noqa: E402,F401  (before torch: how its OpenMP threads wait, lib/__init__.py)

from lib.config import load_config  # noqa: E402
from lib.dataset.masks import mask_paths  # noqa: E402
from lib.dataset.vhap import VhapExport  # noqa: E402
from lib.eval.evaluate import scored_frames  # noqa: E402
from lib.paths import ActorPaths  # noqa: E402

REGIONS = ("cut", "silhouette", "mouth", "rest")


def near_edge(mask: np.ndarray, band: float) -> np.ndarray:
    """[H, W] bool: pixels within ``band`` pixels of the edge of a binary mask [H, W]."""
    m = mask.astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    edge = cv2.dilate(m, kernel) != cv2.erode(m, kernel)
    return cv2.distanceTransform((~edge).astype(np.uint8), cv2.DIST_L2, 3) <= band


def frame_images(cfg, export: VhapExport, frame, split: str) -> dict[str, np.ndarray]:
    """A scored frame's squared error [H, W] (from test.py's compare image) and its masks."""
    name = f"{frame.timestep_index:05d}_{frame.camera_index:02d}.png"
    path = ActorPaths(cfg).regressor_eval / split / "compare" / name
    compare = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if compare is None:
        sys.exit(f"{path} is missing: run test.py on this config with '{split}' in test.splits first")
    w = compare.shape[1] // 3
    render, gt = compare[:, :w].astype(np.float64) / 255, compare[:, w:2 * w].astype(np.float64) / 255
    paths = mask_paths(frame.image_path, export.root, export.masks_dir)
    keep = export.read_mask(paths.keep, frame) > 127
    fg = export.read_mask(frame.mask_path, frame) > 127 if frame.mask_path is not None else np.ones_like(keep)
    mouth = export.read_mask(paths.mouth, frame) > 127 if paths.mouth.is_file() else np.zeros_like(keep)
    return {"error": ((render - gt) ** 2).mean(2), "keep": keep, "head": fg & keep, "mouth": mouth}


def regions(images: list[dict], band: float) -> dict[str, np.ndarray]:
    """Each pixel in one region (module docstring), from one or more runs' images of the same frame."""
    cut = np.zeros_like(images[0]["keep"])
    silhouette = np.zeros_like(cut)
    for im in images:
        cut |= near_edge(im["keep"], band)
        silhouette |= near_edge(im["head"], band)
    silhouette &= ~cut
    mouth = images[0]["mouth"] & ~cut & ~silhouette
    return {"cut": cut, "silhouette": silhouette, "mouth": mouth, "rest": ~(cut | silhouette | mouth)}


def psnr(sse: float, n: int) -> float:
    return 10 * np.log10(n / sse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of CONFIG: the run")
    parser.add_argument("--baseline", nargs="*", default=None, help="overrides of the run's config: the baseline")
    parser.add_argument("--splits", nargs="*", default=["val", "test"])
    parser.add_argument("--band", type=float, default=3.0, help="pixels either side of an edge")
    args = parser.parse_intermixed_args()
    runs = [load_config(args.config, args.overrides)]
    if args.baseline is not None:
        runs.append(load_config(args.config, args.overrides + args.baseline))
    exports = [VhapExport.from_config(cfg) for cfg in runs]
    for split in args.splits:
        sse = np.zeros((len(runs), len(REGIONS)))
        count = np.zeros(len(REGIONS))
        frames = [scored_frames(cfg, export, split) for cfg, export in zip(runs, exports)]
        if len({tuple((f.timestep_index, f.camera_index) for f in fs) for fs in frames}) > 1:
            sys.exit(f"the run and the baseline score different {split} frames: compare runs of one rig and motion")
        for same in zip(*frames):
            images = [frame_images(cfg, export, f, split) for cfg, export, f in zip(runs, exports, same)]
            for j, m in enumerate(regions(images, args.band).values()):
                count[j] += m.sum()
                for i, im in enumerate(images):
                    sse[i, j] += im["error"][m].sum()
        n = count.sum()
        totals = sse.sum(1)
        head = f"{split}: {len(frames[0])} frames, full-frame PSNR {psnr(totals[0], n):.2f} dB"
        print(head + (f" (baseline {psnr(totals[1], n):.2f}, gap {psnr(totals[1], n) - psnr(totals[0], n):.2f} dB)"
                      if len(runs) > 1 else ""))
        for j, name in enumerate(REGIONS):
            line = (f"  {name:10s} {count[j] / n:6.1%} of the pixels, MSE {sse[0, j] / count[j]:.2e}, "
                    f"{sse[0, j] / totals[0]:5.1%} of the error")
            if len(runs) > 1:
                extra = (sse[0, j] - sse[1, j]) / (totals[0] - totals[1])
                gap = psnr(totals[1], n) - psnr(totals[0] - sse[0, j] + sse[1, j], n)
                line += (f" | baseline MSE {sse[1, j] / count[j]:.2e}; {extra:6.1%} of the extra error; "
                         f"gap were it equal here {gap:.2f} dB")
            print(line)


if __name__ == "__main__":
    main()
