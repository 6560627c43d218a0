"""The images and videos of the evaluations, written as they are rendered.

Evaluations render hundreds to thousands of frames (NeRSemble: 1,000 test frames at 802x550, strips
of three images); holding them until the end costs gigabytes. ``VideoWriter`` encodes each frame when
it is appended, so only the frame in hand is in memory:

    with VideoWriter(out / "test.mp4", fps) as video:
        for frame in frames:
            video.append(render(frame))        # [H, W, 3] uint8

The MP4 (H.264, yuv420p, by imageio-ffmpeg's bundled ffmpeg) grows under a partial name in its folder
(``lib.atomic``: ``.test.mp4.<random>.partial.mp4``) and is renamed into place when the block ends
without error; when it raises, the partial file is removed and an earlier video of that name is kept.
A video without frames is an error (``ValueError``): every caller has at least one frame to show, so
none means a bug before the writer. PNGs are written atomically too.
"""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import imageio.v2 as imageio
import numpy as np
import torch
from torch import Tensor

from lib.atomic import atomic_path, write_bytes


def to_uint8(image: Tensor) -> np.ndarray:
    """Image(s) [..., H, W, 3] in [0, 1] (clamped) -> uint8 array."""
    return (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def write_png(path: Path, rgb: np.ndarray) -> None:
    """An RGB uint8 image [H, W, 3] as a PNG, atomically (its folder made); a failed encoding is an error."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path} as PNG (image of shape {rgb.shape}, {rgb.dtype})")
    write_bytes(path, png.tobytes())


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad to even height and width (yuv420p video needs them) with white."""
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), constant_values=255)


class VideoWriter:
    """An H.264 MP4 at ``path``, written one frame at a time (module docstring). Use as a context
    manager; ``append`` frames of one size, [H, W, 3] uint8 RGB (odd sizes are padded with white)."""

    def __init__(self, path: str | Path, fps: int):
        self.path = Path(path)
        self.fps = fps
        self.frames = 0
        self._atomic = None
        self._writer = None

    def __enter__(self) -> VideoWriter:
        self._atomic = atomic_path(self.path, suffix=".mp4")  # ffmpeg picks the container by the extension
        partial = self._atomic.__enter__()
        try:
            self._writer = imageio.get_writer(str(partial), fps=self.fps, codec="libx264", macro_block_size=2,
                                              quality=8)
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        return self

    def append(self, frame: np.ndarray) -> None:
        """Encode one frame [H, W, 3] uint8 now."""
        self._writer.append_data(_even(frame))
        self.frames += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self._writer.close()  # flushes ffmpeg: the file is complete only after this
            if exc_type is None and self.frames == 0:
                raise ValueError(f"no frame was appended to the video {self.path}; a video needs at least one")
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())  # removes the partial file and re-raises
            raise
        self._atomic.__exit__(exc_type, exc, tb)  # renames into place, or removes the partial and re-raises
        return False
