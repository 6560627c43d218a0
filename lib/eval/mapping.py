"""test.py for the mapping network: self-reenactment on the test split (held-out sequence), and
cross-identity reenactment (``test.py TARGET_CONFIG SOURCE_CONFIG``).

Self-reenactment:

Every test frame of camera ``test.camera`` (``test.max_frames`` of them, evenly spaced) is rendered on
white by GEM twice, with the same GEM pose:

    predicted     coefficients = the mapping network applied to the frame's relative driving signal
    oracle        coefficients = the projection on GEM of the regressor's Gaussians of that timestep:
                  the best GEM can do on that frame, not a prediction (it needs the regressor to have
                  run on the frame; needs the stage-2 checkpoint); the mapping network is trained
                  towards these coefficients

and both are scored against the images (PSNR full frame and inside the head mask, SSIM, L1). The GEM pose
is the tracked one, refitted to the frames' other cameras as the regressor's evaluation does
(``test.refit_tracking``, ``lib.train.fit_tracking``; fitted once with the regressor and kept). Written
to ``experiments/<actor>/<run>/mapping/eval/``: metrics.json (means under ``predicted`` and
``oracle_coefficients``, per-frame rows and the coefficient L1 between the two), compare PNGs
(predicted | oracle coefficients | image) and test.mp4 of the same.

The predicted coefficients of the GEM parts in ``mapping.hold_at_mean`` (the hair, as the method
does) are set to zero, the part's mean; a GEM without parts has none to hold.

Cross-identity reenactment: the source actor's motion drives the target's avatar. Every test frame of
the source (camera ``test.camera`` of the source's config, ``test.max_frames`` of them) gives the
source's driving signal relative to the source's own identity frame (for the encoder signal: the
source's features projected on the target's PCA), the target's network turns it into the target's
coefficients, and the head's pose follows the source's motion relative to its identity frame,
applied to the target's identity pose:

    P(t) = P_src(t) o P_src(identity)^-1 o P_tgt(identity)      (GEM poses, x -> R x + t)

rendered into the target's camera ``test.camera`` as it stood in the sequence of the target's identity
timestep (each sequence of a union export has its own camera poses). There is no ground truth; written to
``experiments/<target>/mapping/reenact/<source>/``: PNGs (source image | target render), source.mp4,
target.mp4, side_by_side.mp4, track.pt (the coefficients and GEM poses, for the web export) and
reenactment.json last.
"""
from __future__ import annotations

import numpy as np
import torch

from lib.atomic import save_torch, write_json
from lib.dataset.vhap import VhapExport
from lib.eval.evaluate import pick_frames, scored_frames
from lib.eval.render import WHITE
from lib.eval.video import VideoWriter, to_uint8, write_png
from lib.flame.model import FlameModel
from lib.lock import locks_run_folder
from lib.models.avatar import load_regressor
from lib.models.flame_refinement import load_refinement
from lib.models.gem import GaussianEigenModel, render_gem
from lib.models.mapping import BOUND, MappingNetwork, flatten_coefficients, hold_at_mean, split_coefficients
from lib.paths import ActorPaths
from lib.train.checkpoint import CheckpointError, latest_checkpoint
from lib.train.data import ActorData
from lib.train.distributed import evaluation_device
from lib.train.fit_gem import gem_space_gaussians
from lib.train.fit_mapping import driving_signals, load_mapping, mapping_gem
from lib.train.fit_tracking import kept_refit, split_refit
from lib.train.metrics import image_metrics


ORACLE = "oracle_coefficients"  # GEM with the regressor's Gaussians projected on it (module docstring)


def _trained(cfg):
    """What both evaluations start from. -> (paths, device, GEM, mapping network, its checkpoint state, FLAME)"""
    paths = ActorPaths(cfg)
    device = evaluation_device(cfg.train.device, cfg.train.threads)
    gem = GaussianEigenModel.load(paths.gem, device=device)
    net, state = load_mapping(cfg, gem, device)
    gem = mapping_gem(state, gem, device)
    flame = FlameModel.from_config(cfg).to(device)
    return paths, device, gem, net, state, flame


