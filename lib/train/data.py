"""What training and evaluation read from an actor's export: driving meshes, images, masks.

Every timestep of every split is posed once at start-up (FLAME in head space + the global pose,
see ``lib.models.avatar.split_global_pose``), so a step costs no FLAME evaluation. The ground truth
of a step is the export's foreground where the keep mask holds the head (neck and torso removed),
re-composited on the step's background through the export's own foreground alpha, and the background
elsewhere (``lib.train.losses.composite_gt``).

Images reach the training loop through ``torch.utils.data``: ``TrainingImages`` is a DataLoader over
step numbers. The image and background of step s (the images and backgrounds, with
``train.views_per_step`` > 1: other cameras of its timestep) are drawn from a generator seeded by
(train.seed, s, rank), so a resumed run draws what the uninterrupted one would have, whatever the
number of workers. Under torchrun, rank r draws from its own share of the frames (every world_size-th
one from r). ``data.workers`` processes decode ahead of the loop (``0``: the loop decodes itself);
their decoded frames go into a cache of ``data.cache_gb`` per machine (``lib.dataset.image_cache``),
so memory does not grow with the number of frames. A frame travels as one uint8 buffer (RGB,
foreground alpha, keep mask and mouth mask planes) and becomes float on the training device.

A bad file found by a worker ends the run with the same ``DatasetError`` (naming the file) as when
the loop itself reads it; a worker that dies (e.g. killed for memory) ends it with ``LoaderError``.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lib.cli import end_with_parent
from lib.dataset.image_cache import ImageCache
from lib.dataset.masks import MaskRegions, frame_masks, mask_paths, missing_masks_message
from lib.dataset.vhap import SPLITS, DatasetError, Frame, VhapExport, stack_flame_params, take_timesteps
from lib.errors import ProjectError
from lib.flame.model import POSE_BATCH, FlameModel
from lib.models.avatar import rigid_pose, split_global_pose, split_global_pose_and_root
from lib.models.flame_refinement import RIGID, FlameRefinement
from lib.models.gem import gem_pose
from lib.train.losses import composite_gt

GB = 1 << 30
CHANNELS = 6  # RGB, foreground alpha, keep mask, mouth mask


class LoaderError(ProjectError, RuntimeError):
    """A data-loading worker died without reporting an error (killed by a signal, e.g. out of memory)."""


@dataclass
class Sample:
    """One image of the export, ready for a loss. Images [H, W, 3], masks [H, W], on the device."""

    frame: Frame
    image: Tensor  # as stored (composited on white with fg)
    fg: Tensor  # the export's foreground alpha in [0, 1] (ones when the export has no fg_mask_path)
    keep: Tensor  # keep mask: 1 on the head (hair included), 0 on neck and torso (lib.dataset.masks)
    mouth: Tensor  # mouth mask in [0, 1] (zeros when there is none)
    viewmat: Tensor  # [4, 4]
    K: Tensor  # [3, 3]

    @property
    def alpha(self) -> Tensor:
        """The head's alpha fg · keep [H, W]: the masked metrics' mask (> 0.5, ``lib.train.metrics``)."""
        return self.fg * self.keep

    def ground_truth(self, background: Tensor) -> Tensor:
        """The image's kept head on ``background`` [3] (``composite_gt``). -> [1, H, W, 3]"""
        return composite_gt(self.image[None], self.fg[None], self.keep[None], background[None])


@torch.no_grad()
def remasked(samples: list[Sample], background: Tensor, regions: MaskRegions, verts: Tensor,
             joints: Tensor) -> tuple[list[Sample], Tensor]:
    """Samples of one timestep with keep and mouth masks rendered from the mesh ``verts`` [V, 3] with joint
    frames ``joints`` [J, 4, 4] (``lib.dataset.masks.frame_masks``, in the samples' cameras) instead of
    those read from the masks folder, and their ground truths on ``background`` [n, 3] anew.
    -> (samples, gt [n, H, W, 3])"""
    keep, mouth = frame_masks(verts, joints, regions, [s.frame.camera for s in samples])
    samples = [replace(s, keep=k.to(s.keep), mouth=m.to(s.mouth)) for s, k, m in zip(samples, keep, mouth)]
    return samples, torch.cat([s.ground_truth(b) for s, b in zip(samples, background)])


