"""Configuration: every key declared once, with its default and meaning.

A config file is YAML with one mapping per section (``actor:``, ``data:``, ...). A file may
name another as its ``base`` (a path relative to the file itself); the base is loaded
first and the file's keys override it. Command-line overrides are ``section.key=value``
(the value parsed as YAML). An unknown or misspelt key is an error that names the closest
known key; a value of the wrong type is an error that names the key and the file.

Paths in configs are relative to the repository root (``lib.paths.resolve`` turns them into
absolute paths, in one place); absolute paths are refused so that configs travel.

    cfg = load_config("configs/synthetic.yml", ["train.iterations=100"])
    cfg.train.iterations   # -> 100
    save_config(cfg, run_dir / "config.yml")
"""
from __future__ import annotations

import copy
import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lib.atomic import write_text
from lib.errors import ProjectError


@dataclass(frozen=True)
class Key:
    default: Any
    help: str
    is_path: bool = False          # relative to the repository root
    choices: tuple | None = None   # allowed values (of each item, for a list), if a closed set
    ge: float | None = None        # bounds of a number (of each item, for a list of numbers)
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    length: int | tuple | None = None  # a list's length: exact, or (min, max) with None = unbounded

    def rule(self) -> str:
        """The allowed values in words, e.g. '>= 1', '> 0, <= 1', '3 items' (empty when any)."""
        parts = [f"{op} {bound:g}" for op, bound in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
                 if bound is not None]
        if self.choices is not None:
            parts.append("one of " + ", ".join(map(str, self.choices)))
        if isinstance(self.length, int):
            parts.append(f"{self.length} items")
        elif self.length is not None and self.length[0]:
            parts.append(f"at least {self.length[0]} item{'s' if self.length[0] > 1 else ''}")
        return ", ".join(parts)


# The tracked FLAME parameters a per-timestep refinement can correct (lib.models.flame_refinement.UNITS).
REFINABLE = ("rotation", "translation", "neck_pose", "jaw_pose", "eyes_pose", "expr")

