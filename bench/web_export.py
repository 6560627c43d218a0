"""Benchmark the static web export (pca_viewer.py --export-web) of a trained GEM.

Sizes: the fp32 / fp16 GEM file against the compressed GEM at several (viewer.export_energy,
viewer.export_bits, viewer.export_min_bits) settings, and the whole exported folder at the config's settings.
Quality: PSNR against the images (on white; full frame and inside the head mask), rendered by render_gem
with the fp32 GEM and with each compressed one (the loss is the difference, full / masked), on 'val':
frames of camera test.camera whose timesteps the GEM was fitted to, with the fitted coefficients; and
'test': the held-out sequence's frames of that camera with the mapping network's predicted coefficients
(with the mapping's config, e.g. configs/mapping.yml). Also the PSNR of each compressed render against
the fp32 render (fidelity).
Browser (headless Chromium, SwiftShader, only where /usr/bin/chromium exists): ms per frame of the
exported page, animated (GEM evaluated on the GPU every frame, next fitted frame) against static (the same
Gaussians, evaluated once; still sorted and splatted every frame, the camera turning), with the GEM
evaluated on the CPU (WebAssembly SIMD, the page's choice on a software renderer) and in the GPU pass
(the choice on a real GPU). Software WebGL: only the ratio means anything. Timed at the camera's own size
and at a window's (--height pixels high).

    .venv/bin/python bench/web_export.py CONFIG [overrides] [--frames 8] [--browser-frames 20] [--height 800] [--browser-only]
"""
import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lib  # noqa: E402,F401  (before torch: how its OpenMP threads wait, lib/__init__.py)

import torch  # noqa: E402

from lib.config import load_config  # noqa: E402
from lib.eval.evaluate import pick_frames  # noqa: E402
from lib.eval.mapping import export_mapping, self_reenactment_track  # noqa: E402
from lib.models.gem import render_gem  # noqa: E402
from lib.paths import ActorPaths  # noqa: E402
from lib.train.metrics import psnr  # noqa: E402
from lib.viewer.compressed import (decode_gem, encode_gem, gzipped, kept_index, pack, read_container,  # noqa: E402
                                   unpack)
from lib.viewer.web_export import actor_data, export_web  # noqa: E402

# (viewer.export_energy, viewer.export_bits, viewer.export_min_bits)
SETTINGS = [(1.0, 8, 8), (1.0, 8, 4), (1.0, 8, 2), (1.0, 7, 2), (1.0, 6, 2), (0.9999, 8, 2), (0.999, 8, 2)]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


@torch.no_grad()
def split_frames(cfg, model, net, n_frames: int):
    """The frames each quality table scores, with their coefficients and GEM poses: 'val' (frames of
    test.camera at timesteps the GEM was fitted to, with the fitted coefficients) and 'test' (the
    held-out sequence's frames that test.py scores, with the mapping network's predicted coefficients,
    when the config has a mapping checkpoint). -> {split: (frames, coefficients attr -> [F, K], R, t)}"""
    export, data = actor_data(cfg)
    rows = {int(t): i for i, t in enumerate(model.timesteps)}
    frames = pick_frames([f for split in cfg.gem.splits for f in export.split(split)
                          if f.camera_index == cfg.test.camera and f.timestep_index in rows], n_frames)
    R, t = data.gem_pose([f.timestep_index for f in frames])
    pick = [rows[f.timestep_index] for f in frames]
    out = {"val": (frames, {a: v[pick] for a, v in model.coefficients.items()}, R, t), "test": None}
    if net is not None:
        track = self_reenactment_track(cfg, model, net, export, data, log=lambda *a: None)
        steps = track["timesteps"].tolist()
        frames = pick_frames([f for f in export.camera_frames("test", cfg.test.camera) if f.timestep_index in steps],
                             n_frames)
        pick = [steps.index(f.timestep_index) for f in frames]
        out["test"] = (frames, {a: v[pick] for a, v in track["coefficients"].items()}, track["R"][pick], track["t"][pick])
    return out, data


