"""Stage 3: GEM of an actor, built from its trained regressor, into experiments/<actor>/<run>/gem/.

The regressor runs once per timestep of ``gem.splits`` (train + val: the val split shares the
training timesteps, so these are the training expressions; the Gaussians do not depend on the
camera). Its world-space Gaussians are brought into GEM space (``lib.models.gem.gem_pose``: global
pose and neck rotation undone) and appended, one timestep at a time, to a frame store on disk
(``lib.models.frame_store``; deleted when the stage ends), from which the bases are fitted and the
training reconstruction error measured: memory grows with the T x T Gram matrix, not with the
T x N Gaussians (the report gives both sizes, ``store_mb`` and ``gram_mb``). Then, with
``gem.evaluate``, val (novel view) and test (novel expression) frames are rendered on white by the
regressor and by the GEM oracle, and scored against the ground truth, over the full frame and inside the
head mask, and again for the component counts of ``gem.table_components``. Everything printed is also
written to ``report.json``.

The GEM figures are an oracle: a timestep's coefficients are the projection on GEM of the regressor's
own Gaussians of that timestep (computed once per timestep), which needs the regressor to have run on
that very frame. They are the best GEM can do there, not a prediction from a driving signal (the mapping
network's figures are, ``lib.eval.mapping``); the report says so in its keys (``gem_oracle``,
``gem_oracle_<n>``, ``oracle_<split>_psnr``) and in ``renders.coefficients``.
"""
from __future__ import annotations

import io
import os
import time
from typing import Iterator

import numpy as np
import torch

from lib.atomic import write_json
from lib.config import save_config
from lib.dataset.vhap import Frame, VhapExport
from lib.eval.evaluate import pick_frames
from lib.eval.render import WHITE, render_frame
from lib.flame.model import FlameModel, load_regions
from lib.lock import locks_run_folder
from lib.models.avatar import GaussianAvatar, load_canonical_mesh, load_regressor
from lib.models.frame_store import FrameStore
from lib.models.gem import (
    ATTRIBUTES, GaussianEigenModel, GaussianSet, ReconstructionErrors, assign_parts, gaussian_order,
    reconstruction_errors, render_gem, to_gem_space,
)
from lib.paths import ActorPaths, resolve
from lib.train import distributed
from lib.train.data import ActorData
from lib.train.metrics import image_metrics

MB = 1024.0 * 1024.0
ORACLE = "gem_oracle"  # GEM rendered with coefficients projected from the regressor's output (module docstring)


def timestep_files(export: VhapExport, splits) -> dict[int, object]:
    files = {}
    for split in splits:
        files.update(export.timesteps(split))
    return files


@torch.no_grad()
def gem_space_gaussians(avatar: GaussianAvatar, data: ActorData, timesteps: list[int]) -> Iterator[GaussianSet]:
    """The regressor's Gaussians of each timestep in GEM space, one timestep at a time (never all T
    sets of N Gaussians at once). -> GaussianSet [1, N, ...] on the data's device, in timestep order"""
    R, t = data.gem_pose(timesteps)
    for i, step in enumerate(timesteps):
        d = data.driving(step)  # every Gaussian with the corrected pose, which to_gem_space undoes
        g = avatar(d.verts_head, d.R, d.t)
        world = GaussianSet(g.means, g.quats, g.scales, g.opacities, g.colors)
        yield to_gem_space(world, R[i:i + 1], t[i:i + 1])