# fmt: off
SCHEMA: dict[str, dict[str, Key]] = {
    "actor": {
        "name": Key("synthetic_a", "actor name; its runs live in experiments/<name>/"),
        "data_dir": Key("data/synthetic/actor_a", "VHAP/GaussianAvatars export folder (holds transforms_*.json)", is_path=True),
        "flame_model": Key("data/synthetic/head/flame2023.pkl", "FLAME-format model pickle (real FLAME 2020/2023 or the synthetic one)", is_path=True),
        "flame_uv": Key("data/synthetic/head/head_template.obj", "OBJ with the model's UV layout (vt and f v/vt)", is_path=True),
        "flame_masks": Key("data/synthetic/head/FLAME_masks.pkl", "pickle: region name -> vertex indices (FLAME_masks.pkl)", is_path=True),
        "n_shape": Key(300, "shape parameters used (at most what the model file holds: more is an error, fewer drops the rest knowingly)", ge=0),
        "n_expr": Key(100, "expression parameters used (at most what the model file holds: more is an error, fewer drops the rest knowingly)", ge=0),
        "identity_timestep": Key(0, "timestep of the neutral reference ('identity') frame", ge=0),
        "identity_camera": Key(8, "camera of the neutral reference frame (the frontal camera)", ge=0),
        "experiments_dir": Key("experiments", "folder holding one artifact folder per actor", is_path=True),
        "close_mouth": Key(False, "close the hole between the lips with faces of their own and a UV chart (GEM's way; lib/geometry/mouth.py): for real FLAME, whose mouth is a hole; not for a head with a mouth cavity"),
    },
    "run": {
        "name": Key("default", "name of this run of the actor: its artifacts live in experiments/<actor>/<run>/; another name trains an ablation beside it"),
    },
    "data": {
        "ds_rate": Key(1, "image downsampling factor applied when images are loaded (1 = full size)", ge=1),
        "workers": Key(2, "processes decoding training images ahead of the loop (0: the loop decodes them itself)", ge=0),
        "prefetch": Key(4, "images each worker decodes ahead", ge=1),
        "cache_gb": Key(2.0, "memory (GB per machine, shared by its processes) keeping decoded training images; beyond it they are decoded at every use (0: no cache)", ge=0),
        "background": Key([1.0, 1.0, 1.0], "RGB the training ground truth and renders are composited on when train.random_background is false (the export's own images are on white, as VHAP writes them)", ge=0, le=1, length=3),
        "masks_dir": Key("", "folder of render_masks.py's keep and mouth masks, outside the dataset; '' = masks/ in the actor's experiments folder (actor.experiments_dir/actor.name/masks), shared by its runs", is_path=True),
    },
    "synthetic": {
        "enabled": Key(False, "this actor is generated by the project (run.sh creates it when missing)"),
        "head_dir": Key("data/synthetic/head", "where the synthetic FLAME-format head model is written", is_path=True),
        "head_seed": Key(0, "seed of the synthetic head model (shared by all synthetic actors)", ge=0),
        "head_mouth": Key("cavity", "the synthetic head's mouth: a cavity with teeth behind the lips, or 'open' as real FLAME (a hole between the lips, nothing behind; the images still show the mouth's inside); one per head_dir", choices=("cavity", "open")),
        "seed": Key(1, "seed of this actor: identity shape, appearance, motion, tracking noise", ge=0),
        "scale": Key(0.25, "image size as a fraction of NeRSemble's 802x550 (H x W)", ge=0.05, le=2),
        "n_cameras": Key(16, "cameras on a frontal arc; camera 8 is frontal, the others shared evenly between its two sides; 1: one frontal camera, index 0 (a monocular export: its val split is empty)", ge=1),
        "sequences": Key(["EXP-1", "EXP-2", "EXP-3", "EMO-1"], "sequence names; the last one is held out as the test split", length=(2, None)),
        "frames_per_sequence": Key(24, "timesteps per sequence", ge=1),
        "tracking_noise": Key(0.0, "std of noise added to the written FLAME parameters (fraction of their motion range)", ge=0),
        "dynamic_offset": Key(0.0, "metres: largest per-timestep vertex offset written as VHAP's dynamic_offset, and part of the ground truth (0: none written)", ge=0),
        "teeth_rows": Key(0, "rows appended to the written static_offset and dynamic_offset, as VHAP writes them for its teeth vertices (VHAP: 120)", ge=0),
        "union": Key(False, "write each sequence as its own export beside actor.data_dir (<name>_<sequence>), relocated by its mean head translation as VHAP's exporter does, and actor.data_dir as their union"),
        "hair_fringe": Key(0.0, "largest opacity of flyaway hair: a see-through layer up to 1 cm over the hair, strand noise for opacity, so images and fg_masks have soft alpha around the hair as photos do (0: none, the images as before)", ge=0, le=1),
    },
    "mesh_pca": {
        "n_components": Key(100, "mesh PCA components kept (at most the number of train+val timesteps - 1)", ge=1),
        "canonical_jaw_deg": Key(20.0, "jaw opening of the canonical mesh in degrees (without canonical_flame_param.npz)", ge=-90, le=90),
    },
    "regressor": {
        "uv_size": Key(256, "UV map size; one Gaussian per valid texel (about 0.9 * size^2)", ge=8),
        "n_pca": Key(16, "mesh-PCA components the generator's input mesh is projected onto", ge=1),
        "widths": Key([64, 128, 256, 512, 512, 512], "generator channels per level, from uv_size down to 8x8", ge=1, length=(1, None)),
        "convs_per_level": Key(2, "modulated 3x3 convs per encoder / decoder level", ge=1),
        "feature_channels": Key(32, "channels of the learned UV feature map fed to the generator", ge=1),
        "style_dim": Key(128, "width of the style vector (MLP of the mesh-PCA coefficients)", ge=1),
        "colour_width": Key(64, "channels of the colour head's convs", ge=1),
        "removed_regions": Key(["neck"], "FLAME mask regions whose texels carry no Gaussian"),
        "init_scale": Key(1.0, "factor on the canonical Gaussians' scale (RMS distance to 3 nearest neighbours)", gt=0),
        "deform": Key("tracked", "mesh the Gaussians ride: the tracked mesh, or its projection on the first n_pca mesh-PCA components (the network's input; filters tracking jitter)", choices=("tracked", "pca")),
        "cut_band": Key(0.01, "metres: Gaussians this close to the neck cut (the neck region, or the chin's height for the hair) keep the tracked global pose where training or test.py's refit corrects it, fading to the corrected pose across the band, so the render's cut follows the tracking as the keep masks' does (lib/models/avatar.py); 0 = every Gaussian follows the corrections", ge=0),
    },
    "train": {
        "stage": Key("regressor", "what train.py / test.py train and evaluate", choices=("regressor", "mapping")),
        "iterations": Key(1000000, "optimiser steps (one timestep per process and step)", ge=1),
        "views_per_step": Key(1, "regressor: cameras of the step's timestep rendered from one evaluation of the networks (their losses averaged); fewer when the timestep has fewer cameras of the image's size (README, \"Views per step\")", ge=1),
        "time_limit_minutes": Key(0.0, "stop after this many training minutes (0 = off); the lr schedule then follows the time used when it is further along than the steps", ge=0),
        "lr": Key(5e-4, "Adam learning rate of the generator and colour head", gt=0),
        "lr_features": Key(5e-4, "Adam learning rate of the learned UV feature maps", ge=0),
        "refine_flame": Key(False, "learn per-timestep corrections of the tracked FLAME rotation, translation, jaw and expression of the train timesteps with the avatar (lib/models/flame_refinement.py); stored with the checkpoint and used by stages 3-4 and the evaluations of those timesteps; held-out test timesteps are not refined here (test.refit_tracking refits them for scoring)"),
        "refine_keys": Key(["rotation", "translation", "jaw_pose", "expr"], "which tracked FLAME parameters train.refine_flame corrects; the global pose alone ([rotation, translation]) keeps the posed meshes, so a step poses no FLAME", choices=REFINABLE, length=(1, None)),
        "refine_centred": Key(True, "train.refine_flame: remove each corrected key's mean over the train timesteps after every step, so the corrections fix frame-to-frame jitter and leave the tracker's average pose (which the held-out sequences share) as the reference (lib/models/flame_refinement.py)"),
        "refine_masks": Key(False, "train.refine_flame: render each training image's keep and mouth masks at its step from its timestep's corrected mesh (the rule of lib/dataset/masks.py) instead of reading those render_masks.py made from the tracked mesh, so the cut of the head from the neck follows the corrected pose rather than the tracker's jitter; the evaluations score against the masks on disk"),
        "lr_flame": Key(1e-2, "Adam learning rate of the FLAME corrections, in their units (0.01 rad, 1 mm, 0.1 expression); a timestep's corrections get a gradient only at its own steps (a few dozen in a CPU run), and torch's Adam carries them on between those, by about sqrt(train timesteps) times the rate per own step (README, \"Tracking jitter\"): 1e-3 left them where the tracker put them", gt=0),
        "lr_schedule": Key("multistep", "learning-rate decay over the run", choices=("multistep", "exponential", "constant")),
        "lr_milestones": Key([0.35, 0.7], "multistep: fractions of the run where the rate is multiplied by lr_gamma", ge=0, le=1),
        "lr_gamma": Key(0.33, "multistep: factor at each milestone", gt=0, le=1),
        "lr_final": Key(0.05, "exponential: factor reached at the last step", gt=0, le=1),
        "grad_clip": Key(5.0, "gradient-norm clip (0 = off)", ge=0),
        "random_background": Key(True, "render and composite the ground truth on a random colour (else data.background)"),
        "seed": Key(0, "seed of the weights and of the frame / background sampling", ge=0),
        "resume": Key(True, "continue from the newest checkpoint of the run folder; false starts over and moves the old checkpoints aside (never deletes them)"),
        "device": Key("auto", "auto (CUDA when available), cpu or cuda", choices=("auto", "cpu", "cuda")),
        "threads": Key(0, "CPU threads per process (torch and the native renderer); 0 = the cores this process may use, shared by the processes", ge=0),
        "bf16": Key(False, "bf16 autocast on the generator (CUDA only)"),
        "checkpoint_every": Key(10000, "steps between checkpoints (and one at the end)", ge=1),
        "keep_checkpoints": Key(2, "newest checkpoints kept in the run folder", ge=1),
        "nan_snapshot_every": Key(100, "steps between in-memory good states the NaN guard restores", ge=1),
        "log_every": Key(100, "steps between TensorBoard scalars", ge=1),
        "image_every": Key(5000, "steps between TensorBoard progress images (render | ground truth)", ge=1),
        "curve_every_minutes": Key(1.0, "minutes between val PSNR points of the PSNR-versus-minutes curve (0 = off)", ge=0),
        "curve_views": Key(6, "val images scored for each curve point", ge=1),
    },
    "loss": {
        "l1": Key(0.4, "weight of the per-pixel weighted L1", ge=0),
        "mouth": Key(150.0, "extra L1 weight inside the blurred mouth mask (1 + mouth * mask)", ge=0),
        "mouth_blur_px": Key(5, "radius in pixels of the Gaussian blur of the mouth mask", ge=0),
        "ssim": Key(0.8, "weight of 1 - SSIM (11-px Gaussian window)", ge=0),
        "alpha": Key(0.0, "weight of the L1 between the render's alpha and the head's alpha (foreground alpha times keep mask)", ge=0),
        "vgg": Key(0.05, "weight of the VGG19 feature L1 (only when vgg_weights is set)", ge=0),
        "vgg_from": Key(300000, "iteration from which the VGG loss is on", ge=0),
        "vgg_weights": Key("", "torchvision-layout VGG19 state_dict file; empty = no VGG loss", is_path=True),
        "position": Key(750.0, "weight of mean(position residual^2), metres", ge=0),
        "scale": Key(20.0, "weight of mean(scale^2), metres", ge=0),
        "flame_refine": Key(1e-3, "weight of mean(p^2) of the step's FLAME corrections in their units (train.refine_flame)", ge=0),
    },
    "test": {
        "splits": Key(["val", "test", "spin"], "what test.py renders: val (novel view), test (novel expression), spin (orbit)", length=(1, None), choices=("val", "test", "spin")),
        "camera": Key(8, "camera of the test split (and of the spin's centre view)", ge=0),
        "max_frames": Key(0, "frames rendered per split (0 = all), evenly spaced", ge=0),
        "refit_tracking": Key(["test"], "splits whose scored timesteps get their FLAME tracking refitted to the other cameras' frames before scoring, the avatar frozen and the scored camera never read (lib/train/fit_tracking.py); [] = as tracked (and as training refined them)", choices=("val", "test")),
        "refit_keys": Key(["rotation", "translation", "jaw_pose", "expr"], "which tracked FLAME parameters test.refit_tracking corrects; the networks run once per timestep either way: the global pose alone ([rotation, translation]) turns the timestep's Gaussians, the others (neck, jaw, eyes, expression) re-pose FLAME under the networks' held outputs (a step about 1.5x as long)", choices=REFINABLE, length=(1, None)),
        "refit_steps": Key(30, "test.refit_tracking: Adam steps, each rendering every scored timestep once", ge=1),
        "refit_lr": Key(0.05, "test.refit_tracking: Adam rate of the corrections (in FlameRefinement's units), decaying linearly to a tenth", gt=0),
        "spin_views": Key(100, "views of the orbit video", ge=1),
        "spin_yaw_deg": Key(20.0, "the orbit turns over +- this yaw around the head", ge=0, le=180),
        "fps": Key(25, "frame rate of the videos", ge=1),
        "lpips_backbone": Key("", "torchvision-layout VGG16 state_dict for LPIPS; empty = LPIPS unavailable", is_path=True),
        "lpips_weights": Key("", "LPIPS linear-layer weights (lpips package's v0.1 vgg.pth); empty = unavailable", is_path=True),
    },
    "gem": {
        "positions": Key(50, "components of the positions basis (per part with gem.parts; at most fitted frames - 1)", ge=1),
        "rotations": Key(40, "components of the rotations basis (raw wxyz quaternions, renormalised after)", ge=1),
        "scales": Key(40, "components of the scales basis (linear scales)", ge=1),
        "opacities": Key(50, "components of the opacities basis (opacities in [0, 1])", ge=1),
        "parts": Key(False, "one basis per face region (eyeballs, ears, mouth, nose, eye region, forehead, face, scalp, neck, rest)"),
        "fp16": Key(False, "store the bases in float16 (about half the file; means, variances, coefficients stay float32)"),
        "splits": Key(["train", "val"], "dataset splits whose timesteps the bases are fitted to", length=(1, None), choices=("train", "val", "test")),
        "evaluate": Key(True, "pca_gauss.py renders val and test frames (test.camera, test.max_frames) with the regressor and with the GEM oracle (its output projected on GEM) and scores both"),
        "table_components": Key([5, 10, 20, 50], "component counts (same for every attribute) of the PSNR / size table", ge=1, length=(1, None)),
    },
    "mapping": {
        "signal": Key("flame", "driving signal, relative to actor.identity_timestep: FLAME expr+jaw+eyes, mesh-PCA coefficients, or a TorchScript image encoder's features", choices=("flame", "mesh_pca", "encoder")),
        "n_mesh_pca": Key(50, "mesh_pca signal: leading mesh-PCA components used", ge=1),
        "encoder": Key("", "encoder signal: TorchScript file mapping face crops [B, 3, S, S] RGB in [0, 1] to features [B, F]", is_path=True),
        "encoder_crop": Key(224, "encoder signal: side S in pixels of the square face crop fed to the encoder", ge=8),
        "encoder_components": Key(50, "encoder signal: components of the per-actor PCA of the relative features (sigma units, clamped to +-2.9)", ge=1),
        "architecture": Key("parts", "parts: one MLP per GEM part; attention: each part's input gated by a global context (GEM's global-aware variant)", choices=("parts", "attention")),
        "width": Key(256, "hidden width of each part's 5-layer MLP", ge=1),
        "dropout": Key(0.2, "dropout after the second linear layer", ge=0, lt=1),
        "warmup_iterations": Key(50000, "warm-up steps: the network regresses the GEM's own coefficients of the train timesteps (full batch); with basis_lr the GEM is fine-tuned on their renders", ge=0),
        "iterations": Key(200000, "photometric steps: the network's coefficients rendered against the images", ge=0),
        "time_limit_minutes": Key(0.0, "stop the photometric phase after this many minutes (0 = off)", ge=0),
        "lr": Key(1e-3, "AdamW learning rate of the network (schedule: train.lr_schedule and its keys)", gt=0),
        "weight_decay": Key(0.01, "AdamW weight decay", ge=0),
        "basis_lr": Key(0.0, "warm-up: Adam rate of the GEM means and bases, fine-tuned on renders of the ground-truth coefficients and re-orthonormalised every 10 steps (0 = frozen)", ge=0),
        "weighting": Key("uniform", "coefficient L1 weight per coefficient: uniform (the method) or variance (sqrt of its share of its attribute's variance)", choices=("uniform", "variance")),
        "l1": Key(0.3, "photometric phase: weight of the image L1", ge=0),
        "ssim": Key(1.0, "photometric phase: weight of 1 - SSIM", ge=0),
        "vgg": Key(0.03, "photometric phase: weight of the VGG perceptual loss (only when loss.vgg_weights is set)", ge=0),
        "regression": Key(0.005, "photometric phase: weight of L1(c, c_gt) to the GEM's own coefficients", ge=0),
        "magnitude": Key(0.001, "weight of mean(c^2) on the predicted coefficients", ge=0),
        "hold_at_mean": Key(["scalp"], "GEM parts whose coefficients are zero (the mean) at test time, e.g. the hair (needs gem.parts)"),
    },
    "viewer": {
        "components": Key(5, "first components of each attribute swept by pca_viewer.py", ge=1),
        "sigma": Key(3.0, "sweeps run from -sigma to +sigma (coefficients in sigma units)", gt=0),
        "strip_steps": Key(7, "images per PNG strip of a sweep", ge=2),
        "video_frames": Key(40, "frames per sweep video (0 -> +sigma -> -sigma -> 0)", ge=2),
        "fps": Key(25, "frame rate of the sweep videos and of the web viewer's playback", ge=1),
        "sliders": Key(10, "components per attribute (per part) given a slider in the web viewer", ge=0),
        "host": Key("127.0.0.1", "address the web viewer listens on (0.0.0.0 exposes it to the network)"),
        "port": Key(8080, "port of the web viewer", ge=0, le=65535),
        "export_energy": Key(1.0, "web export: per basis, keep the fewest leading components that explain this share of its variance", gt=0, le=1),
        "export_bits": Key(8, "web export: bits per value of each basis's largest component; the others get bits by their reach (sqrt(eigenvalue) x range): the same quantisation step", ge=1, le=8),
        "export_min_bits": Key(2, "web export: fewest bits per value of a kept component (means 16 bits, colours 8)", ge=1, le=8),
    },
}
# fmt: on


