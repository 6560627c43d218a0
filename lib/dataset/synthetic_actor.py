"""The embedded synthetic actor: multi-view video of a generated head, in VHAP's export format.

    python -m lib.dataset.synthetic_actor configs/synthetic_a.yml [section.key=value ...]

writes the synthetic head model (``synthetic.head_dir``) if it is missing, then the actor's dataset
(``actor.data_dir``) if it is missing. The dataset is built in a hidden temporary folder beside
``actor.data_dir`` and renamed into place at the end, so an interrupted run never leaves half a
dataset (a leftover temporary folder of the same actor is removed by the next run).

What it holds (the layout of VHAP's ``export_as_nerf_dataset.py`` + ``combine_nerf_datasets.py``):
    transforms_{train,val,test}.json   per frame: file_path, fg_mask_path, flame_param_path,
                                       timestep_index, camera_index, camera_id, transform_matrix
                                       (OpenGL camera-to-world), fl_x, fl_y, cx, cy (= H - cy_cv),
                                       w, h, camera_angle_x, camera_angle_y; top level: the last
                                       frame's intrinsics, timestep_indices, camera_indices
    images/{t:05d}_{c:02d}.png         RGB composited on white
    fg_masks/{t:05d}_{c:02d}.png       coverage of everything drawn (head, hair, neck, torso)
    flame_param/{t:05d}.npz            the "tracked" FLAME parameters (float32)
    canonical_flame_param.npz          VHAP's canonical: shape and offsets, zero expression, pose
                                       and eyes, jaw opened 0.3 rad
    sequences_{trainval,test}.txt, synthetic_actor.json (how it was made), contact_sheet.png

The other shapes of export VHAP writes, for the tests to meet them (``synthetic.*``):
    union: true        each sequence in its own folder ``<data_dir>_<sequence>`` (images, masks, FLAME files
                       numbered from 0, transforms.json), relocated as VHAP's exporter does (translation
                       minus the sequence's mean, cameras moved with it: same pixels, other poses), and at
                       data_dir only the union's jsons (``../<folder>/...`` paths), canonical and lists
    dynamic_offset     per-timestep rest-space offsets (``dynamic_offsets``), in the files and the images
    teeth_rows: 120    offsets padded with rows for teeth vertices the model does not have, as VHAP's
    n_cameras: 1       the frontal camera alone, index 0: train = test = that camera, val empty

Rig (like NeRSemble's): ``n_cameras`` cameras about ``CAMERA_DISTANCE`` from the head on a frontal
arc of +-``ARC_YAW_DEG`` yaw, alternating between two heights, camera 8 frontal and the others
shared evenly between its two sides (``arc_layout``: 16 cameras in NeRSemble's order); focal lengths a
few percent apart, principal points tens of pixels off centre, a little roll. The rig depends only
on the head model (its focal length frames the template's crown-to-chin at ``FRAMING`` of the
image height in camera 8), never on the actor, as one capture rig serves many subjects.

Motion: one timestep index across all sequences. Each sequence is a chain of keyframes eased into
each other (expression, jaw, gaze) over smooth sinusoidal head rotation, neck pose and translation.
The training sequences exercise every named expression (``EXPRESSION_NAMES``) alone, a jaw
opening alone, and mixtures; the last sequence, held out as the test split, mixes them in other
combinations and amplitudes. Splits: train = every camera but 8 on the training sequences, val =
camera 8 on them, test = all cameras on the held-out sequence.

Ground truth is not the tracked mesh (see ``synthetic_appearance``): fine relief, a hair volume
and a world-fixed torso are added, and the written parameters may carry ``tracking_noise``.
Images are rasterized at ``SUPERSAMPLE`` x the size and area-averaged, for anti-aliased edges.
With ``hair_fringe`` > 0 a see-through flyaway layer over the hair is laid over each supersample
before the averaging (colour a·C + (1 - a)·behind, coverage a + (1 - a)·behind's), so images and
fg_masks carry fractional alpha around the hair as photos do, and image = F·a + (1 - a) still holds.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lib.cli import main
from lib.config import ConfigError
from lib.dataset.cameras import Camera, stack_cameras
from lib.dataset.vhap import DatasetError
from lib.dataset.synthetic_appearance import (
    HairFringe, Palette, actor_palette, build_texture, fbm, fringe_opacity, ground_truth_surface, hair_fringe, shade,
    torso_mesh, torso_texture,
)
from lib.flame.model import FlameModel, load_regions
from lib.flame.synthetic import (EXPRESSION_NAMES, GROUND_TRUTH_DIR, KEPT_FILE, ensure_head_model, head_model_complete,
                                 model_paths)
from lib.geometry.obj_io import read_obj
from lib.geometry.rasterize import rasterize_camera
from lib.geometry.uv import vertex_normals
from lib.lock import locked
from lib.paths import resolve

NERSEMBLE_HEIGHT, NERSEMBLE_WIDTH = 802, 550
FRONTAL_CAMERA = 8  # NeRSemble's frontal camera: the val split and the identity frame
CAMERA_DISTANCE = 1.0  # m
ARC_YAW_DEG = 56.0
FRAMING = 0.60  # crown-to-chin / image height in the frontal camera
SUPERSAMPLE = 2
CANONICAL_JAW = 0.3  # rad, VHAP's canonical jaw opening
PARAM_KEYS = ("shape", "expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "translation", "static_offset")
_RIG_SEED = 2023  # one rig for every actor
_AIM_BELOW_CENTRE = 0.03  # m: cameras aim below the head's middle so the shoulders enter the frame
_HAIR_BEHIND = 0.008  # m: the hair makes the head deeper at the back; cameras aim at the middle
_CONTACT_CAMERAS = (0, 4, 8, 12, 15)
_CONTACT_TILE_HEIGHT = 240  # px
_PIXELS_PER_CALL = 4_000_000  # bounds the rasterizer's memory (about 200 bytes per pixel)


@dataclass(frozen=True)
class ActorSpec:
    """The ``synthetic`` config section, as the generator uses it."""

    seed: int
    scale: float
    n_cameras: int
    sequences: tuple[str, ...]
    frames_per_sequence: int
    tracking_noise: float
    dynamic_offset: float = 0.0  # m, size of the per-timestep offsets; 0: none written
    teeth_rows: int = 0  # rows appended to the written offsets, as VHAP's teeth vertices (120)
    union: bool = False  # each sequence its own relocated export + a union of them (VHAP's layout)
    hair_fringe: float = 0.0  # largest opacity of the flyaway hair layer; 0: none (``HairFringe``)

    @classmethod
    def from_config(cls, cfg) -> "ActorSpec":
        s = cfg.synthetic
        return cls(s.seed, s.scale, s.n_cameras, tuple(s.sequences), s.frames_per_sequence, s.tracking_noise,
                   s.dynamic_offset, s.teeth_rows, s.union, s.hair_fringe)

    def check(self) -> None:
        if len(self.sequences) < 2:
            raise ConfigError(f"synthetic.sequences = {list(self.sequences)}: need at least two (the last one "
                             "is held out as the test split)")
        if len(set(self.sequences)) != len(self.sequences):
            raise ConfigError(f"synthetic.sequences = {list(self.sequences)} repeats a name")
        if 1 < self.n_cameras <= FRONTAL_CAMERA:
            raise ConfigError(f"synthetic.n_cameras = {self.n_cameras}: camera {FRONTAL_CAMERA} is the frontal "
                             f"(validation) camera, as in NeRSemble; use at least {FRONTAL_CAMERA + 1}, or 1 for "
                             "a monocular export")
        if self.union and any(not n or n in (".", "..") or "/" in n or os.sep in n for n in self.sequences):
            raise ConfigError(f"synthetic.sequences = {list(self.sequences)}: with synthetic.union each name is "
                              "a folder name (no '/', not '.' or '..')")
        if self.frames_per_sequence < 1:
            raise ConfigError(f"synthetic.frames_per_sequence = {self.frames_per_sequence}: must be >= 1")
        if not 0.0 <= self.hair_fringe <= 1.0:
            raise ConfigError(f"synthetic.hair_fringe = {self.hair_fringe}: an opacity, between 0 (no flyaway "
                              "hair) and 1")
        if not 0.05 <= self.scale <= 2.0:
            raise ConfigError(f"synthetic.scale = {self.scale}: use a fraction of 802x550 between 0.05 and 2")


def image_size(scale: float) -> tuple[int, int]:
    """(H, W) of the actor's images: NeRSemble's 802 x 550 times `scale`, rounded down."""
    return int(NERSEMBLE_HEIGHT * scale), int(NERSEMBLE_WIDTH * scale)


# ---------------------------------------------------------------- rig


def crown_and_chin(verts: Tensor, masks: dict[str, np.ndarray]) -> tuple[int, int]:
    """Vertex indices of the crown (highest vertex) and the chin (lowest 'face' vertex). verts: [V, 3]"""
    face = torch.as_tensor(masks["face"])
    return int(verts[:, 1].argmax()), int(face[verts[face, 1].argmin()])


def arc_layout(n_cameras: int) -> list[tuple[float, int]]:
    """(nominal yaw in degrees, place along the arc from the left) of each camera index, n_cameras > 8.

    Camera 8 is frontal; the others share the arc's two halves as evenly as their count allows (the
    left one takes the odd camera), each half evenly spaced out to +-ARC_YAW_DEG, and take the other
    indices in order along the arc. 16 cameras give NeRSemble's order (0-7 left, 9-15 right); with
    fewer, both sides of the frontal (validation) view are still seen, as on any real rig."""
    n_left = n_cameras // 2
    n_right = n_cameras - 1 - n_left
    others = [i for i in range(n_cameras) if i != FRONTAL_CAMERA]
    yaws = ([-ARC_YAW_DEG * (n_left - k) / n_left for k in range(n_left)]
            + [ARC_YAW_DEG * (k + 1) / n_right for k in range(n_right)])
    layout = [(0.0, n_left)] * n_cameras
    for place, (index, yaw) in enumerate(zip(others, yaws)):
        layout[index] = (yaw, place + (place >= n_left))
    return layout


def make_rig(template: Tensor, masks: dict[str, np.ndarray], n_cameras: int, scale: float) -> list[Camera]:
    """The capture rig as OpenCV cameras at the actor's image size. template: [V, 3] rest mesh.

    One camera (a monocular export) is the rig's frontal camera, numbered 0 as a lone camera is."""
    if n_cameras == 1:
        frontal = make_rig(template, masks, FRONTAL_CAMERA + 1, scale)[FRONTAL_CAMERA]
        return [Camera(frontal.viewmat, frontal.K, frontal.width, frontal.height, camera_index=0)]
    height, width = image_size(scale)
    crown, chin = crown_and_chin(template, masks)
    top, bottom = float(template[crown, 1]), float(template[chin, 1])
    depth = template[:, 2]
    front_to_back = 0.5 * float(depth.max() + depth.min()) - _HAIR_BEHIND
    target = np.array([0.0, 0.5 * (top + bottom) - _AIM_BELOW_CENTRE, front_to_back])
    # Focal length that puts the template's crown and chin FRAMING x H apart in the frontal view.
    ends = template[[crown, chin]].double().numpy() - (target + np.array([0.0, 0.0, CAMERA_DISTANCE]))
    focal = FRAMING * NERSEMBLE_HEIGHT / abs(ends[1, 1] / ends[1, 2] - ends[0, 1] / ends[0, 2])
    rng = np.random.default_rng(_RIG_SEED)
    cameras = []
    for i, (yaw, place) in enumerate(arc_layout(n_cameras)):
        frontal = i == FRONTAL_CAMERA
        # Camera 8 sits exactly in front at the nominal distance: it defines the framing.
        jitter = (lambda lo, hi, n=None: 0.0 if frontal else rng.uniform(lo, hi, n))  # noqa: E731
        pitch = 0.0 if frontal else (9.0 if place % 2 == 0 else -4.0) + jitter(-2.0, 2.0)
        yaw_r, pitch_r = math.radians(yaw + jitter(-2.0, 2.0)), math.radians(pitch)
        distance = CAMERA_DISTANCE * (1.0 + jitter(-0.04, 0.04))
        aim = target + jitter(-0.005, 0.005, 3)
        eye = aim + distance * np.array([math.cos(pitch_r) * math.sin(yaw_r), math.sin(pitch_r),
                                         math.cos(pitch_r) * math.cos(yaw_r)])
        f = focal * rng.uniform(0.97, 1.03) if not frontal else focal
        K = np.array([[f, 0.0, NERSEMBLE_WIDTH / 2 + rng.uniform(-25, 25)],
                      [0.0, f * rng.uniform(0.998, 1.002), NERSEMBLE_HEIGHT / 2 + rng.uniform(-25, 25)],
                      [0.0, 0.0, 1.0]])
        K[0] *= width / NERSEMBLE_WIDTH  # the full-size image resampled to the actor's size
        K[1] *= height / NERSEMBLE_HEIGHT
        roll = math.radians(rng.uniform(-2.0, 2.0))
        forward = (aim - eye) / np.linalg.norm(aim - eye)
        up = np.array([0.0, 1.0, 0.0])
        up = up * math.cos(roll) + np.cross(forward, up) * math.sin(roll)  # turn "up" about the axis
        cameras.append(Camera.look_at(eye, aim, torch.as_tensor(K), width, height, up=up, camera_index=i))
    return cameras


