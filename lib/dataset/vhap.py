"""Reader for VHAP / GaussianAvatars exports: real NeRSemble tracking and our synthetic actors.

An export is a folder with ``transforms_{train,val,test}.json``. Each json holds ``frames``; a
frame names its image (``file_path``), foreground mask (``fg_mask_path``, optional), FLAME
parameters (``flame_param_path``), ``timestep_index``, ``camera_index`` and its camera
(``transform_matrix``, ``fl_x``, ``fl_y``, ``cx``, ``cy``, ``w``, ``h``). Camera fields missing
from a frame are taken from the json's top level. Paths are relative to the folder holding the
json; a "union" export (VHAP's ``combine_nerf_datasets.py``) writes ``../<sequence>/...`` paths into
sibling sequence folders and renumbers timesteps across sequences, so one timestep index names one
FLAME file. VHAP exports every sequence on its own, moving the head to the origin by the sequence's
mean translation and the cameras with it: in a union one camera index has a pose per sequence
(``Frame.sequence``, ``VhapExport.camera_at``). The export of one camera (monocular video) has an
empty val split (``VhapExport.split``). FLAME files may carry ``static_offset`` and ``dynamic_offset``
with VHAP's 120 teeth vertices appended (``read_flame_params``).

This is the only place that converts cameras: every ``Frame.camera`` is already OpenCV and already
resized to ``ds_rate`` (see ``lib.dataset.cameras``). Images are RGB already composited on white
by the export; they load as float32 tensors [H, W, 3] in [0, 1], masks as [H, W].

    export = VhapExport("data/synthetic/actor_a", ds_rate=2)
    frame = export.split("train")[0]
    rgb = export.load_image(frame)          # [H, W, 3]
    flame = export.load_flame(frame)        # dict of [1, ...] tensors, ready for FlameModel(**flame)
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from lib.dataset.cameras import Camera
from lib.errors import ProjectError, check_finite
from lib.paths import ActorPaths, resolve

SPLITS = ("train", "val", "test")
FRAME_KEYS = ("file_path", "flame_param_path", "timestep_index", "camera_index", "transform_matrix")
CAMERA_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")  # per frame, else the json's top level

# Array shapes VHAP writes per timestep; None is a free size (parameter counts, vertex count).
FLAME_PARAM_SHAPES = {
    "shape": (None,),  # (n_shape,), returned as [1, n_shape]
    "expr": (1, None),
    "rotation": (1, 3),
    "neck_pose": (1, 3),
    "jaw_pose": (1, 3),
    "eyes_pose": (1, 6),
    "translation": (1, 3),
}
# Optional rest-space vertex offsets: static_offset (the subject's, in every file) when VHAP tracked with
# static offsets, dynamic_offset (this timestep's) when it tracked with dynamic offsets. VHAP's FLAME
# has 120 teeth vertices appended to FLAME's 5023, so its offsets have V + 120 rows: they are kept as
# stored and the model reads the first V (lib.flame.model); fewer rows than the model's V mean the
# tracking used another head model, an error.
OFFSET_KEYS = ("static_offset", "dynamic_offset")
OFFSET_SHAPE = (1, None, 3)

_REEXPORT_HINT = ("re-export the sequence with VHAP's export_as_nerf_dataset.py "
                  "(or regenerate the synthetic actor)")


class DatasetError(ProjectError, ValueError):
    """An export that cannot be read as written; the message names the file and what to do."""


@dataclass(frozen=True)
class Frame:
    """One image of the export and what belongs to it."""

    timestep_index: int
    camera_index: int
    image_path: Path
    mask_path: Path | None  # None when the export has no fg_mask_path for this frame
    flame_param_path: Path
    camera: Camera  # OpenCV, already resized to the export's ds_rate

    @property
    def sequence(self) -> Path:
        """The sequence folder this frame belongs to: the one holding its FLAME file (``<seq>/flame_param/``).

        In a union export every sequence was exported on its own and then relocated (VHAP moves each
        sequence's cameras by minus its mean head translation), so a camera index has one pose per
        sequence; in a single export every frame has the export's root.
        """
        return self.flame_param_path.parent.parent


def _shape_ok(shape: tuple, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(e is None or e == s for s, e in zip(shape, expected))


def _describe(expected: tuple) -> str:
    return "(" + ", ".join("N" if e is None else str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"


def read_flame_params(path: str | Path, n_shape: int = 0, n_expr: int = 0,
                      n_verts: int = 0) -> dict[str, Tensor | None]:
    """One VHAP ``flame_param/*.npz`` (or ``canonical_flame_param.npz``) as float32 tensors; it must hold
    at least ``n_shape`` shape and ``n_expr`` expression values (what the model uses), offsets of at least
    ``n_verts`` vertices (the model's; 0: not checked) and only finite values.

    -> shape [1, S], expr [1, E], rotation / neck_pose / jaw_pose / translation [1, 3],
       eyes_pose [1, 6], static_offset and dynamic_offset [1, V', 3] or None (not stored).
       Other stored keys are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"FLAME parameter file not found: {path}; {_REEXPORT_HINT}")
    try:
        # allow_pickle=False: a parameter file holds plain arrays, never objects to unpickle.
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"cannot read FLAME parameters {path} ({e}); the file is truncated or "
                           f"not an .npz; {_REEXPORT_HINT}") from None

    expected = dict(FLAME_PARAM_SHAPES)
    expected.update({key: OFFSET_SHAPE for key in OFFSET_KEYS if key in arrays})
    params: dict[str, Tensor | None] = dict.fromkeys(OFFSET_KEYS)
    for key, shape in expected.items():
        if key not in arrays:
            raise DatasetError(f"{path} has no '{key}' array (it holds {sorted(arrays)}); {_REEXPORT_HINT}")
        value = arrays[key]
        if not np.issubdtype(value.dtype, np.number):
            raise DatasetError(f"{path}: '{key}' holds {value.dtype} values, expected numbers; {_REEXPORT_HINT}")
        if not _shape_ok(value.shape, shape):
            raise DatasetError(f"{path}: '{key}' has shape {value.shape}, expected {_describe(shape)}; "
                               f"{_REEXPORT_HINT}")
        check_finite(value, key, str(path), DatasetError)
        params[key] = torch.as_tensor(np.asarray(value, dtype=np.float32))
    params["shape"] = params["shape"][None]
    for key, need, config_key in (("shape", n_shape, "actor.n_shape"), ("expr", n_expr, "actor.n_expr")):
        if params[key].shape[-1] < need:
            raise DatasetError(f"{path}: '{key}' holds {params[key].shape[-1]} values but {config_key} = {need}; "
                               f"set {config_key}: {params[key].shape[-1]} (what the tracking used) or re-track")
    for key in OFFSET_KEYS:
        if params[key] is not None and params[key].shape[1] < n_verts:
            raise DatasetError(f"{path}: '{key}' has {params[key].shape[1]} vertex rows but the head model "
                               f"(actor.flame_model) has {n_verts} vertices; the tracking used another head "
                               "model: point actor.flame_model at the FLAME model VHAP tracked with")
    return params


def stack_flame_params(paths: list, device=None, n_shape: int = 0, n_expr: int = 0,
                       n_verts: int = 0) -> dict[str, Tensor | None]:
    """The FLAME parameters of several files as one batch (``read_flame_params`` keys, [T, ...]).

    ``static_offset`` belongs to the subject, and VHAP writes the same one into every file: then it is
    kept once, [1, V, 3] (FLAME shares a batch-1 argument across the batch; ``take_timesteps`` keeps it
    shared), not T times (60 MB per 1,000 timesteps). Offsets that differ are stacked [T, V, 3].
    ``dynamic_offset`` is per timestep, [T, V, 3], or None when no file has one (some files with and
    some without is an error).
    """
    columns: dict[str, list[Tensor]] = {}
    dynamic: list[Tensor | None] = []
    first, every = None, None  # the first file's offset; every file's, once one differs from it
    for i, path in enumerate(paths):
        params = read_flame_params(path, n_shape, n_expr, n_verts)
        offset = params.pop("static_offset")
        dynamic.append(params.pop("dynamic_offset"))
        for key, value in params.items():
            columns.setdefault(key, []).append(value)
        if i == 0:
            first = offset
        elif every is not None:
            every.append(offset)
        elif (offset is None) != (first is None) or (offset is not None and not torch.equal(offset, first)):
            every = [first] * i + [offset]
    offsets = every or [first]
    for key, values in (("static_offset", offsets), ("dynamic_offset", dynamic)):
        if any(v is None for v in values) and not all(v is None for v in values):
            raise DatasetError(f"some FLAME parameter files of {Path(paths[0]).parent} have a '{key}' and others "
                               f"not; the files of one export come from one tracking run; {_REEXPORT_HINT}")
    stacked = {key: torch.cat(values).to(device) for key, values in columns.items()}
    stacked["static_offset"] = None if offsets[0] is None else torch.cat(offsets).to(device)
    stacked["dynamic_offset"] = None if dynamic[0] is None else torch.cat(dynamic).to(device)
    return stacked


def take_timesteps(params: dict[str, Tensor | None], rows: Tensor) -> dict[str, Tensor | None]:
    """The rows of stacked parameters (``stack_flame_params``); a shared (batch-1) static offset stays shared."""
    return {k: None if v is None else v if (k == "static_offset" and v.shape[0] == 1) else v[rows]
            for k, v in params.items()}


class VhapExport:
    """A VHAP / GaussianAvatars export folder, read lazily (see the module docstring)."""

    def __init__(self, root: str | Path, ds_rate: int = 1, n_shape: int = 0,
                 n_expr: int = 0, masks_dir: str | Path | None = None):
        self.root = Path(root)
        # Where render_masks.py writes this export's alpha and mouth masks (lib.dataset.masks.mask_paths),
        # outside the export; None: not known (reading or writing masks is then an error).
        self.masks_dir = Path(masks_dir) if masks_dir is not None else None
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder not found: {self.root}; point actor.data_dir at a VHAP "
                               "export (the folder holding transforms_train.json) or generate the "
                               "synthetic actor")
        if int(ds_rate) != ds_rate or ds_rate < 1:
            raise ValueError(f"ds_rate must be a positive integer, got {ds_rate!r}")
        self.ds_rate = int(ds_rate)
        self.n_shape, self.n_expr = n_shape, n_expr  # the fewest values a parameter file may hold
        self._splits: dict[str, list[Frame]] = {}
        self._cameras: dict[tuple, Camera] = {}

    @classmethod
    def from_config(cls, cfg) -> "VhapExport":
        """The export of ``cfg.actor.data_dir`` at ``data.ds_rate``, with its masks folder."""
        return cls(resolve(cfg.actor.data_dir), ds_rate=cfg.data.ds_rate, n_shape=cfg.actor.n_shape,
                   n_expr=cfg.actor.n_expr, masks_dir=ActorPaths(cfg).masks)

    # ---- index ----

    def split(self, name: str) -> list[Frame]:
        """The frames of ``transforms_<name>.json``, in file order.

        Only the val split may be empty: VHAP's union writes val = one camera left out of training
        (camera 8, else the last one), so the export of a single camera (monocular video) has none;
        what only scores val frames then says so and skips them (``empty_split``).
        """
        if name not in SPLITS:
            raise ValueError(f"unknown split '{name}'; one of {SPLITS}")
        if name not in self._splits:
            path = self.split_path(name)
            frames = self._read_split(path)
            if not frames and name != "val":
                raise DatasetError(f"{path} lists no frames (an empty {name} split); re-export the sequence "
                                   "with frames in every split")
            self._splits[name] = frames
        return list(self._splits[name])

    def split_path(self, name: str) -> Path:
        """The json of a split: ``<root>/transforms_<name>.json``."""
        return self.root / f"transforms_{name}.json"

    def empty_split(self, name: str, skipped: str, log=print) -> bool:
        """True (after one log line naming the file and what is ``skipped``) when a split has no frames."""
        if self.split(name):
            return False
        log(f"{name} split is empty in {self.split_path(name)}: {skipped}")
        return True

    def camera_frames(self, split: str, camera_index: int, key: str = "test.camera") -> list[Frame]:
        """The frames of ``split`` seen by one camera; none is an error naming the config ``key``."""
        frames = [f for f in self.split(split) if f.camera_index == camera_index]
        if not frames:
            cameras = sorted({f.camera_index for f in self.split(split)})
            raise DatasetError(f"{key} = {camera_index} is not a camera of the {split} split of {self.root} "
                               f"(it has {cameras}); set {key} to one of them")
        return frames

    def timesteps(self, split: str) -> list[tuple[int, Path]]:
        """Sorted unique timesteps of a split with their FLAME parameter file."""
        by_timestep: dict[int, Path] = {}
        for frame in self.split(split):
            known = by_timestep.setdefault(frame.timestep_index, frame.flame_param_path)
            if known != frame.flame_param_path:
                raise DatasetError(
                    f"{self.root / f'transforms_{split}.json'}: timestep {frame.timestep_index} names two "
                    f"FLAME files ({known} and {frame.flame_param_path}); timestep indices must be unique "
                    "across sequences (a union export renumbers them); re-create the union export")
        return sorted(by_timestep.items())

    def cameras(self, split: str) -> list[Camera]:
        """Unique cameras of a split (the first frame's, per camera index), sorted by index.

        In a union export these are the first sequence's; a render of a given timestep takes its
        camera from ``camera_at``.
        """
        by_index: dict[int, Camera] = {}
        for frame in self.split(split):
            by_index.setdefault(frame.camera_index, frame.camera)
        return [by_index[i] for i in sorted(by_index)]

    def camera_at(self, timestep: int, camera_index: int, key: str = "test.camera",
                  timestep_key: str = "actor.identity_timestep") -> Camera:
        """Camera ``camera_index`` where it stood when ``timestep`` was filmed: from the sequence of that
        timestep (``Frame.sequence``), whichever split holds the camera's frames there.

        For renders with no ground-truth frame (orbits, reenactment, sweeps): in a union export each
        sequence's cameras are relocated with its FLAME translations, so another sequence's camera of
        the same index sees the head a few pixels off. ``key`` / ``timestep_key`` name the config keys
        that chose the camera and the timestep, for the error when the export has no such frame.
        """
        frames = [f for split in SPLITS for f in self.split(split)]
        sequences = {f.sequence for f in frames if f.timestep_index == timestep}
        if not sequences:
            raise DatasetError(f"{timestep_key} = {timestep} is not a timestep of {self.root}; set it to one "
                               "of the export's timestep_index values")
        if len(sequences) > 1:
            raise DatasetError(f"timestep {timestep} of {self.root} belongs to several sequences "
                               f"({sorted(map(str, sequences))}); timestep indices must be unique across "
                               "sequences (a union export renumbers them); re-create the union export")
        sequence = sequences.pop()
        seen = sorted({f.camera_index for f in frames if f.sequence == sequence})
        for f in frames:
            if f.sequence == sequence and f.camera_index == camera_index:
                return f.camera
        raise DatasetError(f"{key} = {camera_index} is not a camera of sequence {sequence} (timestep "
                           f"{timestep}) of {self.root} (it has {seen}); set {key} to one of them")

    # ---- data ----

    def load_image(self, frame: Frame) -> Tensor:
        """RGB of one frame at the export's ds_rate. -> [H, W, 3] float32 in [0, 1]"""
        return torch.from_numpy(self.read_image(frame)).float().div_(255.0)

    def load_mask(self, frame: Frame) -> Tensor:
        """Foreground mask of one frame at the export's ds_rate. -> [H, W] float32 in [0, 1]"""
        if frame.mask_path is None:
            raise DatasetError(f"frame (timestep {frame.timestep_index}, camera {frame.camera_index}) of "
                               f"{self.root} has no fg_mask_path; export the sequence with masks")
        return torch.from_numpy(self.read_mask(frame.mask_path, frame)).float().div_(255.0)

    def read_image(self, frame: Frame, out: np.ndarray | None = None) -> np.ndarray:
        """RGB of one frame as stored, at the export's ds_rate (into ``out`` when given). -> [H, W, 3] uint8"""
        return cv2.cvtColor(self._load(frame.image_path, cv2.IMREAD_COLOR, frame), cv2.COLOR_BGR2RGB, dst=out)

    def read_mask(self, path: Path, frame: Frame) -> np.ndarray:
        """A single-channel image of one frame (a mask at ``path``), at the export's ds_rate. -> [H, W] uint8"""
        return self._load(path, cv2.IMREAD_GRAYSCALE, frame)

    def load_flame(self, frame_or_path: Frame | str | Path) -> dict[str, Tensor | None]:
        """FLAME parameters of a frame, or of a file (relative paths are relative to the root)."""
        if isinstance(frame_or_path, Frame):
            return read_flame_params(frame_or_path.flame_param_path, self.n_shape, self.n_expr)
        return read_flame_params(self._resolve(self.root, str(frame_or_path)), self.n_shape, self.n_expr)

    def load_canonical_flame(self) -> dict[str, Tensor | None]:
        """``canonical_flame_param.npz``: the actor's shape and offsets, neutral expression, jaw open."""
        return read_flame_params(self.root / "canonical_flame_param.npz", self.n_shape, self.n_expr)

    # ---- internals ----

    @staticmethod
    def _resolve(folder: Path, relative: str) -> Path:
        # normpath folds the '../<sequence>/' of union exports, so a union and a direct read of
        # the same sequence name the same files.
        return Path(os.path.normpath(folder / relative))

    def _read_split(self, json_path: Path) -> list[Frame]:
        if not json_path.is_file():
            raise DatasetError(f"{json_path} not found; {self.root} should be a VHAP export holding "
                               "transforms_train.json, transforms_val.json and transforms_test.json "
                               "(set actor.data_dir to that folder)")
        try:
            content = json.loads(json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{json_path} is not valid JSON ({e}); {_REEXPORT_HINT}") from None
        if not isinstance(content, dict) or not isinstance(content.get("frames"), list):
            raise DatasetError(f"{json_path} has no 'frames' list; {_REEXPORT_HINT}")
        entries, frames = content["frames"], []
        for i in range(len(entries)):
            # each parsed entry is dropped once read: a split of 30k frames parses into ~100 MB of objects
            entry, entries[i] = entries[i], None
            frames.append(self._read_frame(json_path, i, entry, content))
        return frames

    def _read_frame(self, json_path: Path, index: int, entry: dict, top: dict) -> Frame:
        where = f"{json_path}, frame {index}"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where} is a {type(entry).__name__}, not an object of frame fields; {_REEXPORT_HINT}")
        for key in FRAME_KEYS:
            if key not in entry:
                raise DatasetError(f"{where} has no '{key}'; {_REEXPORT_HINT}")
        for key in ("file_path", "flame_param_path") + (("fg_mask_path",) if entry.get("fg_mask_path") is not None else ()):
            if not isinstance(entry[key], str) or not entry[key]:
                raise DatasetError(f"{where}: '{key}' must be a relative path, got {entry[key]!r}; {_REEXPORT_HINT}")
        camera_fields = {}
        for key in CAMERA_KEYS:
            value = entry.get(key, top.get(key))
            if value is None:
                raise DatasetError(f"{where} has no '{key}' (neither in the frame nor at the top level); "
                                   f"{_REEXPORT_HINT}")
            camera_fields[key] = value
        try:
            c2w = np.asarray(entry["transform_matrix"], dtype=np.float64)
            numbers = {k: float(v) for k, v in camera_fields.items()}
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: transform_matrix and {', '.join(CAMERA_KEYS)} must be numbers; "
                               f"{_REEXPORT_HINT}") from None
        if c2w.shape != (4, 4):
            raise DatasetError(f"{where}: transform_matrix has shape {c2w.shape}, expected 4x4; {_REEXPORT_HINT}")
        bad = [k for k, v in numbers.items() if not np.isfinite(v)] + (["transform_matrix"] if not np.isfinite(c2w).all() else [])
        if bad:
            raise DatasetError(f"{where}: {', '.join(bad)} not finite (NaN or infinity); {_REEXPORT_HINT}")
        bad = [f"{k} = {numbers[k]:g}" for k in ("fl_x", "fl_y", "w", "h") if numbers[k] <= 0]
        if bad:
            raise DatasetError(f"{where}: {', '.join(bad)}; focal lengths and image sizes must be positive; "
                               f"{_REEXPORT_HINT}")
        if any(numbers[k] != int(numbers[k]) for k in ("w", "h")):
            raise DatasetError(f"{where}: w, h = {numbers['w']:g}, {numbers['h']:g} must be whole pixel counts; "
                               f"{_REEXPORT_HINT}")
        R = c2w[:3, :3]
        if np.abs(R.T @ R - np.eye(3)).max() > 1e-3 or np.linalg.det(R) < 0:
            raise DatasetError(f"{where}: transform_matrix is not a rotation + translation (camera-to-"
                               f"world); scaled or mirrored poses are not supported; {_REEXPORT_HINT}")

        try:
            camera_index, timestep_index = int(entry["camera_index"]), int(entry["timestep_index"])
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: camera_index and timestep_index must be integers; {_REEXPORT_HINT}") from None
        # Frames of one camera share one Camera object: an export lists tens of thousands of frames but
        # has a few cameras per sequence.
        key = (camera_index, c2w.tobytes(), *numbers.values())
        camera = self._cameras.get(key)
        if camera is None:
            try:
                camera = Camera.from_vhap_fields(c2w, camera_index=camera_index, **numbers).resized(self.ds_rate)
            except ValueError as e:  # e.g. a ds_rate that leaves no pixels
                raise DatasetError(f"{where}: {e}") from None
            self._cameras[key] = camera
        folder = json_path.parent
        mask = entry.get("fg_mask_path")
        return Frame(
            timestep_index=timestep_index,
            camera_index=camera_index,
            image_path=self._resolve(folder, entry["file_path"]),
            mask_path=None if mask is None else self._resolve(folder, mask),
            flame_param_path=self._resolve(folder, entry["flame_param_path"]),
            camera=camera,
        )

    def _load(self, path: Path, flags: int, frame: Frame) -> np.ndarray:
        """Decoded image resized to the frame's camera (uint8)."""
        if not path.is_file():
            raise DatasetError(f"image not found: {path} (timestep {frame.timestep_index}, camera "
                               f"{frame.camera_index} of {self.root}); {_REEXPORT_HINT}")
        image = cv2.imread(str(path), flags)
        if image is None:
            raise DatasetError(f"cannot decode {path}: the file is truncated or not an image; "
                               f"{_REEXPORT_HINT}")
        height, width = image.shape[:2]
        size = (width // self.ds_rate, height // self.ds_rate)
        if size != (frame.camera.width, frame.camera.height):
            raise DatasetError(
                f"{path} is {width}x{height} (WxH), which does not match the w, h of its frame in the "
                f"transforms json (expected {frame.camera.width}x{frame.camera.height} after ds_rate "
                f"{self.ds_rate}); the images and the json do not belong together")
        if self.ds_rate > 1:
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        return image
