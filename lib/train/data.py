"""What training and evaluation read from an actor's export: driving meshes, images, masks.

Every timestep of every split is posed once at start-up (FLAME in head space + the global pose,
see ``lib.models.avatar.split_global_pose``), so a step costs no FLAME evaluation. Images come
from the export's uint8 cache; the ground truth of a step is the image inside the head's alpha mask
(neck and torso removed) composited on the step's background.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lib.dataset.masks import mask_paths
from lib.dataset.vhap import SPLITS, DatasetError, Frame, VhapExport, stack_flame_params
from lib.flame.model import FlameModel
from lib.models.avatar import split_global_pose
from lib.models.gem import gem_pose
from lib.train.losses import composite_gt


@dataclass
class Sample:
    """One image of the export, ready for a loss. Images [H, W, 3], masks [H, W], on the device."""

    frame: Frame
    image: Tensor  # as stored (composited on white)
    alpha: Tensor  # head mask (neck and torso removed) in [0, 1]
    mouth: Tensor  # mouth mask in [0, 1] (zeros when the export has none)
    viewmat: Tensor  # [4, 4]
    K: Tensor  # [3, 3]


class ActorData:
    """Driving signal of every timestep and the images of the splits."""

    def __init__(self, export: VhapExport, flame: FlameModel, device: torch.device):
        self.export = export
        self.device = device
        files: dict[int, Path] = {}
        for split in SPLITS:
            for t, path in export.timesteps(split):
                files.setdefault(t, path)
        self.timesteps = sorted(files)
        self._row = {t: i for i, t in enumerate(self.timesteps)}
        self.flame = flame
        self.params = stack_flame_params([files[t] for t in self.timesteps], device, export.n_shape, export.n_expr)  # [T, ...] per key
        batch = self.params
        with torch.no_grad():
            self.verts_head, self.R, self.t = split_global_pose(flame, batch)  # [T, V, 3], [T, 3, 3], [T, 3]

    def driving(self, timestep: int) -> tuple[Tensor, Tensor, Tensor]:
        """(verts_head [1, V, 3], R [1, 3, 3], t [1, 3]) of one timestep."""
        i = self._row[timestep]
        return self.verts_head[i:i + 1], self.R[i:i + 1], self.t[i:i + 1]

    @torch.no_grad()
    def gem_pose(self, timesteps: list[int]) -> tuple[Tensor, Tensor]:
        """The GEM pose (``lib.models.gem.gem_pose``) of timesteps. -> R [T, 3, 3], t [T, 3]"""
        rows = torch.tensor([self._row[t] for t in timesteps], device=self.device)
        return gem_pose(self.flame, {k: None if v is None else v[rows] for k, v in self.params.items()})

    def sample(self, frame: Frame) -> Sample:
        ex, dev = self.export, self.device
        image = ex.load_image(frame)
        paths = mask_paths(frame.image_path, ex.root, ex.masks_dir)
        alpha = self._mask(paths.alpha, frame, required=True)
        mouth = self._mask(paths.mouth, frame, required=False)
        if mouth is None:
            mouth = torch.zeros_like(alpha)
        cam = frame.camera
        return Sample(frame, image.to(dev), alpha.to(dev), mouth.to(dev), cam.viewmat.to(dev), cam.K.to(dev))

    def _mask(self, path, frame: Frame, required: bool) -> Tensor | None:
        if not path.is_file():
            if required:
                raise DatasetError(f"head mask {path} not found (timestep {frame.timestep_index}, camera "
                                   f"{frame.camera_index}); run `python render_masks.py CONFIG` first")
            return None
        return self.export.load_mask(replace(frame, mask_path=path))


def draw_training_image(data: ActorData, frames: list[Frame], seed: int, step: int, rank: int,
                        random_background: bool, background: Tensor) -> tuple[Sample, Tensor, Tensor]:
    """The training image of one step, its background and its ground truth on that background.

    The draw is seeded by (seed, step, rank), so a resumed run draws what the uninterrupted one would
    have, and DDP ranks draw different images. background [3]: used unless random_background.
    -> (sample, bg [3], gt [1, H, W, 3])
    """
    rng = np.random.default_rng([seed, step, rank])
    sample = data.sample(frames[int(rng.integers(len(frames)))])
    bg = torch.as_tensor(rng.random(3), dtype=torch.float32, device=data.device) if random_background else background
    return sample, bg, composite_gt(sample.image[None], sample.alpha[None], bg[None])