@locks_run_folder(lambda cfg: ActorPaths(cfg).gem_dir, "the GEM folder")
def fit_gem(cfg, log=print) -> GaussianEigenModel:
    info = distributed.setup(cfg.train.device, cfg.train.threads)
    device = info.device
    paths = ActorPaths(cfg)
    flame = FlameModel.from_config(cfg).to(device)
    export = VhapExport.from_config(cfg)
    avatar, regressor = load_regressor(cfg, paths, flame, device)
    data = ActorData(export, flame, device, keep_meshes=False, refinement=regressor["refinement"])
    ckpt = regressor["path"]

    parts = None
    if cfg.gem.parts:
        masks = load_regions(resolve(cfg.actor.flame_masks), flame.v_template.shape[0])
        parts = assign_parts(avatar.canonical_positions.cpu(), load_canonical_mesh(paths.canonical_mesh), masks)
        members = torch.bincount(parts[1], minlength=len(parts[0])).tolist()
        log("parts: " + ", ".join(f"{n} ({c})" for n, c in zip(parts[0], members)))
    counts = {a: getattr(cfg.gem, a) for a in ATTRIBUTES}

    timesteps = sorted(timestep_files(export, cfg.gem.splits))
    T = len(timesteps)
    with FrameStore(paths.gem_dir, gaussian_order(parts)) as store:
        start = time.perf_counter()
        for gaussians in gem_space_gaussians(avatar, data, timesteps):
            store.append(gaussians)
        store_mb, gram_mb = store.nbytes / MB, T * T * 8 / MB
        log(f"regressor ({ckpt}) over {T} timesteps of {'+'.join(cfg.gem.splits)}: {store.n_gaussians} "
            f"Gaussians each ({time.perf_counter() - start:.1f} s); frame store {store_mb:.1f} MB on disk, "
            f"Gram matrix {T} x {T} float64 {gram_mb:.1f} MB")
        start = time.perf_counter()
        model = GaussianEigenModel.fit(store, counts, torch.tensor(timesteps), parts,
                                       extras={"texel_index": avatar.texel_index.cpu(),
                                               "uv_size": torch.tensor(avatar.size)})
        log(f"GEM fitted in {time.perf_counter() - start:.1f} s")
        train_error = _log_errors(model, reconstruction_errors(model, store.batches()), log, "training frames")

    report = {"checkpoint": ckpt, "timesteps": T, "gaussians": model.n_gaussians,
              "parts": model.parts, "components": {a: model.n_components(a) for a in ATTRIBUTES},
              "store_mb": store_mb, "gram_mb": gram_mb, "train_error": train_error}
    report["size_mb"] = _log_sizes(model, avatar, ckpt, log)
    path = model.save(paths.gem, half=cfg.gem.fp16)
    log(f"GEM ({'fp16' if cfg.gem.fp16 else 'fp32'} bases) -> {path}")

    if cfg.gem.evaluate:
        report["renders"] = evaluate_renders(cfg, model, avatar, data, export, report["size_mb"], log)
    write_json(paths.gem_report, report)
    save_config(cfg, paths.gem_dir / "config.yml")
    log(f"report -> {paths.gem_report}")
    return model


def _log_errors(model: GaussianEigenModel, errors: dict, log, what: str) -> dict:
    """Log ``reconstruction_errors``' result. -> errors"""
    log(f"reconstruction error on the {what} (RMS per Gaussian; relative = / RMS deviation from the mean):")
    for attr, e in errors.items():
        log(f"  {attr:10s} {e['rms']:.3e}  relative {e['relative']:.4f}  ({model.n_components(attr)} components)")
    return errors


def _log_sizes(model: GaussianEigenModel, avatar: GaussianAvatar, ckpt: str, log) -> dict:
    buffer = io.BytesIO()
    torch.save(avatar.state_dict(), buffer)  # what the checkpoint's "model" holds
    sizes = {"gem_fp32": model.nbytes() / MB, "gem_fp16": model.nbytes(half=True) / MB,
             "regressor_checkpoint": os.path.getsize(ckpt) / MB, "regressor_weights": buffer.tell() / MB}
    log(f"size: GEM {sizes['gem_fp32']:.2f} MB fp32, {sizes['gem_fp16']:.2f} MB fp16; regressor checkpoint "
        f"{sizes['regressor_checkpoint']:.2f} MB (weights alone {sizes['regressor_weights']:.2f} MB); "
        f"GEM fp32 / weights = {sizes['gem_fp32'] / sizes['regressor_weights']:.1%}")
    return sizes


def _eval_frames(cfg, export: VhapExport, split: str) -> list[Frame]:
    frames = export.split(split)
    if split == "test":
        frames = [f for f in frames if f.camera_index == cfg.test.camera] or frames
    return pick_frames(frames, cfg.test.max_frames)