# Keys a run may change and still resume from its checkpoints: how long, how often, where and on what
# hardware it runs, not what it trains. Every other key a stage reads shapes its model
# (lib.train.checkpoint.check_resume).
RESUMABLE = frozenset({
    "actor.experiments_dir", "data.workers", "data.prefetch", "data.cache_gb", "train.iterations", "train.time_limit_minutes", "train.device",
    "train.threads", "train.resume", "train.checkpoint_every", "train.keep_checkpoints", "train.nan_snapshot_every",
    "train.log_every", "train.image_every", "train.curve_every_minutes", "train.curve_views", "mapping.iterations",
    "mapping.time_limit_minutes",
})


class ConfigError(ProjectError, ValueError):
    """A config file or override that cannot be used as written."""


class Section:
    """Attribute access to one section's values (``cfg.train.lr``)."""

    def __init__(self, values: dict[str, Any]):
        self.__dict__.update(values)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)

    def __repr__(self) -> str:
        return f"Section({self.__dict__})"


class Config:
    """A validated configuration: one ``Section`` per schema section."""

    def __init__(self, values: dict[str, dict[str, Any]], source: str = "<defaults>"):
        self.source = source
        for name in SCHEMA:
            setattr(self, name, Section(values[name]))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: getattr(self, name).to_dict() for name in SCHEMA}