# ---------------------------------------------------------------- motion


def _eased(keys: np.ndarray, n_frames: int) -> np.ndarray:
    """Keyframes [K, D] spread evenly over n_frames (on whole frames when there are enough),
    cosine-eased in between. -> [n_frames, D]"""
    if len(keys) == 1 or n_frames == 1:
        return np.repeat(keys[:1], n_frames, axis=0)
    times = np.linspace(0.0, n_frames - 1, len(keys))
    if n_frames >= len(keys):
        times = np.round(times)
    frame = np.arange(n_frames)
    j = np.clip(np.searchsorted(times, frame, side="right") - 1, 0, len(keys) - 2)
    f = np.clip((frame - times[j]) / (times[j + 1] - times[j]), 0.0, 1.0)
    f = 0.5 - 0.5 * np.cos(np.pi * f)
    return keys[j] + (keys[j + 1] - keys[j]) * f[:, None]


def _waves(rng: np.random.Generator, n_frames: int, amplitude: np.ndarray) -> np.ndarray:
    """Smooth motion [n_frames, D]: two sinusoids per dimension, 0.4-1.6 cycles per sequence."""
    tau = np.linspace(0.0, 1.0, n_frames)[:, None]
    out = np.zeros((n_frames, len(amplitude)))
    for weight in (0.7, 0.3):
        freq = rng.uniform(0.4, 1.6, len(amplitude))
        phase = rng.uniform(0, 2 * np.pi, len(amplitude))
        out += weight * np.sin(2 * np.pi * freq * tau + phase)
    return out * amplitude


