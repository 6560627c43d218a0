"""Stage 3's frame store: the regressor's GEM-space Gaussians of every fitted timestep, on disk.

Why a file: T timesteps x N Gaussians x 11 values (positions 3, rotations 4, scales 3, opacities 1) are
2,500 x 59k x 44 bytes = 6.5 GB for a real actor. ``GaussianEigenModel.fit`` reads every value twice
(Gram matrix, then basis) but never needs more than one column block (all T timesteps of a range of
Gaussians) at a time. So the regressor's output is appended here one timestep at a time, and the fit
reads it back block by block: resident memory grows with the T x T Gram matrix, not with T x N.

Layout: one row per timestep, float32, [positions N*3 | rotations N*4 | scales N*3 | opacities N],
Gaussians in ``order`` (``lib.models.gem.gaussian_order``: each GEM part's Gaussians next to each other,
so one block is one range of every row). float32 is the regressor's own precision, so the fit sees
what an in-memory fit sees; float16 would halve the file but round a 0.1 m position to 5e-5 m, the size
of the small deformation components the fit is after. Colours are not in the file: the model keeps
frame 0's ([N, 3], held in memory). Rotations are flipped into the hemisphere of frame 0's quaternion as
they are written (the fit's sign continuity), and float64 sums of every attribute are kept while
writing, so the mean needs no pass over the file.

Reads are ``os.preadv`` into buffers of one block, not a memory map of the file: mapped pages count
as the process's resident memory, which is what the store is there to bound.

The file is a scratch file in the GEM folder, named like an atomic write's temp file
(``.frames.f32.<random>.partial``): deleted when the store closes (the end of its ``with`` block, also
on error), and removed by ``lib.lock`` the next time stage 3 runs when a killed run left it behind. A
full disk raises ``lib.errors.DiskFullError`` naming it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from lib.atomic import temp_beside
from lib.errors import naming_full_disk
from lib.models.gem import ATTRIBUTES, CHUNK_BYTES, GaussianSet, GemError, align_quats, gaussians_per_read

NAME = "frames.f32"  # the scratch file is .frames.f32.<random>.partial
VALUES = sum(ATTRIBUTES.values())  # float32 values of one Gaussian in a row
_BYTES = 4


class FrameStore:
    """T timesteps of N GEM-space Gaussians in a scratch file (see the module docstring): a
    ``FrameSource`` for ``GaussianEigenModel.fit``, and ``batches()`` for ``reconstruction_errors``.

        with FrameStore(gem_dir, gaussian_order(parts)) as store:
            for gaussians in ...:            # GaussianSet [1, N, ...] per timestep
                store.append(gaussians)
            model = GaussianEigenModel.fit(store, counts, parts=parts)

    folder: where the file goes (the GEM folder, whose lock cleans up after a killed run);
    order: [N] long read order of the Gaussians (None = 0..N-1); chunk_bytes: bound of one read.
    """

    def __init__(self, folder: str | Path, order: Tensor | None = None, chunk_bytes: int = CHUNK_BYTES):
        target = Path(folder) / NAME
        with naming_full_disk(target):
            self.path = temp_beside(target)
        self._fd: int | None = os.open(self.path, os.O_RDWR)
        self.order = None if order is None else order.detach().long().cpu()
        self.chunk_bytes = chunk_bytes
        self.n_frames = 0
        self.n_gaussians = 0  # set by the first append
        self.colors: Tensor | None = None  # [N, 3] frame 0's, in the Gaussians' own order
        self._reference: Tensor | None = None  # [N, 4] frame 0's quaternions, read order
        self._sums: dict[str, Tensor] = {}  # attribute -> [N, C] float64, read order

    def __enter__(self) -> "FrameStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Delete the file (the store cannot be read afterwards)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)

    @property
    def row_bytes(self) -> int:
        return self.n_gaussians * VALUES * _BYTES

    @property
    def nbytes(self) -> int:
        """Size of the file."""
        return self.n_frames * self.row_bytes

    # ---- writing ----

    def append(self, gaussians: GaussianSet) -> None:
        """Write B timesteps (GaussianSet [B, N, ...], GEM space, any device) after the last one."""
        B, N = gaussians.means.shape[:2]
        if B == 0:
            return
        if self.n_frames == 0:
            self._start(gaussians)
        elif N != self.n_gaussians:
            raise GemError(f"frame store {self.path}: a timestep of {N} Gaussians after timesteps of "
                           f"{self.n_gaussians}; every timestep must come from the same regressor")
        values = {}
        for attr in ATTRIBUTES:
            x = gaussians.attribute(attr).detach().float().cpu()
            if self.order is not None:
                x = x[:, self.order]
            if attr == "rotations":
                x = align_quats(x, self._reference)
            values[attr] = x
        rows = torch.cat([x.reshape(B, -1) for x in values.values()], 1).numpy()
        with naming_full_disk(self.path):
            _pwrite_all(self._fd, memoryview(rows).cast("B"), self.nbytes)
        for attr, x in values.items():
            self._sums[attr] += x.sum(0, dtype=torch.float64)
        self.n_frames += B

    def _start(self, gaussians: GaussianSet) -> None:
        N = gaussians.means.shape[1]
        if self.order is not None and not torch.equal(self.order.sort().values, torch.arange(N)):
            raise GemError(f"frame store {self.path}: the order is not a permutation of the {N} Gaussians")
        self.n_gaussians = N
        self.colors = gaussians.colors[0].detach().float().cpu().clone()
        quats = gaussians.quats[0].detach().float().cpu()
        self._reference = quats.clone() if self.order is None else quats[self.order]
        self._sums = {attr: torch.zeros(N, C, dtype=torch.float64) for attr, C in ATTRIBUTES.items()}

    # ---- reading (FrameSource) ----

    def mean(self, attr: str) -> Tensor:
        """[N, C] float64 mean over the frames, in read order."""
        return self._sums[attr] / self.n_frames

    def columns(self, attr: str, start: int, stop: int) -> Iterator[Tensor]:
        """Read positions start..stop of every frame as successive blocks [T, n * C] float32 of at most
        ``gaussians_per_read`` Gaussians (T reads of n * C values each), all read into one buffer: a
        block is valid until the next one is read."""
        C = ATTRIBUTES[attr]
        step = max(1, min(gaussians_per_read(self.n_frames, C, self.chunk_bytes), stop - start))
        offset = self._offset(attr)
        buffer = np.empty((self.n_frames, step * C), dtype=np.float32)
        for a in range(start, stop, step):
            block = buffer[:, :(min(a + step, stop) - a) * C]
            for t in range(self.n_frames):
                self._read_into(block[t], t * self.row_bytes + offset + a * C * _BYTES)
            yield torch.from_numpy(block)

    def batches(self) -> Iterator[GaussianSet]:
        """Every timestep in order, as GaussianSets [B, N, ...] of a few timesteps each (about
        chunk_bytes / 4 of them), Gaussians in their own order, colours frame 0's."""
        B = max(1, self.chunk_bytes // (4 * self.row_bytes))
        inverse = None if self.order is None else torch.argsort(self.order)
        N = self.n_gaussians
        for t0 in range(0, self.n_frames, B):
            n = min(B, self.n_frames - t0)
            rows = np.empty((n, N * VALUES), dtype=np.float32)
            self._read_into(rows, t0 * self.row_bytes)
            x, values, col = torch.from_numpy(rows), {}, 0
            for attr, C in ATTRIBUTES.items():
                v = x[:, col:col + N * C].reshape(n, N, C)
                values[attr] = v if inverse is None else v[:, inverse]
                col += N * C
            yield GaussianSet(values["positions"], values["rotations"], values["scales"],
                              values["opacities"][..., 0], self.colors.expand(n, -1, -1))

    def _offset(self, attr: str) -> int:
        """Byte offset of an attribute within a row."""
        before = 0
        for name, C in ATTRIBUTES.items():
            if name == attr:
                return before * self.n_gaussians * _BYTES
            before += C
        raise KeyError(attr)

    def _read_into(self, array: np.ndarray, offset: int) -> None:
        view = memoryview(array).cast("B")
        while view.nbytes:
            got = os.preadv(self._fd, [view], offset)
            if got == 0:
                raise GemError(f"frame store {self.path} ended early (at byte {offset}): was it deleted or "
                               "truncated while stage 3 ran?")
            view, offset = view[got:], offset + got


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """os.pwrite until every byte is written (a write may take fewer bytes than given)."""
    while data.nbytes:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done