@torch.no_grad()
def quality(cfg, model, net, settings, n_frames: int) -> None:
    white = torch.ones(3)
    splits, data = split_frames(cfg, model, net, n_frames)
    for split, chosen in splits.items():
        if chosen is None:
            print(f"\n{split}: no mapping checkpoint fits this config, so no predicted coefficients: run the bench "
                  "with the mapping's config (e.g. configs/mapping.yml)")
            continue
        frames, coefficients, R, t = chosen
        samples = [data.sample(f) for f in frames]
        gts = [s.ground_truth(white)[0] for s in samples]

        def renders(m, index=None):
            out = []
            for i, (f, s) in enumerate(zip(frames, samples)):
                c = {a: (v if index is None else v[:, index[a]])[i:i + 1] for a, v in coefficients.items()}
                out.append(render_gem(m, c, R[i:i + 1], t[i:i + 1], s.viewmat[None], s.K[None], f.camera.width,
                                      f.camera.height, white).rgb[0].clamp(0, 1))
            return out

        def scores(images):
            full = np.mean([psnr(x, g) for x, g in zip(images, gts)])
            masked = np.mean([psnr(x, g, s.alpha) for x, g, s in zip(images, gts, samples)])
            return full, masked

        reference = renders(model)
        ref_full, ref_masked = scores(reference)
        what = "fitted" if split == "val" else "predicted (mapping network)"
        print(f"\n{split}: {len(frames)} frames of camera {cfg.test.camera}, {what} coefficients (render_gem, white; "
              "bytes: the fp32 file, the compressed GEMs gzipped as gem.js holds them):")
        print(f"  {'GEM':<24} {'components':>16} {'bytes':>10} {'PSNR full':>9} {'masked':>7} {'loss':>13} "
              f"{'vs fp32 render':>14}")
        comps = "/".join(str(model.n_components(a)) for a in model.blocks)
        print(f"  {'fp32':<24} {comps:>16} {model.nbytes():>10} {ref_full:>9.3f} {ref_masked:>7.3f} {'-':>13} {'-':>14}")
        for energy, bits, min_bits in settings:
            container = pack(*encode_gem(model, energy, bits, min_bits))
            small, size = decode_gem(*unpack(container)), len(gzipped(container))
            index = kept_index(model, {a: [b.n_components for b in small.blocks[a]] for a in small.blocks})
            images = renders(small, index)
            full, masked = scores(images)
            fidelity = np.mean([psnr(x, r) for x, r in zip(images, reference)])
            comps = "/".join(str(small.n_components(a)) for a in small.blocks)
            print(f"  {f'energy {energy:g}, bits {bits}..{min_bits}':<24} {comps:>16} {size:>10} {full:>9.3f} {masked:>7.3f} "
                  f"{ref_full - full:>6.3f}/{ref_masked - masked:>6.3f} {fidelity:>11.1f} dB")


def browser(folder: Path, frames: int, height: int, repeats: int) -> None:
    if not os.path.exists(CHROMIUM):
        print("\nbrowser: /usr/bin/chromium not installed, skipped")
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            print(f"\nbrowser (headless Chromium, SwiftShader), median of {repeats} interleaved runs of {frames} frames:")
            camera_height = read_container(folder)[0]["view"]["height"]
            for scale, where in itertools.product((1.0, height / camera_height), ("cpu", "gpu")):
                page = b.new_page(viewport={"width": 1000, "height": 900})
                page.goto(f"file://{folder}/index.html?scale={scale}&eval={where}")
                page.wait_for_function("document.body.dataset.ready", timeout=60_000)
                info = page.evaluate("({n: GEM.N, w: GEM.width, h: GEM.height, k: GEM.nCoefficients, fp: GEM.floatBlend, "
                                     "kernel: GEM.cpu.kernel})")
                times = {"animated": [], "static": []}
                for _ in range(repeats):  # interleaved: the machine's load drifts
                    for mode in times:
                        times[mode].append(page.evaluate(f"GEM.benchmark({frames}, {str(mode == 'animated').lower()})"))
                page.close()
                a, s = np.median(times["animated"]), np.median(times["static"])
                what = f"CPU ({info['kernel']})" if where == "cpu" else "GPU pass"
                print(f"  {info['n']} Gaussians, {info['k']} coefficients, {info['w']}x{info['h']}, "
                      f"{'fp32' if info['fp'] else 'fp16'} compositing, evaluated on the {what}: animated "
                      f"{a:.1f} ms/frame, static {s:.1f} ms/frame, ratio {a / s:.2f}")
        finally:
            b.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--frames", type=int, default=8, help="frames scored for the quality table")
    parser.add_argument("--browser-frames", type=int, default=20, help="frames per browser timing")
    parser.add_argument("--browser-repeats", type=int, default=5, help="interleaved timings per mode")
    parser.add_argument("--height", type=int, default=800, help="canvas height of the second browser timing (a window)")
    parser.add_argument("--browser-only", action="store_true", help="skip the quality tables: export, then time the page")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(1)
    model, net = export_mapping(cfg, log=print)
    gem_file = ActorPaths(cfg).gem
    print(f"GEM {gem_file}: {model.n_gaussians} Gaussians, file {gem_file.stat().st_size / 1e6:.3f} MB; "
          f"fp32 {model.nbytes() / 1e6:.3f} MB, fp16 bases {model.nbytes(half=True) / 1e6:.3f} MB")
    with tempfile.TemporaryDirectory() as tmp:
        sizes = export_web(cfg, tmp, log=lambda *a: None)
        v = cfg.viewer
        print(f"export (viewer.export_energy {v.export_energy:g}, viewer.export_bits {v.export_bits}, "
              f"viewer.export_min_bits {v.export_min_bits}): folder {sizes['total'] / 1e6:.3f} MB = gem.js "
              f"{sizes['gem.js'] / 1e6:.3f} MB (compressed GEM {sizes['gem'] / 1e6:.3f} MB + tracks, gzipped, base85) + player "
              f"{(sizes['gem_player.js'] + sizes['index.html']) / 1e3:.1f} kB")
        if not args.browser_only:
            quality(cfg, model, net, SETTINGS, args.frames)
        browser(Path(tmp), args.browser_frames, args.height, args.browser_repeats)


if __name__ == "__main__":
    main()