def read_pixels(export: VhapExport, frame: Frame) -> np.ndarray:
    """The image, foreground alpha, keep mask and mouth mask of a frame, one after the other in one
    buffer (planes, so each is decoded straight into place).
    -> uint8 [H * W * 6]: RGB [H, W, 3], fg [H, W], keep [H, W], mouth [H, W]"""
    paths = mask_paths(frame.image_path, export.root, export.masks_dir)
    if not paths.keep.is_file():
        raise DatasetError(missing_masks_message(paths, frame))
    H, W = frame.camera.height, frame.camera.width
    plane = H * W
    pixels = np.empty(plane * CHANNELS, dtype=np.uint8)
    export.read_image(frame, out=pixels[:plane * 3].reshape(H, W, 3))
    if frame.mask_path is not None:
        pixels[plane * 3:plane * 4] = export.read_mask(frame.mask_path, frame).reshape(-1)
    else:  # no foreground alpha: the image is taken as opaque
        pixels[plane * 3:plane * 4] = 255
    pixels[plane * 4:plane * 5] = export.read_mask(paths.keep, frame).reshape(-1)
    if paths.mouth.is_file():
        pixels[plane * 5:] = export.read_mask(paths.mouth, frame).reshape(-1)
    else:
        pixels[plane * 5:] = 0
    return pixels


def to_sample(frame: Frame, pixels: Tensor, device: torch.device) -> Sample:
    """A frame's uint8 pixels (``read_pixels``) as a Sample on ``device``."""
    H, W = frame.camera.height, frame.camera.width
    values = pixels.to(device, non_blocking=True).float().div_(255.0)
    cam = frame.camera
    plane = H * W
    fg, keep, mouth = (values[plane * i:plane * (i + 1)].view(H, W) for i in (3, 4, 5))
    return Sample(frame, values[:plane * 3].view(H, W, 3), fg, keep, mouth, cam.viewmat.to(device), cam.K.to(device))


class Driving(NamedTuple):
    """What drives the avatar at one timestep: ``GaussianAvatar.forward``'s arguments, in order."""

    verts_head: Tensor  # [1, V, 3] the posed head-space mesh
    R: Tensor  # [1, 3, 3] the global pose, world = verts_head @ R^T + t
    t: Tensor  # [1, 3]
    tracked: tuple[Tensor, Tensor] | None  # (R, t) as the export tracked them where R, t are corrected, else None