def _all_keys() -> list[str]:
    return [f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys]


def _unknown(name: str, where: str) -> ConfigError:
    name = str(name)
    close = difflib.get_close_matches(name, _all_keys() + list(SCHEMA), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known sections: {', '.join(SCHEMA)}"
    return ConfigError(f"unknown config key '{name}' in {where}{hint}")


def _typed(value: Any, like: Any) -> tuple[bool, Any]:
    """Whether ``value`` has the type of the default ``like`` (an int is a fine float). -> (ok, value)"""
    if isinstance(like, bool):
        return isinstance(value, bool), value
    if isinstance(like, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if isinstance(like, int):
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, type(like)), value


def _bounds_error(spec: Key, x: float) -> str | None:
    """The bound that number ``x`` breaks, as text (e.g. '>= 1'), or None."""
    if not math.isfinite(x):
        return "a finite number"
    for op, bound, ok in (("> ", spec.gt, lambda b: x > b), (">= ", spec.ge, lambda b: x >= b),
                          ("< ", spec.lt, lambda b: x < b), ("<= ", spec.le, lambda b: x <= b)):
        if bound is not None and not ok(bound):
            return op + f"{bound:g}"
    return None


def _check_value(section: str, key: str, value: Any, where: str) -> Any:
    spec = SCHEMA[section][key]
    default = spec.default
    name = f"{section}.{key}"
    if value is None:
        raise ConfigError(f"{name} in {where} has no value (null); give one like {default!r} or remove the line "
                          "to keep the default")
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"{name} = {value!r} in {where}: expected a list like {default!r}")
        low, high = (spec.length, spec.length) if isinstance(spec.length, int) else (spec.length or (None, None))
        if (low is not None and len(value) < low) or (high is not None and len(value) > high):
            count = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise ConfigError(f"{name} = {value!r} in {where}: needs {count} item(s)")
        items = []
        for item in value:
            like = default[0] if default else item
            ok, item = _typed(item, like)
            if not ok or item is None:
                raise ConfigError(f"{name} = {value!r} in {where}: item {item!r} is not a {type(like).__name__}")
            items.append(_check_item(spec, name, item, value, where))
        return items
    if spec.choices is None:
        ok, value = _typed(value, default)
        if not ok:
            raise ConfigError(
                f"{name} = {value!r} in {where}: expected {type(default).__name__} like {default!r}")
    value = _check_item(spec, name, value, value, where)
    if isinstance(default, str) and value == "" and default != "":
        raise ConfigError(f"{name} in {where} is empty; give a value like {default!r}")
    if spec.is_path and isinstance(value, str) and os.path.isabs(value):
        raise ConfigError(
            f"{name} = {value!r} in {where}: paths in configs are relative to the repository root; "
            "use a relative path (a symlink under data/ can point anywhere)")
    return value