@torch.no_grad()
@locks_run_folder(lambda cfg: ActorPaths(cfg).mapping_eval, "the self-reenactment folder")
def evaluate_mapping(cfg, log=print) -> dict:
    paths, device, gem, net, state, flame = _trained(cfg)
    export = VhapExport.from_config(cfg)
    avatar, regressor = load_regressor(cfg, paths, flame, device)
    data = ActorData(export, flame, device, keep_meshes=False, refinement=regressor["refinement"])

    frames = scored_frames(cfg, export, "test")
    tracking = {"refit": False}
    if "test" in cfg.test.refit_tracking:  # the same refitted tracking as the regressor's evaluation
        refit, tracking = split_refit(cfg, avatar, data, export, "test", frames, regressor["path"], log)
        if refit is not None:
            data.refine(refit)
    steps = sorted({f.timestep_index for f in frames})
    R, t = data.gem_pose(steps)
    projected = [gem.project(head) for head in gem_space_gaussians(avatar, data, steps)]  # [1, K] each
    gt_coeffs = {a: torch.cat([c[a] for c in projected]) for a in projected[0]}
    pred_flat, held = _held(cfg, gem, net(driving_signals(cfg, export, steps, data).to(device)), log)
    pred_coeffs = split_coefficients(gem, pred_flat)
    coeff_l1 = float((pred_flat - flatten_coefficients(gt_coeffs)).abs().mean())

    white = torch.tensor(WHITE, device=device)
    out = paths.mapping_eval
    rows = []
    with VideoWriter(out / "test.mp4", cfg.test.fps) as video:
        for frame in frames:
            i = steps.index(frame.timestep_index)
            sample = data.sample(frame)
            gt = sample.ground_truth(white)[0]
            cam = (sample.viewmat[None], sample.K[None], frame.camera.width, frame.camera.height, white)
            images = {}
            for name, coeffs in (("predicted", pred_coeffs), (ORACLE, gt_coeffs)):
                c = {a: v[i:i + 1] for a, v in coeffs.items()}
                images[name] = render_gem(gem, c, R[i:i + 1].to(device), t[i:i + 1].to(device),
                                          *cam).rgb[0].clamp(0, 1)
            rows.append({"timestep": frame.timestep_index, "camera": frame.camera_index,
                         **{name: image_metrics(rgb, gt, sample.alpha) for name, rgb in images.items()}})
            strip = np.concatenate([to_uint8(images["predicted"]), to_uint8(images[ORACLE]), to_uint8(gt)], 1)
            write_png(out / "test" / f"{frame.timestep_index:05d}_{frame.camera_index:02d}.png", strip)
            video.append(strip)

    results = {"checkpoint": state["path"], "step": int(state["step"]), "signal": cfg.mapping.signal,
               "architecture": cfg.mapping.architecture, "held_at_mean": held,
               "basis_fine_tuned": "gem" in state,
               "regressor_checkpoint": regressor["path"], "frames": len(rows), "background": "white",
               "coefficient_l1_sigma": coeff_l1, "tracking": tracking}
    for name in ("predicted", ORACLE):
        results[name] = {k: float(np.mean([r[name][k] for r in rows])) for k in rows[0][name]}
    results["per_frame"] = rows
    write_json(out / "metrics.json", results)
    p, g = results["predicted"], results[ORACLE]
    log(f"test self-reenactment ({len(rows)} frames, camera {cfg.test.camera}): PSNR full / masked  "
        f"predicted {p['psnr']:.2f} / {p['psnr_masked']:.2f} dB   oracle coefficients (regressor's Gaussians "
        f"projected) {g['psnr']:.2f} / {g['psnr_masked']:.2f} dB   coefficient L1 {coeff_l1:.3f} sigma")
    log(f"metrics -> {out / 'metrics.json'}")
    return results


def export_mapping(cfg, log=print) -> tuple[GaussianEigenModel, MappingNetwork | None]:
    """The GEM and mapping network a web export shows, on the CPU: the newest mapping checkpoint's (its
    warm-up may fine-tune the bases) when it exists and fits this config, else stage 3's GEM and no
    network (saying why). -> (GEM, network or None)"""
    paths, device = ActorPaths(cfg), torch.device("cpu")
    gem = GaussianEigenModel.load(paths.gem)
    if latest_checkpoint(paths.mapping_checkpoints) is None:
        return gem, None
    try:
        net, state = load_mapping(cfg, gem, device)
    except CheckpointError as e:
        log(f"no self-reenactment track: {e} (export with the mapping's config, e.g. configs/mapping.yml, to "
            "include it)")
        return gem, None
    return mapping_gem(state, gem, device), net


@torch.no_grad()
def self_reenactment_track(cfg, gem: GaussianEigenModel, net: MappingNetwork, export: VhapExport, data: ActorData,
                           log=print) -> dict:
    """The mapping network's coefficients of the test timesteps that ``evaluate_mapping`` scores, with
    their GEM poses (``export_mapping``'s GEM and network; the actor's export and data, on the CPU). Posed,
    as ``evaluate_mapping`` poses them, with the test split's refitted tracking that the regressor's
    evaluation kept (``data`` is refined with it in place); as tracked where none was kept.
    -> {coefficients: attribute -> [T, K_a], R [T, 3, 3], t [T, 3], timesteps [T]}"""
    frames = scored_frames(cfg, export, "test")
    steps = sorted({f.timestep_index for f in frames})
    if "test" in cfg.test.refit_tracking:
        checkpoint = latest_checkpoint(ActorPaths(cfg).regressor_checkpoints)
        refit = kept_refit(cfg, export, "test", frames, checkpoint, log) if checkpoint is not None else None
        if refit is None:
            log("self-reenactment: the test split's tracking as tracked; no refit of it is kept for this "
                "regressor and settings (test.py refits and keeps it)")
        else:
            data.refine(refit)
    R, t = data.gem_pose(steps)
    flat, _ = _held(cfg, gem, net(driving_signals(cfg, export, steps, data)), log)
    return {"coefficients": split_coefficients(gem, flat), "R": R, "t": t, "timesteps": torch.tensor(steps)}