class ActorData:
    """Driving signal of every timestep and the images of the splits.

    keep_meshes: pose every timestep once here (training draws timesteps at random, thousands of times
    each); False poses a timestep when it is asked for (one pass over the timesteps, as stage 3 and the
    evaluations make), so memory does not hold T meshes. refinement: the regressor's learnt corrections
    of the tracked parameters (``lib.models.flame_refinement``), applied to the timesteps it refined.
    """

    def __init__(self, export: VhapExport, flame: FlameModel, device: torch.device, keep_meshes: bool = True,
                 refinement: FlameRefinement | None = None):
        self.export = export
        self.device = device
        files: dict[int, Path] = {}
        for split in SPLITS:
            for t, path in export.timesteps(split):
                files.setdefault(t, path)
        self.timesteps = sorted(files)
        self._row = {t: i for i, t in enumerate(self.timesteps)}
        self.flame = flame
        self.params = stack_flame_params([files[t] for t in self.timesteps], device, export.n_shape, export.n_expr,
                                         flame.v_template.shape[0])  # [T, ...] per key
        self._posed = None  # verts_head [T, V, 3], R [T, 3, 3], t [T, 3], rest root j0 [T, 3]
        self._tracked = {k: self.params[k].clone() for k in RIGID}  # the global pose before any correction
        self._refined: set[int] = set()  # the timesteps whose parameters hold corrections (``refine``)
        if refinement is not None:
            self.refine(refinement)
        if keep_meshes:
            with torch.no_grad():
                self._posed = split_global_pose_and_root(flame, self.params)

    @torch.no_grad()
    def refine(self, refinement: FlameRefinement) -> None:
        """Add learnt corrections to the tracked parameters of the timesteps they cover, from now on."""
        self.params = refinement.to(self.device).corrected(self.params, self.timesteps)
        self._refined |= set(refinement.timesteps.tolist()) & set(self.timesteps)
        if self._posed is not None:
            self._posed = split_global_pose_and_root(self.flame, self.params)

    def driving(self, timestep: int, refinement: FlameRefinement | None = None) -> Driving:
        """The avatar's driving of one timestep (``Driving``); with a refinement being learnt, posed with its
        corrections (differentiable in them). A refinement of the global pose alone
        (``FlameRefinement.rigid``) turns the kept mesh: no FLAME evaluation. Where the global pose is
        corrected (here or by the refinement the data was made with), ``tracked`` holds the export's own."""
        i = self._row[timestep]
        corrected = timestep in self._refined
        if refinement is not None and refinement.rows([timestep])[1]:
            corrected = True
            if refinement.rigid and self._posed is not None:
                pose = refinement.corrected({k: self.params[k][i:i + 1] for k in RIGID}, [timestep])
                j0 = self._posed[3][i:i + 1]
                R, t = rigid_pose(pose["rotation"], pose["translation"], j0)
                verts = self._posed[0][i:i + 1]
            else:
                params = take_timesteps(self.params, torch.tensor([i], device=self.device))
                verts, R, t, j0 = split_global_pose_and_root(self.flame, refinement.corrected(params, [timestep]))
        elif self._posed is not None:
            verts, R, t, j0 = (x[i:i + 1] for x in self._posed)
        else:
            with torch.no_grad():
                verts, R, t, j0 = split_global_pose_and_root(
                    self.flame, take_timesteps(self.params, torch.tensor([i], device=self.device)))
        return Driving(verts, R, t, self._tracked_pose(i, j0) if corrected else None)

    @torch.no_grad()
    def _tracked_pose(self, row: int, j0: Tensor) -> tuple[Tensor, Tensor]:
        """The export's global pose (R [1, 3, 3], t [1, 3]) of a row of ``params`` about the rest root j0 [1, 3]."""
        return rigid_pose(self._tracked["rotation"][row:row + 1], self._tracked["translation"][row:row + 1],
                          j0.detach())

    @torch.no_grad()
    def world_mesh(self, timestep: int, refinement: FlameRefinement | None = None) -> tuple[Tensor, Tensor]:
        """One timestep's posed mesh and joint frames in world space, with the corrections of
        ``refinement`` where it refines the timestep (no gradient). -> verts [V, 3], joints [J, 4, 4]"""
        params = take_timesteps(self.params, self._rows([timestep]))
        if refinement is not None:
            params = refinement.corrected(params, [timestep])
        verts, joints = self.flame(**params)
        return verts[0], joints[0]

    @torch.no_grad()
    def rotation_pivot(self) -> Tensor:
        """The head-space offset [3] from FLAME's root joint to the head's centre (the mean vertex of the
        first timestep's head-space mesh): where a ``FlameRefinement``'s rotation corrections turn the head."""
        if self._posed is not None:
            verts, j0 = self._posed[0][:1], self._posed[3][:1]
        else:
            first = take_timesteps(self.params, torch.tensor([0], device=self.device))
            verts, _, _, j0 = split_global_pose_and_root(self.flame, first)
        return verts[0].mean(0) - j0[0]

    def _rows(self, timesteps: list[int]) -> Tensor:
        """The rows of ``params`` that hold timesteps. -> [T] long"""
        return torch.tensor([self._row[t] for t in timesteps], device=self.device)

    def flame_params(self, timesteps: list[int], keys: tuple[str, ...]) -> dict[str, Tensor]:
        """Per-timestep FLAME parameters (``keys``) of timesteps as tracked, with the corrections ``refine`` added.
        -> key -> [T, ...]"""
        rows = self._rows(timesteps)
        return {k: self.params[k][rows] for k in keys}

    @torch.no_grad()
    def meshes(self, timesteps: list[int]) -> Tensor:
        """Head-space meshes of timesteps. -> verts_head [T, V, 3]"""
        rows = self._rows(timesteps)
        if self._posed is not None:
            return self._posed[0][rows]
        return split_global_pose(self.flame, take_timesteps(self.params, rows))[0]

    @torch.no_grad()
    def gem_pose(self, timesteps: list[int]) -> tuple[Tensor, Tensor]:
        """The GEM pose (``lib.models.gem.gem_pose``) of timesteps. -> R [T, 3, 3], t [T, 3]"""
        rows = self._rows(timesteps)
        # in chunks: posing computes the meshes too, which would be [T, V, 3] at once
        poses = [gem_pose(self.flame, take_timesteps(self.params, rows[i:i + POSE_BATCH]))
                 for i in range(0, len(rows), POSE_BATCH)]
        return torch.cat([R for R, _ in poses]), torch.cat([t for _, t in poses])

    def sample(self, frame: Frame) -> Sample:
        """One frame read now, in this process (evaluation reads each frame once)."""
        return to_sample(frame, torch.from_numpy(read_pixels(self.export, frame)), self.device)


