"""Decoded frames kept in memory up to a byte budget, shared by the data-loading workers.

A training run draws frames at random for hours, so decoding each one once pays; but a NeRSemble
export holds tens of thousands of frames at 802x550 (2.2 MB each decoded), more than a machine's
memory. The cache therefore has a fixed budget: one anonymous shared memory mapping, made before the
loader's worker processes fork, with a slot for each of the first frames that fit. Draws are uniform,
so which frames get a slot does not matter. A process that decodes a frame with a slot copies it in
and then raises the slot's flag; every process (the trainer and its workers) sees it from then on.
Frames without a slot are decoded at every use. Resident memory is at most the budget, whatever the
number of frames.

Why an anonymous mapping and not torch's ``share_memory_``: the latter lives in /dev/shm, which
containers often cap at 64 MB. With the ``spawn`` start method (macOS) a worker receives a pickled
copy of the dataset; the cache then pickles as empty and the worker decodes every frame.
"""
from __future__ import annotations

import mmap

import numpy as np


class ImageCache:
    """Slots for frames of ``nbytes[i]`` bytes each, in list order, within ``budget`` bytes."""

    def __init__(self, nbytes: list[int], budget: int):
        sizes = np.asarray(nbytes, dtype=np.int64)
        ends = np.cumsum(sizes)
        self.slots = int(np.searchsorted(ends, budget, side="right"))  # frames 0 .. slots-1 have one
        self.nbytes = int(ends[self.slots - 1]) if self.slots else 0
        self._offsets = np.concatenate([[0], ends[:max(self.slots - 1, 0)]]).astype(np.int64)
        self._sizes = sizes
        self._map = None
        if self.slots:
            # pages are allocated on first write: an unfilled cache costs no memory
            self._map = mmap.mmap(-1, self.nbytes + self.slots, flags=mmap.MAP_SHARED)
            self._bytes = np.frombuffer(self._map, dtype=np.uint8)

    def get(self, i: int) -> np.ndarray | None:
        """A copy of frame i's cached bytes (uint8 [nbytes[i]]), or None when it is not cached."""
        if self._map is None or i >= self.slots or not self._bytes[self.nbytes + i]:
            return None
        start = self._offsets[i]
        return self._bytes[start:start + self._sizes[i]].copy()

    def put(self, i: int, array: np.ndarray) -> None:
        """Keep frame i's array (uint8, ``nbytes[i]`` bytes) if it has a slot."""
        if self._map is None or i >= self.slots:
            return
        if array.nbytes != self._sizes[i]:
            raise ValueError(f"frame {i} has {array.nbytes} bytes, its slot {self._sizes[i]}")
        start = self._offsets[i]
        self._bytes[start:start + self._sizes[i]] = array.reshape(-1)
        self._bytes[self.nbytes + i] = 1  # raised after the data is written, so readers take whole frames

    def __getstate__(self) -> dict:
        # a pickled cache (a spawned worker) cannot share the mapping: it arrives empty
        return {"slots": 0, "nbytes": 0, "_offsets": self._offsets[:0], "_sizes": self._sizes, "_map": None}