def _held(cfg, gem: GaussianEigenModel, flat: torch.Tensor, log) -> tuple[torch.Tensor, list[str]]:
    """Predicted coefficients with the mapping.hold_at_mean parts at their mean. -> (flat, parts held)"""
    if gem.parts == ["all"]:
        if cfg.mapping.hold_at_mean:
            log(f"the GEM has no parts (gem.parts: false): nothing of mapping.hold_at_mean = "
                f"{cfg.mapping.hold_at_mean} is held at its mean")
        return flat, []
    return hold_at_mean(flat, gem, cfg.mapping.hold_at_mean), list(cfg.mapping.hold_at_mean)


@torch.no_grad()
@locks_run_folder(lambda cfg: ActorPaths(cfg).mapping / "reenact", "the reenactment folder")
def reenact(cfg, source_cfg, log=print) -> dict:
    """Cross-identity reenactment of the avatar of ``cfg`` by the actor of ``source_cfg`` (module docstring)."""
    paths, device, gem, net, state, flame = _trained(cfg)
    target = VhapExport.from_config(cfg)
    source = VhapExport.from_config(source_cfg)
    src_flame = FlameModel.from_config(source_cfg).to(device)
    src_data = ActorData(source, src_flame, device, keep_meshes=False)

    frames = pick_frames(source.camera_frames("test", source_cfg.test.camera, "test.camera of the source's config"),
                         cfg.test.max_frames)
    steps = sorted({f.timestep_index for f in frames})
    signal = driving_signals(cfg, source, steps, src_data, source_cfg=source_cfg).to(device)
    flat, held = _held(cfg, gem, net(signal), log)
    coeffs = split_coefficients(gem, flat)

    # the source's motion relative to its identity frame, applied to the target's identity pose
    src_id, tgt_id = source_cfg.actor.identity_timestep, cfg.actor.identity_timestep
    R_s, t_s = src_data.gem_pose([src_id, *steps])
    refined = ActorData(target, flame, device, keep_meshes=False, refinement=load_refinement(paths))  # as GEM saw it
    R_i, t_i = refined.gem_pose([tgt_id])
    M = R_s[1:] @ R_s[0].T
    R = M @ R_i[0]
    t = (M @ (t_i[0] - t_s[0])[:, None])[..., 0] + t_s[1:]

    cam = target.camera_at(tgt_id, cfg.test.camera)  # the target is shown at its identity frame's place
    viewmat, K = cam.viewmat[None].to(device), cam.K[None].to(device)
    white = torch.tensor(WHITE, device=device)
    out = paths.reenactment(source_cfg.actor.name)
    with (VideoWriter(out / "source.mp4", cfg.test.fps) as source_video,
          VideoWriter(out / "target.mp4", cfg.test.fps) as target_video,
          VideoWriter(out / "side_by_side.mp4", cfg.test.fps) as both_video):
        for frame in frames:
            i = steps.index(frame.timestep_index)
            c = {a: v[i:i + 1] for a, v in coeffs.items()}
            target_rgb = to_uint8(render_gem(gem, c, R[i:i + 1], t[i:i + 1], viewmat, K, cam.width, cam.height,
                                             white).rgb[0])
            source_rgb = to_uint8(source.load_image(frame))
            both = _side_by_side(source_rgb, target_rgb)
            write_png(out / "frames" / f"{frame.timestep_index:05d}.png", both)
            source_video.append(source_rgb)
            target_video.append(target_rgb)
            both_video.append(both)
    summary = {"target": cfg.actor.name, "source": source_cfg.actor.name, "source_data": str(source.root),
               "checkpoint": state["path"], "signal": cfg.mapping.signal, "held_at_mean": held,
               "frames": len(frames), "source_camera": source_cfg.test.camera, "target_camera": cfg.test.camera,
               "timesteps": steps, "coefficient_abs_mean_sigma": float(flat.abs().mean()),
               "coefficients_at_bound": float((flat.abs() > 0.99 * BOUND).float().mean()),
               "videos": ["source.mp4", "target.mp4", "side_by_side.mp4"]}
    # the coefficients and poses, for pca_viewer.py --export-web
    save_torch(out / "track.pt", {"coefficients": {a: c.cpu() for a, c in coeffs.items()}, "R": R.cpu(), "t": t.cpu(),
                                  "timesteps": torch.tensor(steps)})
    write_json(out / "reenactment.json", summary)
    log(f"cross-identity reenactment: {source_cfg.actor.name} drives {cfg.actor.name} over {len(frames)} frames "
        f"(mean |c| {summary['coefficient_abs_mean_sigma']:.2f} sigma) -> {out}")
    return summary


def _side_by_side(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two RGB uint8 images next to each other, the shorter padded with white at the bottom."""
    h = max(a.shape[0], b.shape[0])
    pad = lambda x: np.pad(x, ((0, h - x.shape[0]), (0, 0), (0, 0)), constant_values=255)  # noqa: E731
    return np.concatenate([pad(a), pad(b)], 1)