def _check_item(spec: Key, name: str, item: Any, whole: Any, where: str) -> Any:
    """One value (or one item of a list value) against the key's choices and bounds."""
    if spec.choices is not None and item not in spec.choices:
        raise ConfigError(f"{name} = {whole!r} in {where}: {item!r} is not one of {list(spec.choices)}")
    if isinstance(item, (int, float)) and not isinstance(item, bool):
        broken = _bounds_error(spec, item)
        if broken is not None:
            shown = "" if item is whole else f" (item {item!r})"
            raise ConfigError(f"{name} = {whole!r} in {where}{shown}: must be {broken}")
    return item


def _merge(values: dict, layer: dict, where: str) -> None:
    """Apply one YAML layer (sections of keys) onto ``values``, validating every key."""
    for section, keys in layer.items():
        if section not in SCHEMA:
            raise _unknown(section, where)
        if not isinstance(keys, dict):
            raise ConfigError(f"section '{section}' in {where} must be a mapping of keys, got {keys!r}")
        for key, value in keys.items():
            if key not in SCHEMA[section]:
                raise _unknown(f"{section}.{key}", where)
            values[section][key] = _check_value(section, key, value, where)


def _read_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The YAML layers of ``path``, base first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config inheritance loops through {path}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _load_yaml(path.read_text())
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: '{e.key}' is written twice (lines {e.first} and {e.second}); a second "
                          "copy would silently replace the first: merge them into one") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML: {_one_line(e)}") from None
    if data is None:
        raise ConfigError(f"{path} is empty; a config holds sections of keys (e.g. 'base: default.yml' and "
                          "'actor: {name: ...}'); to run with every default, name configs/default.yml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    layers = []
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: base = {base!r} must be the path of another config file (relative to this one)")
    if base is not None:
        layers += _read_layers(path.parent / base, seen + (path,))
    layers.append((data, str(path)))
    return layers


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.lr=1e-4' -> ('train', 'lr', 0.0001)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    name, raw = text.split("=", 1)
    if name.count(".") != 1:
        raise _unknown(name, "the command line")
    section, key = name.split(".")
    try:
        value = _load_yaml(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({_one_line(e)})") from None
    return section, key, value


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, second: int):
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                raise yaml.constructor.ConstructorError(None, None, f"a key must be a name, got {key!r}",
                                                        key_node.start_mark)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise _DuplicateKey(key, lines[key], line)
            lines[key] = line
        return super().construct_mapping(node, deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _one_line(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where (line, column)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or " ".join(str(error).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _as_float(value: Any) -> Any:
    """YAML 1.1 reads '5e-4' as a string: accept it as the number the user meant."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the file's base chain, then command-line overrides; all validated."""
    values = {s: {k: copy.deepcopy(spec.default) for k, spec in keys.items()} for s, keys in SCHEMA.items()}
    source = "<defaults>"
    if path is not None:
        for layer, where in _read_layers(Path(path)):
            _merge(values, _fix_numbers(layer), where)
        source = str(Path(path))
    for text in overrides:
        section, key, value = parse_override(text)
        _merge(values, _fix_numbers({section: {key: value}}), "the command line")
    _check_relations(values, source)
    return Config(values, source)


def _check_relations(values: dict[str, dict[str, Any]], source: str) -> None:
    """Checks that involve more than one key (each key alone was checked as it was read)."""
    def fail(message: str) -> None:
        raise ConfigError(f"{message} (resolved from {source})")

    for key, name in (("actor.name", values["actor"]["name"]), ("run.name", values["run"]["name"])):
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            fail(f"{key} = {name!r} names a folder under {values['actor']['experiments_dir']}/: use letters, "
                 "digits, '_', '-' or '.', not a path")
    if values["run"]["name"] == "masks" and not values["data"]["masks_dir"]:
        fail("run.name = 'masks' is the folder of the actor's masks (experiments/<actor>/masks/, data.masks_dir "
             "empty); name the run otherwise")
    r = values["regressor"]
    levels = math.log2(r["uv_size"] / 8)
    if levels != int(levels):
        fail(f"regressor.uv_size = {r['uv_size']} must be 8 times a power of two (8, 16, ..., 256)")
    if len(r["widths"]) != int(levels) + 1:
        fail(f"regressor.widths has {len(r['widths'])} entries; uv_size {r['uv_size']} needs one per level from "
             f"{r['uv_size']} down to 8, i.e. {int(levels) + 1}")
    m = values["mapping"]
    if values["train"]["stage"] == "mapping" and m["warmup_iterations"] + m["iterations"] < 1:
        fail("mapping.warmup_iterations + mapping.iterations is 0: the mapping network would not train")



def _fix_numbers(layer: dict) -> dict:
    """String values of float keys parsed as numbers where they are numbers ('5e-4')."""
    out = {}
    for section, keys in layer.items():
        if section in SCHEMA and isinstance(keys, dict):
            keys = {k: _as_float(v) if isinstance(SCHEMA[section].get(k, Key(None, "")).default, float) else v
                    for k, v in keys.items()}
        out[section] = keys
    return out


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically (temp file + rename)."""
    path = Path(path)
    write_text(path, f"# resolved from {cfg.source}\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def describe() -> str:
    """Every key with its default, allowed values and meaning: the README's config table."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for section, keys in SCHEMA.items():
        for key, spec in keys.items():
            lines.append(f"| `{section}.{key}` | `{spec.default!r}` | {spec.rule()} | {spec.help} |")
    return "\n".join(lines)
