"""Decoded frames kept in memory up to a byte budget, shared by the data-loading workers.

A training run draws frames at random for hours, so decoding each one once pays; but a NeRSemble
export holds tens of thousands of frames at 802x550 (2.6 MB each decoded), more than a machine's
memory. The cache therefore has a fixed budget: one anonymous shared memory mapping, made before the
loader's worker processes fork. The first frames decoded take its room, first come first served,
until the budget is spent; frames decoded later are decoded again at every use. A process that
decodes a frame claims its slot (under a lock shared by the processes), copies it in and then raises
the slot's flag; every process (the trainer and its workers) sees it from then on. Resident memory is
at most the budget, whatever the number of frames.

Why an anonymous mapping and not torch's ``share_memory_``: the latter lives in /dev/shm, which
containers often cap at 64 MB. With the ``spawn`` start method (macOS) a worker receives a pickled
copy of the dataset; the cache then pickles as empty and the worker decodes every frame.
"""
from __future__ import annotations

import mmap
import multiprocessing

import numpy as np

_FREE = -1


class ImageCache:
    """Room for ``budget`` bytes of frames; frame i is ``nbytes[i]`` bytes of uint8."""

    def __init__(self, nbytes: list[int], budget: int):
        self._sizes = np.asarray(nbytes, dtype=np.int64)
        self.budget = int(min(budget, self._sizes.sum()))  # a small export needs no more
        self._map = None
        if self.budget > 0:
            F = len(self._sizes)
            # layout: frames' bytes | slot offset per frame (int64) | next free byte (int64) | flag per frame
            # Pages are allocated on first write: an unfilled cache costs no memory.
            self._map = mmap.mmap(-1, self.budget + 8 * (F + 1) + F, flags=mmap.MAP_SHARED)
            self._bytes = np.frombuffer(self._map, dtype=np.uint8, count=self.budget)
            self._offsets = np.frombuffer(self._map, dtype=np.int64, count=F + 1, offset=self.budget)
            self._offsets[:F] = _FREE
            self._filled = np.frombuffer(self._map, dtype=np.uint8, count=F, offset=self.budget + 8 * (F + 1))
            self._lock = multiprocessing.get_context("fork").Lock()

    @property
    def used(self) -> int:
        """Bytes of the budget given to frames so far."""
        return 0 if self._map is None else int(self._offsets[-1])

    def get(self, i: int) -> np.ndarray | None:
        """A copy of frame i's cached bytes (uint8 [nbytes[i]]), or None when it is not cached."""
        if self._map is None or not self._filled[i]:
            return None
        start = self._offsets[i]
        return self._bytes[start:start + self._sizes[i]].copy()

    def put(self, i: int, array: np.ndarray) -> None:
        """Keep frame i's bytes if the budget has room for them (and no other process took them)."""
        if self._map is None:
            return
        size = self._sizes[i]
        if array.nbytes != size:
            raise ValueError(f"frame {i} has {array.nbytes} bytes, expected {size}")
        with self._lock:
            if self._offsets[i] != _FREE or self._offsets[-1] + size > self.budget:
                return  # another process is filling it, or no room
            start = self._offsets[i] = self._offsets[-1]
            self._offsets[-1] += size
        self._bytes[start:start + size] = array.reshape(-1)
        self._filled[i] = 1  # raised after the data is written, so readers take whole frames

    def __getstate__(self) -> dict:
        # a pickled cache (a spawned worker) cannot share the mapping: it arrives empty
        return {"_sizes": self._sizes, "budget": 0, "_map": None}
