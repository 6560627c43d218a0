"""Peak resident memory of stage 3's GEM build from the frame store, against the frames' size in memory.

    .venv/bin/python bench/gem_memory.py [--frames T] [--gaussians N] [--in-memory]

Writes T random GEM-space frames of N Gaussians, one timestep at a time, to a frame store in a
temporary folder (as ``pca_gauss.py`` does with the regressor's output), fits a GEM with the default
component counts from it and measures the training reconstruction error from it, printing the
process's peak resident memory (ru_maxrss, a high-water mark) after each step. ``--in-memory`` builds
the whole GaussianSet [T, N, ...] instead and fits that (what stage 3 did before the store), for
comparison; run it as its own process, since the peak never goes down.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lib  # noqa: E402,F401  (before torch: how its OpenMP threads wait, lib/__init__.py)

import torch

from lib.config import SCHEMA  # noqa: E402
from lib.models.frame_store import FrameStore  # noqa: E402
from lib.models.gem import ATTRIBUTES, GaussianEigenModel, GaussianSet, reconstruction_errors  # noqa: E402

MB = 1024.0 * 1024.0


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def frame(t: int, n: int) -> GaussianSet:
    """Timestep t: random values around fixed bases, as a regressor's GEM-space output. -> [1, N, ...]"""
    g = torch.Generator().manual_seed(t)
    base = torch.Generator().manual_seed(-1)
    return GaussianSet(
        means=0.1 * torch.randn(1, n, 3, generator=base) + 0.002 * torch.randn(1, n, 3, generator=g),
        quats=torch.tensor([1.0, 0, 0, 0]) + 0.05 * torch.randn(1, n, 4, generator=g),
        scales=0.01 + 0.001 * torch.rand(1, n, 3, generator=g),
        opacities=0.9 - 0.1 * torch.rand(1, n, generator=g),
        colors=torch.rand(1, n, 3, generator=base),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--gaussians", type=int, default=60000)
    parser.add_argument("--in-memory", action="store_true", help="fit the whole GaussianSet instead")
    args = parser.parse_args()
    T, N = args.frames, args.gaussians
    counts = {a: SCHEMA["gem"][a].default for a in ATTRIBUTES}
    print(f"T = {T} frames of N = {N} Gaussians: {T * N * 14 * 4 / MB:.0f} MB as a float32 GaussianSet "
          f"(colours per frame), Gram matrix {T * T * 8 / MB:.1f} MB; components {counts}")
    print(f"peak RSS at start: {peak_mb():.0f} MB")
    start = time.perf_counter()
    if args.in_memory:
        frames = GaussianSet(*map(torch.cat, zip(*(frame(t, N) for t in range(T)))))
        print(f"peak RSS with the frames in memory: {peak_mb():.0f} MB")
        model = GaussianEigenModel.fit(frames, counts)
        print(f"peak RSS after the fit: {peak_mb():.0f} MB ({time.perf_counter() - start:.1f} s)")
        errors = reconstruction_errors(model, frames)
    else:
        with tempfile.TemporaryDirectory() as folder, FrameStore(folder) as store:
            for t in range(T):
                store.append(frame(t, N))
            print(f"peak RSS after writing the store ({store.nbytes / MB:.0f} MB on disk): {peak_mb():.0f} MB")
            model = GaussianEigenModel.fit(store, counts)
            print(f"peak RSS after the fit: {peak_mb():.0f} MB ({time.perf_counter() - start:.1f} s)")
            errors = reconstruction_errors(model, store.batches())
    print(f"peak RSS after the reconstruction errors: {peak_mb():.0f} MB ({time.perf_counter() - start:.1f} s); "
          f"the model's bases {model.nbytes() / MB:.0f} MB; relative errors "
          + ", ".join(f"{a} {e['relative']:.3f}" for a, e in errors.items()))


if __name__ == "__main__":
    main()