def _sequence_keys(rng: np.random.Generator, k: int, n_train: int, n_named: int, n_expr: int,
                   held_out: bool) -> list[dict]:
    """Keyframes of sequence k as dicts of expr [100] / jaw (rad) / gaze (pitch, yaw rad)."""
    def key(expr=None, jaw=0.0, gaze=True):
        e = np.zeros(100)
        if expr:
            for i, a in expr.items():
                e[i] = a
        g = (rng.uniform(-0.18, 0.18), rng.uniform(-0.35, 0.35)) if gaze else (0.0, 0.0)
        return {"expr": e, "jaw": jaw, "gaze": g}

    def unnamed(sigma):
        return {int(i): float(rng.normal(0.0, sigma)) for i in range(n_named, n_expr)}

    named = list(range(n_named))
    if held_out:
        combos = [rng.choice(named, size=3, replace=False) for _ in range(2)]
        keys = [key(gaze=False),
                key({int(i): rng.uniform(1.0, 2.0) for i in combos[0]}, jaw=0.12),
                key({**unnamed(0.8), **{int(i): rng.uniform(1.5, 2.3) for i in combos[1][:2]}}),
                key({int(i): rng.uniform(0.6, 1.4) for i in rng.choice(named, size=2, replace=False)}, jaw=0.32),
                key(unnamed(1.0), jaw=0.05),
                key(gaze=False)]
        return keys
    keys = [key(gaze=k > 0)]  # sequence 0 opens on the neutral identity frame
    mine = named[k::n_train]
    for i in mine:
        keys.append(key({i: rng.uniform(1.3, 2.0)}))
    keys.append(key(jaw=rng.uniform(0.25, 0.38)))
    pair = rng.choice(mine if len(mine) >= 2 else named, size=2, replace=False)
    keys.append(key({**unnamed(0.6), **{int(i): rng.uniform(0.8, 1.5) for i in pair}}, jaw=rng.uniform(0.0, 0.2)))
    keys.append(key(unnamed(0.4)))
    return keys