@torch.no_grad()
def evaluate_renders(cfg, model: GaussianEigenModel, avatar: GaussianAvatar, data: ActorData,
                     export: VhapExport, sizes: dict, log) -> dict:
    """PSNR (full / masked) of the regressor and of the GEM oracle (coefficients projected from the
    regressor's output, module docstring) on val and test frames, and a table of the oracle's PSNR and
    GEM's size against the number of components (the same count for every attribute); sizes: the full
    model's, from ``_log_sizes``. An empty val split (a one-camera export) is logged and left out (its
    table columns None)."""
    device = data.device
    white = torch.tensor(WHITE, device=device)
    full = max(b.n_components for blocks in model.blocks.values() for b in blocks)
    counts = sorted({min(n, full) for n in cfg.gem.table_components} | {full})
    variants = {"regressor": None, ORACLE: model.to(device)}
    for n in counts[:-1]:
        variants[f"{ORACLE}_{n}"] = model.truncated({a: n for a in ATTRIBUTES}).to(device)
    results = {"coefficients": "oracle: the projection on GEM of the regressor's own Gaussians of each frame's "
                               "timestep, a best case for GEM, not a prediction"}
    splits = [s for s in ("val", "test") if s != "val" or not export.empty_split("val", "no val PSNR", log)]
    for split in splits:
        frames = _eval_frames(cfg, export, split)
        by_step: dict[int, list[Frame]] = {}
        for frame in frames:  # each timestep's regressor output is computed once, for all its cameras
            by_step.setdefault(frame.timestep_index, []).append(frame)
        steps = sorted(by_step)
        R, t = data.gem_pose(steps)
        errors = ReconstructionErrors(model) if split == "test" else None
        scores = {name: [] for name in variants}
        for i, head in enumerate(gem_space_gaussians(avatar, data, steps)):
            if errors is not None:
                errors.add(head)
            coefficients = {name: m.project(head) for name, m in variants.items() if m is not None}
            for frame in by_step[steps[i]]:
                regressor, gt, alpha = render_frame(avatar, data, frame)
                scores["regressor"].append(image_metrics(regressor, gt, alpha))
                cam = (frame.camera.viewmat[None].to(device), frame.camera.K[None].to(device), frame.camera.width,
                       frame.camera.height, white)
                for name, c in coefficients.items():
                    rgb = render_gem(variants[name], c, R[i:i + 1], t[i:i + 1], *cam).rgb[0].clamp(0, 1)
                    scores[name].append(image_metrics(rgb, gt, alpha))
        if errors is not None:
            results["test_error"] = _log_errors(model, errors.result(), log, f"held-out test frames ({len(steps)})")
        results[split] = {name: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
                          for name, rows in scores.items()}
        res = results[split]
        log(f"{split} ({len(frames)} frames): PSNR full / masked  regressor {res['regressor']['psnr']:.2f} / "
            f"{res['regressor']['psnr_masked']:.2f} dB   GEM oracle (regressor's Gaussians projected) "
            f"{res[ORACLE]['psnr']:.2f} / {res[ORACLE]['psnr_masked']:.2f} dB")
    log("GEM oracle by component count (coefficients projected from the regressor's output):")
    log("components  size fp32 / fp16 MB   val PSNR full / masked   test PSNR full / masked")
    table = []
    for n in counts:
        name = ORACLE if n == full else f"{ORACLE}_{n}"
        m = variants[name]
        fp32, fp16 = ((sizes["gem_fp32"], sizes["gem_fp16"]) if n == full  # measured once already
                      else (m.nbytes() / MB, m.nbytes(half=True) / MB))
        entry = {"components": n, "fp32_mb": fp32, "fp16_mb": fp16,
                 **{f"oracle_{s}_{k}": results[s][name][k] if s in results else None  # None: an empty val split
                    for s in ("val", "test") for k in ("psnr", "psnr_masked")}}
        table.append(entry)
        db = {k: "     -" if v is None else f"{v:6.2f}" for k, v in entry.items()}
        log(f"{n:10d}  {entry['fp32_mb']:8.2f} / {entry['fp16_mb']:6.2f}     {db['oracle_val_psnr']} / "
            f"{db['oracle_val_psnr_masked']}          {db['oracle_test_psnr']} / {db['oracle_test_psnr_masked']}")
    results["table"] = table
    return results