# ---------------------------------------------------------------- training images

class TrainingDraws(Dataset):
    """Map-style dataset indexed by training step: the step's frames (from ``frames``) and backgrounds,
    drawn from a generator seeded by (seed, step, rank), with the frames' pixels.

    A step draws a frame uniformly, then up to ``views`` - 1 other cameras of the same timestep (and
    image size) without replacement, all of which the step renders from one evaluation of the networks
    (``train.views_per_step``); fewer when the timestep has fewer cameras. One view draws exactly what
    it drew before views existed. Each view gets its own background.

    An item is a dict: step, indices (into frames), pixels (one uint8 [H * W * 6] per view,
    ``read_pixels``), background float32 [views, 3];
    or {step, error} when a file is bad, so the error reaches the training process as itself.
    """

    def __init__(self, export: VhapExport, frames: list[Frame], seed: int, rank: int,
                 random_background: bool, background: tuple[float, float, float], cache: ImageCache | None,
                 views: int = 1):
        self.export, self.frames, self.seed, self.rank, self.views = export, frames, seed, rank, views
        self.random_background, self.background = random_background, np.asarray(background, dtype=np.float32)
        self.cache = cache
        self.together: list[list[int]] = []  # with views > 1, each frame's group: one timestep, one image size
        if views > 1:
            keys = [(f.timestep_index, f.camera.width, f.camera.height) for f in frames]
            groups: dict[tuple[int, int, int], list[int]] = {}
            for i, key in enumerate(keys):
                groups.setdefault(key, []).append(i)
            self.together = [groups[key] for key in keys]  # shared lists, one per group

    def __len__(self) -> int:
        return 2 ** 62  # any step; ``StepSampler`` says which

    def draw(self, step: int) -> tuple[list[int], np.ndarray]:
        """(frame indices, backgrounds [views, 3]) of a step."""
        rng = np.random.default_rng([self.seed, step, self.rank])
        indices = [int(rng.integers(len(self.frames)))]
        others = [j for j in self.together[indices[0]] if j != indices[0]] if self.together else []
        if others:
            picked = rng.choice(len(others), min(self.views - 1, len(others)), replace=False)
            indices += [others[k] for k in picked]
        n = len(indices)
        bg = rng.random((n, 3)).astype(np.float32) if self.random_background else np.tile(self.background, (n, 1))
        return indices, bg

    def __getitem__(self, step: int) -> dict:
        indices, bg = self.draw(step)
        try:
            pixels = [self._pixels(i) for i in indices]
        except ProjectError as e:
            return {"step": step, "error": e}
        return {"step": step, "indices": indices, "pixels": [torch.from_numpy(p) for p in pixels],
                "background": torch.from_numpy(bg)}

    def _pixels(self, index: int) -> np.ndarray:
        pixels = self.cache.get(index) if self.cache else None
        if pixels is None:
            pixels = read_pixels(self.export, self.frames[index])
            if self.cache is not None:
                self.cache.put(index, pixels)
        return pixels