def make_motion(rng: np.random.Generator, spec: ActorSpec, n_expr: int) -> dict[str, np.ndarray]:
    """Per-timestep pose and expression, all sequences in order.

    -> expr [T, 100], jaw_pose / neck_pose / rotation / translation [T, 3], eyes_pose [T, 6],
       sequence [T] (index into spec.sequences)
    """
    n_named, n_train, n_frames = len(EXPRESSION_NAMES), len(spec.sequences) - 1, spec.frames_per_sequence
    parts = {name: [] for name in ("expr", "jaw_pose", "eyes_pose", "neck_pose", "rotation", "translation", "sequence")}
    for k in range(len(spec.sequences)):
        keys = _sequence_keys(rng, k, n_train, n_named, n_expr, held_out=k == n_train)
        stacked = np.stack([np.concatenate([kf["expr"], [kf["jaw"], kf["gaze"][0], kf["gaze"][1]]]) for kf in keys])
        curve = _eased(stacked, n_frames)
        jaw = np.zeros((n_frames, 3))
        jaw[:, 0] = curve[:, 100]
        sideways = np.clip(curve[:, 100] / 0.3, 0.0, 1.0)  # an open jaw also drifts a little sideways
        jaw[:, 1] = _waves(rng, n_frames, np.array([0.02]))[:, 0] * sideways
        gaze = np.zeros((n_frames, 3))
        gaze[:, :2] = curve[:, 101:103]
        rotation = _waves(rng, n_frames, np.array([0.06, 0.12, 0.04]))
        neck = _waves(rng, n_frames, np.array([0.07, 0.08, 0.03]))
        translation = _waves(rng, n_frames, np.array([0.004, 0.003, 0.004]))
        if k == 0:  # the identity frame faces camera 8 squarely
            rotation, neck, translation = rotation - rotation[:1], neck - neck[:1], translation - translation[:1]
        parts["expr"].append(curve[:, :100])
        parts["jaw_pose"].append(jaw)
        parts["eyes_pose"].append(np.concatenate([gaze, gaze], axis=1))  # both eyes look at one point
        parts["neck_pose"].append(neck)
        parts["rotation"].append(rotation)
        parts["translation"].append(translation)
        parts["sequence"].append(np.full(n_frames, k))
    return {name: np.concatenate(v) for name, v in parts.items()}


# ---------------------------------------------------------------- the actor


@dataclass(frozen=True)
class ActorPlan:
    """Everything about one actor before rendering: rig, identity, motion, splits."""

    cameras: list  # [C] Camera, OpenCV, at the actor's image size
    params: dict  # clean FLAME parameters per timestep: name -> [T, ...] float32 tensors
    written: dict  # what the "tracker" reports: params + tracking noise
    sequence: np.ndarray  # [T] sequence index of each timestep
    spec: ActorSpec
    palette: Palette

    @property
    def n_timesteps(self) -> int:
        return len(self.sequence)

    def timestep_params(self, t: int, written: bool = False) -> dict[str, Tensor]:
        """Parameters of timestep t with a batch axis of 1, ready for FlameModel(**params)."""
        src = self.written if written else self.params
        return {k: v[t:t + 1] if k not in ("shape", "static_offset") else v for k, v in src.items()}

    def split_timesteps(self, split: str) -> list[int]:
        held_out = len(self.spec.sequences) - 1
        test = self.sequence == held_out
        return [int(t) for t in np.flatnonzero(test if split == "test" else ~test)]

    def split_cameras(self, split: str) -> list[int]:
        if self.spec.n_cameras == 1:  # VHAP's union: one camera trains, and the val split is empty
            return [] if split == "val" else [0]
        if split == "train":
            return [c for c in range(self.spec.n_cameras) if c != FRONTAL_CAMERA]
        return [FRONTAL_CAMERA] if split == "val" else list(range(self.spec.n_cameras))


def _filled_columns(model: FlameModel) -> tuple[int, int]:
    """How many shape and expression columns of the model are not zero."""
    norms = model.shapedirs.abs().amax(dim=(0, 1))
    filled = lambda cols: int(torch.nonzero(cols > 0).max()) + 1 if (cols > 0).any() else 0  # noqa: E731
    return filled(norms[:model.n_shape]), filled(norms[model.n_shape:])


