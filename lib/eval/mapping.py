"""test.py for the mapping network: self-reenactment on the test split (held-out sequence).

Every test frame of camera ``test.camera`` (``test.max_frames`` of them, evenly spaced) is rendered on
white by GEM twice, with the same GEM pose:

    predicted     coefficients = the mapping network applied to the frame's relative driving signal
    ground truth  coefficients = the projection on GEM of the regressor's Gaussians of that timestep
                  (the best GEM can do; needs the stage-2 checkpoint)

and both are scored against the images (PSNR full frame and inside the head mask, SSIM, L1). Written
to ``experiments/<actor>/mapping/eval/``: metrics.json (means, per-frame rows and the coefficient L1
between the two), compare PNGs (predicted | GT coefficients | image) and test.mp4 of the same.
"""
from __future__ import annotations

import numpy as np
import torch

from lib.atomic import write_json
from lib.dataset.vhap import DatasetError, VhapExport
from lib.eval.evaluate import _pick, _u8, _write_png, write_video
from lib.eval.render import WHITE
from lib.flame.model import FlameModel
from lib.models.gem import GaussianEigenModel, GaussianSet, render_gem
from lib.models.mapping import flatten_coefficients, split_coefficients
from lib.paths import ActorPaths, resolve
from lib.train.data import ActorData
from lib.train.distributed import set_threads
from lib.train.fit_gem import gem_space_frames, load_regressor, timestep_files
from lib.train.fit_mapping import driving_signals, load_mapping
from lib.train.losses import composite_gt
from lib.train.metrics import image_metrics


@torch.no_grad()
def evaluate_mapping(cfg, log=print) -> dict:
    paths = ActorPaths(cfg)
    device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    set_threads(cfg.train.threads)
    gem = GaussianEigenModel.load(paths.gem, device=device)
    net, state = load_mapping(cfg, gem, device)
    flame = FlameModel.from_file(resolve(cfg.actor.flame_model), cfg.actor.n_shape, cfg.actor.n_expr).to(device)
    export = VhapExport.from_config(cfg)
    data = ActorData(export, flame, device)
    avatar, regressor_ckpt = load_regressor(cfg, paths, flame, device)
    timesteps, signal = driving_signals(cfg, export, data)

    frames = [f for f in export.split("test") if f.camera_index == cfg.test.camera]
    if not frames:
        raise DatasetError(f"the test split of {export.root} has no frame of camera test.camera = {cfg.test.camera}")
    frames = _pick(frames, cfg.test.max_frames)
    steps = sorted({f.timestep_index for f in frames})
    head, R, t = gem_space_frames(avatar, data, flame, timestep_files(export, ("test",)), steps)
    gt_coeffs = gem.project(GaussianSet(*(x.to(device) for x in head)))
    pred_flat = net(signal[[timesteps.index(s) for s in steps]].to(device))
    pred_coeffs = split_coefficients(gem, pred_flat)
    coeff_l1 = float((pred_flat - flatten_coefficients(gt_coeffs)).abs().mean())

    white = torch.tensor(WHITE, device=device)
    out = paths.mapping_eval
    rows, video = [], []
    for frame in frames:
        i = steps.index(frame.timestep_index)
        sample = data.sample(frame)
        gt = composite_gt(sample.image[None], sample.alpha[None], white[None])[0]
        cam = (sample.viewmat[None], sample.K[None], frame.camera.width, frame.camera.height, white)
        images = {}
        for name, coeffs in (("predicted", pred_coeffs), ("gt_coefficients", gt_coeffs)):
            c = {a: v[i:i + 1] for a, v in coeffs.items()}
            images[name] = render_gem(gem, c, R[i:i + 1].to(device), t[i:i + 1].to(device), *cam).rgb[0].clamp(0, 1)
        rows.append({"timestep": frame.timestep_index, "camera": frame.camera_index,
                     **{name: image_metrics(rgb, gt, sample.alpha) for name, rgb in images.items()}})
        strip = np.concatenate([_u8(images["predicted"]), _u8(images["gt_coefficients"]), _u8(gt)], 1)
        _write_png(out / "test" / f"{frame.timestep_index:05d}_{frame.camera_index:02d}.png", strip)
        video.append(strip)
    write_video(out / "test.mp4", video, cfg.test.fps)

    results = {"checkpoint": state["path"], "step": int(state["step"]), "signal": cfg.mapping.signal,
               "regressor_checkpoint": regressor_ckpt, "frames": len(rows), "background": "white",
               "coefficient_l1_sigma": coeff_l1}
    for name in ("predicted", "gt_coefficients"):
        results[name] = {k: float(np.mean([r[name][k] for r in rows])) for k in rows[0][name]}
    results["per_frame"] = rows
    write_json(out / "metrics.json", results)
    p, g = results["predicted"], results["gt_coefficients"]
    log(f"test self-reenactment ({len(rows)} frames, camera {cfg.test.camera}): PSNR full / masked  "
        f"predicted {p['psnr']:.2f} / {p['psnr_masked']:.2f} dB   GT coefficients {g['psnr']:.2f} / "
        f"{g['psnr_masked']:.2f} dB   coefficient L1 {coeff_l1:.3f} sigma")
    log(f"metrics -> {out / 'metrics.json'}")
    return results