class StepSampler(torch.utils.data.Sampler):
    """Steps start, start + 1, ..., stop - 1 in order."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)


def _init_worker(trainer: int, worker_id: int) -> None:
    # A worker is a fork of the training process and holds its run folder's lock file open: it must not
    # outlive a killed trainer (torch's own check takes seconds), or the lock stays held.
    end_with_parent(trainer, signal.SIGKILL)
    # One decoding thread per worker: the workers are the parallelism, and they share the cores with the
    # training process's own threads.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


class TrainingImages:
    """The training images of steps start .. stop - 1, loaded ahead of the loop (module docstring).

        images = TrainingImages(export, frames, cfg, rank, world_size, start=step, stop=total, device=device)
        sample, bg, gt = images.at(step)

    or, with ``views`` > 1 (several cameras of one timestep per step, ``TrainingDraws``):
        samples, bg, gt = images.views(step)
    """

    def __init__(self, export: VhapExport, frames: list[Frame], cfg, rank: int, world_size: int, start: int,
                 stop: int, device: torch.device, local_world_size: int | None = None, views: int = 1):
        if len(frames) < world_size:
            raise DatasetError(f"{export.root}: {world_size} processes but only {len(frames)} training images; "
                               "run fewer processes")
        frames = frames[rank::world_size]
        self.frames, self.device = frames, device
        local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        budget = int(cfg.data.cache_gb * GB / max(local, 1))
        cache = ImageCache([f.camera.width * f.camera.height * CHANNELS for f in frames], budget) if budget else None
        self.draws = TrainingDraws(export, frames, cfg.train.seed, rank, cfg.train.random_background,
                                   tuple(cfg.data.background), cache, views)
        workers = cfg.data.workers
        # items in step order (``TrainingDraws``); ``at`` turns them into samples on the device
        self.loader = DataLoader(self.draws, batch_size=None, sampler=StepSampler(start, stop), num_workers=workers,
                                 pin_memory=device.type == "cuda", prefetch_factor=cfg.data.prefetch if workers else None,
                                 worker_init_fn=partial(_init_worker, os.getpid()) if workers else None)
        self._items = None

    def at(self, step: int) -> tuple[Sample, Tensor, Tensor]:
        """The training image of ``step`` (one view per step) -> (sample, bg [3], gt [1, H, W, 3] on bg)"""
        samples, bg, gt = self.views(step)
        if len(samples) != 1:
            raise ValueError(f"step {step} drew {len(samples)} views; ask for them with views()")
        return samples[0], bg[0], gt

    def views(self, step: int) -> tuple[list[Sample], Tensor, Tensor]:
        """The training images of ``step``: one timestep seen by up to ``views`` cameras of one image size
        (steps are asked for in increasing order; skipped ones are dropped)
        -> (samples, bg [n, 3], gt [n, H, W, 3], each view on its own bg)"""
        while True:
            item = self._next()
            if "error" in item:
                raise item["error"]
            if item["step"] >= step:
                break
        if item["step"] != step:
            raise ValueError(f"step {step} was asked for after step {item['step']}")
        samples = [to_sample(self.frames[i], p, self.device) for i, p in zip(item["indices"], item["pixels"])]
        bg = item["background"].to(self.device)
        return samples, bg, torch.cat([s.ground_truth(b) for s, b in zip(samples, bg)])

    def _next(self) -> dict:
        if self._items is None:
            self._items = iter(self.loader)  # the workers start here
        try:
            return next(self._items)
        except StopIteration:
            raise ValueError("asked for a step past the loader's last one") from None
        except RuntimeError as e:
            if "DataLoader worker" not in str(e):
                raise
            raise LoaderError(f"a data-loading worker died ({e}); the usual cause is memory: lower data.workers or "
                              "data.cache_gb, or set data.workers: 0 to load in the training process") from None