def plan_actor(spec: ActorSpec, model: FlameModel, masks: dict[str, np.ndarray]) -> ActorPlan:
    """Rig, identity (shape, static offset, palette), motion and tracking noise of one actor."""
    spec.check()
    rng = np.random.default_rng(spec.seed)
    n_shape, n_expr = _filled_columns(model)
    palette = actor_palette(rng)
    shape = np.zeros(model.n_shape)
    shape[:n_shape] = np.clip(rng.normal(0.0, 0.6, n_shape), -1.5, 1.5)

    # A smooth static offset (<= 1 mm along the normal) on the skin, as a tracker's would be.
    template = model.v_template
    normals = vertex_normals(template[None], model.faces)[0]
    bump = 2.0 * fbm(template, 8.0, 2, spec.seed + 31) - 1.0
    skin = torch.ones(len(template))
    for name in ("left_eyeball", "right_eyeball"):
        skin[torch.as_tensor(masks[name])] = 0.0
    static_offset = (0.001 * bump * skin)[:, None] * normals

    motion = make_motion(rng, spec, n_expr)
    params = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in motion.items() if k != "sequence"}
    params["shape"] = torch.as_tensor(shape, dtype=torch.float32)[None]
    params["static_offset"] = static_offset[None].float()
    if spec.dynamic_offset > 0:
        params["dynamic_offset"] = dynamic_offsets(template, normals, skin, len(motion["sequence"]),
                                                   spec.dynamic_offset, spec.seed)
    written = dict(params)
    if spec.tracking_noise > 0:
        noise_rng = np.random.default_rng([spec.seed, 1])
        for k in ("expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "translation"):
            span = (params[k].amax(0) - params[k].amin(0)).numpy()
            noise = noise_rng.normal(size=params[k].shape) * span * spec.tracking_noise
            written[k] = params[k] + torch.as_tensor(noise, dtype=torch.float32)
    cameras = make_rig(template, masks, spec.n_cameras, spec.scale)
    return ActorPlan(cameras, params, written, motion["sequence"], spec, palette)


def dynamic_offsets(template: Tensor, normals: Tensor, skin: Tensor, n_timesteps: int, size: float,
                    seed: int) -> Tensor:
    """Per-timestep rest-space offsets along the normals, as VHAP's dynamic_offset: three smooth fields on
    the skin (values in [-1, 1]), each weighted by a slow wave over the timesteps, scaled to ``size``
    metres at most. template, normals: [V, 3], skin: [V] -> [T, V, 3]"""
    rng = np.random.default_rng([seed, 3])  # its own stream: the actor's other draws stay as they were
    fields = torch.stack([2.0 * fbm(template, 6.0, 2, seed + 41 + k) - 1.0 for k in range(3)]) * skin  # [3, V]
    fields = fields / fields.abs().amax(1, keepdim=True)  # each reaches +-1
    tau = np.linspace(0.0, 1.0, n_timesteps)[:, None]
    waves = np.sin(2 * np.pi * rng.uniform(1.0, 3.0, 3) * tau + rng.uniform(0, 2 * np.pi, 3)) / 3.0  # [T, 3]
    along = torch.as_tensor(waves, dtype=torch.float32) @ fields  # [T, V] in [-1, 1]
    return (size * along[..., None] * normals).float()


@dataclass(frozen=True)
class HeadFiles:
    """The head model's three files, named as an actor config names them."""

    flame_model: Path
    flame_uv: Path
    flame_masks: Path

    @classmethod
    def from_config(cls, cfg) -> "HeadFiles":
        a = cfg.actor
        return cls(resolve(a.flame_model), resolve(a.flame_uv), resolve(a.flame_masks))

    def load(self):
        """-> (FlameModel, uvs [T, 2], faces_uv [F, 3], masks: region -> vertex indices)"""
        for key, path in vars(self).items():
            if not path.is_file():
                raise ConfigError(f"actor.{key} = {path} does not exist; the synthetic head model is "
                                        "written to synthetic.head_dir: point actor.flame_model, flame_uv and "
                                        "flame_masks at its files")
        model = FlameModel.from_file(self.flame_model)
        obj = read_obj(self.flame_uv)
        masks = load_regions(self.flame_masks, model.v_template.shape[0])
        return model, torch.as_tensor(obj["uvs"], dtype=torch.float32), torch.as_tensor(obj["faces_uv"]).long(), masks

    def ground_truth(self) -> tuple["HeadFiles", np.ndarray | None]:
        """The head the images are rendered from, and which of its vertices the tracked model keeps:
        a FLAME-like head (synthetic.head_mouth 'open') has its full head, cavity and all, in
        ``ground_truth/`` beside it; any other head is its own. -> (files, kept vertex indices or None)"""
        folder = self.flame_model.parent / GROUND_TRUTH_DIR
        if not (folder / KEPT_FILE).is_file():
            return self, None
        full = model_paths(folder)
        return HeadFiles(full["flame_model"], full["uv_obj"], full["masks"]), np.load(folder / KEPT_FILE)


class ActorRenderer:
    """Renders the ground truth of one actor: tracked mesh + relief + hair shell (+ flyaway layer), before a torso.

    The torso is static and the lights are fixed in the world, so its colour and depth in each
    camera are computed once; every timestep rasterizes only the head and lays it over them.
    """

    def __init__(self, plan: ActorPlan, model: FlameModel, uvs: Tensor, faces_uv: Tensor,
                 masks: dict[str, np.ndarray]):
        self.plan, self.model, self.uvs = plan, model, uvs
        seed = plan.spec.seed
        with torch.no_grad():
            rest, _ = model(shape=plan.params["shape"], static_offset=plan.params["static_offset"])
        rest = rest[0]
        self.surface = ground_truth_surface(rest, model.faces, faces_uv, masks, plan.palette, seed)
        self.texture = build_texture(rest, model.faces, uvs, faces_uv, masks, plan.palette,
                                     texture_size(plan.spec.scale), seed)
        self.faces = torch.cat([model.faces, self.surface.shell_faces + rest.shape[0]])
        self.faces_uv = torch.cat([faces_uv, self.surface.shell_faces_uv])
        self.fringe: HairFringe | None = None
        if plan.spec.hair_fringe > 0:
            self.fringe = hair_fringe(rest, model.faces, masks, self.surface, plan.spec.hair_fringe, seed)
        self.torso = torso_mesh(width_scale=float(np.random.default_rng([seed, 2]).uniform(0.93, 1.07)))
        self.torso_texture = torso_texture(self.torso, plan.palette, 256, seed)
        self.torso_normals = vertex_normals(self.torso.verts[None], self.torso.faces)[0]
        self._torso_layers: dict[int, tuple[Tensor, Tensor]] = {}

    def tracked_verts(self, t: int, written: bool = False) -> Tensor:
        """The tracked FLAME mesh at timestep t. -> [V, 3]"""
        with torch.no_grad():
            verts, _ = self.model(**self.plan.timestep_params(t, written))
        return verts[0]

    def head_verts(self, t: int) -> Tensor:
        """Ground-truth head at timestep t: relief-displaced mesh, then the hair shell. -> [V + S, 3]"""
        head = self.tracked_verts(t)
        normals = vertex_normals(head[None], self.model.faces)[0]
        head = head + self.surface.detail[:, None] * normals
        s = self.surface.shell_verts
        return torch.cat([head, head[s] + self.surface.shell_height[:, None] * normals[s]])

    def render(self, t: int, cameras: list[Camera]) -> tuple[Tensor, Tensor]:
        """Images of timestep t. -> (rgb [C, H, W, 3] composited on white, coverage [C, H, W])"""
        verts = self.head_verts(t)
        normals = vertex_normals(verts[None], self.faces)[0]
        per_call = max(1, _PIXELS_PER_CALL // (cameras[0].width * cameras[0].height * SUPERSAMPLE**2))
        rgbs, covers = [], []
        for i in range(0, len(cameras), per_call):
            chunk = [_supersampled(c) for c in cameras[i:i + per_call]]
            viewmats, Ks = stack_cameras(chunk)
            frags = rasterize_camera(verts[None], self.faces, viewmats, Ks, chunk[0].height, chunk[0].width)
            torso_rgb, torso_depth = self._torso_layer(chunk)
            head = frags.depth < torso_depth
            centres = torch.stack([c.centre for c in chunk])[:, None, None].expand(*head.shape, 3)
            rgb = torso_rgb.clone()
            rgb[head] = shade(frags.pix_to_face[head], frags.bary[head], centres[head], self.faces, verts, normals,
                              self.faces_uv, self.uvs, self.texture)
            cover = (head | torch.isfinite(torso_depth)).float()
            if self.fringe is not None:
                behind = torch.minimum(frags.depth, torso_depth)
                rgb, cover = self._fringe_over(verts, normals, viewmats, Ks, chunk, centres, rgb, cover, behind)
            composite = rgb + (1.0 - cover)[..., None]  # rgb is black where uncovered: white behind
            rgbs.append(F.avg_pool2d(composite.permute(0, 3, 1, 2), SUPERSAMPLE).permute(0, 2, 3, 1))
            covers.append(F.avg_pool2d(cover[:, None], SUPERSAMPLE)[:, 0])
        return torch.cat(rgbs), torch.cat(covers)

    def fringe_layer(self, verts: Tensor, normals: Tensor) -> Tensor:
        """The flyaway layer over the head ``verts`` [V + S, 3] (``head_verts``) with their ``normals``: the
        hair shell pushed out along its own normal. -> [S, 3], faces ``surface.shell_faces``"""
        n_head = self.model.v_template.shape[0]
        return verts[n_head:] + self.fringe.height[:, None] * normals[n_head:]

    def _fringe_over(self, verts: Tensor, normals: Tensor, viewmats: Tensor, Ks: Tensor, cameras: list[Camera],
                     centres: Tensor, rgb: Tensor, cover: Tensor, behind: Tensor) -> tuple[Tensor, Tensor]:
        """The flyaway layer composited over supersampled images: its far side, then its near side (a ray
        beside the head crosses it twice), each where it lies in front of what was drawn.

        verts, normals: [V + S, 3] the head and its shell (``head_verts``); centres: [C, H, W, 3] camera
        centres; rgb [C, H, W, 3] premultiplied (black where uncovered), cover [C, H, W], behind [C, H, W]
        depth of what they show (inf where empty). -> (rgb, cover) with the layer over them"""
        shell = self.surface.shell_faces
        layer = self.fringe_layer(verts, normals)
        layer_normals = vertex_normals(layer[None], shell)[0]
        rest = torch.cat([self.fringe.rest_points, self.fringe.hair[:, None]], dim=-1)  # [S, 4]
        rgb, cover = rgb.clone(), cover.clone()
        height, width = cameras[0].height, cameras[0].width
        for faces in (shell[:, [0, 2, 1]], shell):  # back faces (culled with the winding flipped), then front
            frags = rasterize_camera(layer[None], faces, viewmats, Ks, height, width, cull_backfaces=True)
            hit = (frags.pix_to_face >= 0) & (frags.depth < behind)
            face, bary = frags.pix_to_face[hit], frags.bary[hit]
            at = (bary[..., None] * rest[shell[face]]).sum(1)  # [P, 4] rest point and hair weight
            alpha = fringe_opacity(self.fringe, at[:, :3], at[:, 3])
            seen = alpha > 0  # the gaps between strands change nothing: shade only the strands
            hit[hit.clone()] = seen
            face, bary, alpha = face[seen], bary[seen], alpha[seen, None]
            colour = shade(face, bary, centres[hit], shell, layer, layer_normals, self.surface.shell_faces_uv,
                           self.uvs, self.texture)
            rgb[hit] = alpha * colour + (1.0 - alpha) * rgb[hit]
            cover[hit] = alpha[:, 0] + (1.0 - alpha[:, 0]) * cover[hit]
        return rgb, cover

    def _torso_layer(self, cameras: list[Camera]) -> tuple[Tensor, Tensor]:
        """Lit torso colour (black where empty) and depth (inf where empty) of supersampled
        cameras. -> ([C, H, W, 3], [C, H, W])"""
        missing = [c for c in cameras if c.camera_index not in self._torso_layers]
        if missing:
            viewmats, Ks = stack_cameras(missing)
            tv, tf = self.torso.verts, self.torso.faces
            frags = rasterize_camera(tv[None], tf, viewmats, Ks, missing[0].height, missing[0].width)
            hit = frags.pix_to_face >= 0
            centres = torch.stack([c.centre for c in missing])[:, None, None].expand(*hit.shape, 3)
            rgb = torch.zeros(*hit.shape, 3)
            rgb[hit] = shade(frags.pix_to_face[hit], frags.bary[hit], centres[hit], tf, tv, self.torso_normals,
                             self.torso.faces_uv, self.torso.uvs, self.torso_texture)
            for c, colour, depth in zip(missing, rgb, frags.depth):
                self._torso_layers[c.camera_index] = (colour, depth)
        layers = [self._torso_layers[c.camera_index] for c in cameras]
        return torch.stack([rgb for rgb, _ in layers]), torch.stack([depth for _, depth in layers])


def texture_size(scale: float) -> int:
    """Texels per side of the head texture: about two per image pixel across the head, within
    256-1024 (512 at the default scale 0.25)."""
    return int(min(1024, max(256, 2 ** math.ceil(math.log2(2048 * scale)))))


def _supersampled(camera: Camera) -> Camera:
    """The camera of the image SUPERSAMPLE times larger (area-averaging it gives `camera`'s)."""
    scale = torch.tensor([[SUPERSAMPLE], [SUPERSAMPLE], [1.0]])
    return Camera(camera.viewmat, camera.K * scale, camera.width * SUPERSAMPLE, camera.height * SUPERSAMPLE,
                  camera.camera_index)


# ---------------------------------------------------------------- writing


def _to_u8(x: Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).numpy()


def _write_png(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


def _frame_entry(t: int, camera: Camera) -> dict:
    name = f"{t:05d}_{camera.camera_index:02d}.png"
    return {"timestep_index": t, "camera_index": camera.camera_index, "camera_id": f"{camera.camera_index:02d}",
            "file_path": f"images/{name}", "fg_mask_path": f"fg_masks/{name}",
            "flame_param_path": f"flame_param/{t:05d}.npz", **camera.to_vhap_fields()}


def _write_split(path: Path, frames: list[dict], top: dict) -> None:
    """A transforms json of ``frames``; the top-level intrinsics are the last frame's, or ``top``'s when the
    split is empty (VHAP writes the val split of a one-camera export so)."""
    last = frames[-1] if frames else top
    db = {"frames": frames}
    db.update({k: last[k] for k in ("cx", "cy", "fl_x", "fl_y", "h", "w", "camera_angle_x", "camera_angle_y")})
    db["timestep_indices"] = sorted({f["timestep_index"] for f in frames})
    db["camera_indices"] = sorted({f["camera_index"] for f in frames})
    path.write_text(json.dumps(db, indent=4))


def _tracked(params: dict[str, Tensor], kept: np.ndarray | None) -> dict[str, Tensor]:
    """Parameters as the tracked model reads them: the offsets of its own vertices only."""
    if kept is None:
        return params
    rows = torch.as_tensor(kept)
    return {**params, **{k: params[k][:, rows] for k in ("static_offset", "dynamic_offset") if k in params}}


def _flame_npz(params: dict[str, Tensor], teeth_rows: int = 0) -> dict[str, np.ndarray]:
    """VHAP's arrays: shape (S,), the others with a leading axis of 1, float32; offsets padded with
    ``teeth_rows`` rows, as VHAP's FLAME (with teeth vertices) writes them."""
    out = {k: params[k].numpy().astype(np.float32) for k in PARAM_KEYS + ("dynamic_offset",) if k in params}
    out["shape"] = out["shape"][0]
    for k, fill in (("static_offset", 0.01), ("dynamic_offset", -0.01)):  # teeth rows our model must not read
        if k in out and teeth_rows:
            out[k] = np.concatenate([out[k], np.full((1, teeth_rows, 3), fill, np.float32)], axis=1)
    return out


@dataclass
class _Sequence:
    """Where one sequence's files go: a folder of its own in a union export (relocated by ``shift``, with
    timesteps counted from ``first``), else the dataset folder itself."""

    folder: Path  # in the temporary build folder
    prefix: str  # of its paths in the dataset's transforms jsons: "../<folder name>/" or ""
    first: int  # its first timestep: file numbers are timestep - first
    shift: Tensor  # [3] its mean head translation, subtracted from translation and from the camera centres
    cameras: list  # [C] Camera as this sequence's export holds them
    frames: list  # its transforms.json entries (union only)


def _sequences(plan: ActorPlan, build: Path, name: str) -> list[_Sequence]:
    """The sequences' folders; a union relocates each sequence as VHAP's export_as_nerf_dataset.py does:
    the head to the origin by its mean translation, the cameras with it (c2w' = T(-mean) c2w)."""
    if not plan.spec.union:
        return [_Sequence(build, "", 0, torch.zeros(3), plan.cameras, [])] * len(plan.spec.sequences)
    out = []
    for k, seq in enumerate(plan.spec.sequences):
        steps = np.flatnonzero(plan.sequence == k)
        shift = plan.written["translation"][steps].double().mean(0).float()
        move = torch.eye(4)
        move[:3, 3] = shift  # world-to-camera of the moved camera = viewmat . T(+mean)
        cameras = [Camera(c.viewmat @ move, c.K, c.width, c.height, c.camera_index) for c in plan.cameras]
        folder = build / f"{name}_{seq}"
        out.append(_Sequence(folder, f"../{folder.name}/", int(steps[0]), shift, cameras, []))
    return out


def _contact_sheet(tiles: dict[tuple[int, int], np.ndarray], timesteps: list[int], cameras: list[int],
                   sequence_names: list[str]) -> np.ndarray:
    """Rows = timesteps, columns = cameras, each tile labelled and at most _CONTACT_TILE_HEIGHT
    pixels high. tiles: (t, c) -> RGB uint8."""
    h, w = next(iter(tiles.values())).shape[:2]
    if h > _CONTACT_TILE_HEIGHT:
        h, w = _CONTACT_TILE_HEIGHT, round(w * _CONTACT_TILE_HEIGHT / h)
    sheet = np.full((h * len(timesteps), w * len(cameras), 3), 255, np.uint8)
    for r, t in enumerate(timesteps):
        for c, cam in enumerate(cameras):
            tile = np.ascontiguousarray(cv2.resize(tiles[(t, cam)], (w, h), interpolation=cv2.INTER_AREA))
            cv2.putText(tile, f"t{t} c{cam} {sequence_names[r]}", (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                        (0, 0, 0), 1, cv2.LINE_AA)
            sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = tile
    return sheet


def _contact_timesteps(plan: ActorPlan, count: int = 6) -> list[int]:
    """The identity frame, then the most expressive frame of each sequence, then the next ones."""
    energy = plan.params["expr"].abs().sum(1) + 10.0 * plan.params["jaw_pose"][:, 0].abs()
    order = [0]
    for k in range(len(plan.spec.sequences)):
        idx = np.flatnonzero(plan.sequence == k)
        order.append(int(idx[int(energy[idx].argmax())]))
    order += [int(t) for t in torch.argsort(energy, descending=True)]
    seen = []
    for t in order:
        if t not in seen:
            seen.append(t)
    return seen[:min(count, plan.n_timesteps)]


def generate_actor(data_dir: str | Path, head: HeadFiles, spec: ActorSpec, log=print) -> Path:
    """Write the actor's dataset into `data_dir` unless it is already there. -> data_dir"""
    data_dir = Path(data_dir)
    if (data_dir / "transforms_test.json").is_file():
        log(f"synthetic actor: {data_dir} exists, nothing to do")
        return data_dir
    if data_dir.exists():
        raise DatasetError(f"{data_dir} exists but holds no transforms_test.json: it is not a finished "
                              "synthetic dataset; delete it (or point actor.data_dir elsewhere) and rerun")
    for seq in spec.sequences if spec.union else ():
        folder = data_dir.parent / f"{data_dir.name}_{seq}"
        if folder.exists():
            raise DatasetError(f"{folder} exists but {data_dir} is not a finished synthetic union export: it is "
                               "left from an interrupted run or another dataset; delete it and rerun")
    start = time.time()
    truth, kept = head.ground_truth()
    model, uvs, faces_uv, masks = truth.load()
    plan = plan_actor(spec, model, masks)
    renderer = ActorRenderer(plan, model, uvs, faces_uv, masks)

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.parent.glob(f".{data_dir.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)  # an earlier run was interrupted
    tmp = data_dir.parent / f".{data_dir.name}.partial-{os.getpid()}"
    tmp.mkdir()  # not mkdtemp: the dataset keeps this folder's permissions (mkdtemp's are owner-only)
    # a union is built as siblings inside tmp, so its "../<sequence>/" paths hold before and after the move
    root = tmp / data_dir.name if spec.union else tmp
    sequences = _sequences(plan, tmp, data_dir.name)
    try:
        for folder in {s.folder for s in sequences}:
            for sub in ("images", "fg_masks", "flame_param"):
                (folder / sub).mkdir(parents=True)
        root.mkdir(exist_ok=True)
        contact_t = _contact_timesteps(plan)
        contact_c = [c for c in _CONTACT_CAMERAS if c < spec.n_cameras]
        tiles = {}
        frames = {"train": [], "val": [], "test": []}
        members = {s: (set(plan.split_timesteps(s)), set(plan.split_cameras(s))) for s in frames}
        with ThreadPoolExecutor(2) as pool:
            pending = []
            for t in range(plan.n_timesteps):
                seq = sequences[plan.sequence[t]]
                params = _tracked(plan.timestep_params(t, written=True), kept)
                params["translation"] = params["translation"] - seq.shift
                np.savez(seq.folder / "flame_param" / f"{t - seq.first:05d}.npz", **_flame_npz(params, spec.teeth_rows))
                rgb, cover = renderer.render(t, plan.cameras)  # relocating head and cameras together moves no pixel
                rgb_u8, cover_u8 = _to_u8(rgb), _to_u8(cover)
                for cam, image, mask in zip(seq.cameras, rgb_u8, cover_u8):
                    entry = _frame_entry(t - seq.first, cam)
                    pending.append(pool.submit(_write_png, seq.folder / entry["file_path"], image[..., ::-1]))
                    pending.append(pool.submit(_write_png, seq.folder / entry["fg_mask_path"], mask))
                    if spec.union:  # the sequence's own export, and the union's entry renumbered into its files
                        seq.frames.append(entry)
                        entry = {**entry, "timestep_index": t,
                                 **{k: seq.prefix + entry[k] for k in ("file_path", "fg_mask_path", "flame_param_path")}}
                    if t in contact_t and cam.camera_index in contact_c:
                        tiles[(t, cam.camera_index)] = image
                    for split, (ts, cs) in members.items():
                        if t in ts and cam.camera_index in cs:
                            frames[split].append(entry)
            for job in pending:
                job.result()
        for split, entries in frames.items():
            _write_split(root / f"transforms_{split}.json", entries, frames["train"][-1])

        canonical = {k: v.clone() for k, v in plan.timestep_params(0).items() if k != "dynamic_offset"}
        for k in ("expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "translation"):
            canonical[k] = torch.zeros_like(canonical[k])
        canonical["jaw_pose"][0, 0] = CANONICAL_JAW
        for folder in {root} | {s.folder for s in sequences}:
            np.savez(folder / "canonical_flame_param.npz", **_flame_npz(_tracked(canonical, kept), spec.teeth_rows))
        for seq in sequences if spec.union else ():
            _write_split(seq.folder / "transforms.json", seq.frames, seq.frames[-1])

        names = list(spec.sequences)
        (root / "sequences_trainval.txt").write_text("\n".join(names[:-1]) + "\n")
        (root / "sequences_test.txt").write_text(names[-1] + "\n")
        info = {"generator": "lib.dataset.synthetic_actor", "spec": {**vars(spec), "sequences": names},
                "palette": vars(plan.palette),
                "sequences": {n: [int(i) for i in np.flatnonzero(plan.sequence == k)[[0, -1]]]
                              for k, n in enumerate(names)},
                "expression_names": list(EXPRESSION_NAMES)}
        if spec.union:
            info["sequence_folders"] = {n: s.folder.name for n, s in zip(names, sequences)}
        (root / "synthetic_actor.json").write_text(json.dumps(info, indent=2))
        sheet = _contact_sheet(tiles, contact_t, contact_c, [names[plan.sequence[t]] for t in contact_t])
        _write_png(root / "contact_sheet.png", sheet[..., ::-1])
        if spec.union:  # the sequences first: a finished union (its transforms_test.json) means all are there
            for seq in sequences:
                os.replace(seq.folder, data_dir.parent / seq.folder.name)
            os.replace(root, data_dir)
            tmp.rmdir()
        else:
            os.replace(tmp, data_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_images = sum(len(v) for v in frames.values())
    log(f"synthetic actor: {plan.n_timesteps} timesteps x {spec.n_cameras} cameras ({n_images} frames in the "
        f"splits) at {plan.cameras[0].height}x{plan.cameras[0].width} written to {data_dir} in "
        f"{time.time() - start:.1f} s")
    return data_dir


def generate(cfg) -> None:
    """The synthetic head model and this actor's dataset, each made when missing, each under a lock:
    a second generator of the same files stops with the first one's pid instead of writing beside it."""
    if not cfg.synthetic.enabled:
        print(f"synthetic actor: actor '{cfg.actor.name}' is not synthetic (synthetic.enabled is false), nothing to do")
        return
    head_dir, data_dir = resolve(cfg.synthetic.head_dir), resolve(cfg.actor.data_dir)
    # The head's lock is taken only to make the head, so actors of a finished head are generated side by side.
    if not head_model_complete(head_dir, cfg.synthetic.head_mouth):
        with locked(head_dir, "the synthetic head model folder", head_dir.parent / f".{head_dir.name}.lock"):
            ensure_head_model(head_dir, cfg.synthetic.head_seed, cfg.synthetic.head_mouth)
    with locked(data_dir, "the synthetic dataset", data_dir.parent / f".{data_dir.name}.lock", clean=False):
        generate_actor(data_dir, HeadFiles.from_config(cfg), ActorSpec.from_config(cfg))


if __name__ == "__main__":
    # A terminated run (kill, CI timeout) unwinds like Ctrl-C, so the temporary folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main("Generate the synthetic head model and actor dataset when missing.", lambda cfg, _: generate(cfg))
