"""How far the CPU renderer's threads scale, against how far this machine's own cores let anything scale.

The renderer shares its tiles out over Python threads running nogil numba kernels
(lib/gaussians/render_numba.run_threads). Its 2-thread speed-up can be no better than the machine's:
two "cores" of a virtual machine may be hyperthreads of one physical core, or share their caches and
memory bandwidth with other tenants. This prints, in one run, interleaved round by round so that the
machine's drifting load hits every case alike, the speed-up of N threads over 1 for

- a compute-bound kernel (a few hundred flops per byte: the ceiling for arithmetic);
- a memory-bound kernel (summing a 256 MB array: the ceiling for bandwidth);
- the renderer's forward pass at NeRSemble's 802 x 550, 12,808 Gaussians (the default actor's size,
  bench/render.py's head shell), and its compositing kernel alone (what the threads share),

both through the same thread pool, so the only difference is the work.

    .venv/bin/python bench/threads.py [--threads 2] [--rounds 7]
"""
import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lib  # noqa: E402,F401  (before torch: how its OpenMP threads wait, lib/__init__.py)

import torch  # noqa: E402
from numba import njit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from render import head_scene  # noqa: E402

from lib.gaussians import render_numba  # noqa: E402
from lib.gaussians.render import render  # noqa: E402

CHUNKS = 64  # work items handed out to the threads, as the renderer hands out chunks of tiles


@njit(nogil=True, cache=True)
def _compute(out, i, n):
    """About n transcendental evaluations into out[i]: arithmetic, no memory traffic."""
    acc = 0.0
    x = 0.5 + i * 1e-3
    for _ in range(n):
        x = math.sqrt(x * x + 0.25) * 0.999 + math.exp(-x)
        acc += x
    out[i] = acc


@njit(nogil=True, cache=True)
def _stream(out, i, data):
    """Sum of one slice of a large array into out[i]: memory bandwidth."""
    n = data.shape[0] // CHUNKS
    acc = 0.0
    for k in range(i * n, (i + 1) * n):
        acc += data[k]
    out[i] = acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="thread count compared with 1")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    out = np.zeros(CHUNKS)
    data = np.random.default_rng(0).random(32 * 2**20)  # 256 MB of float64
    scene = head_scene(12_808, 550, 802)

    def renderer():
        with torch.no_grad():
            render(*scene, 550, 802, torch.ones(3))

    recorded = []  # the compositor's arguments of one frame: its kernel is then timed alone
    forward = render_numba._forward
    render_numba._forward = lambda *a: recorded.append(a) or forward(*a)
    renderer()
    render_numba._forward = forward

    def composite_only():  # the threaded part of renderer(), on bins made once outside the clock
        forward(*recorded[0])

    cases = {
        "compute-bound kernel": lambda: render_numba.run_threads(lambda i: _compute(out, i, 200_000),
                                                                 list(range(CHUNKS))),
        "memory-bound kernel": lambda: render_numba.run_threads(lambda i: _stream(out, i, data), list(range(CHUNKS))),
        "renderer forward, 802x550": renderer,
        "its compositing kernel": composite_only,
    }
    counts = (1, args.threads)
    times = {(name, t): [] for name in cases for t in counts}
    for name, fn in cases.items():  # warm-up: compilation, caches
        fn()
    for _ in range(args.rounds):
        for name, fn in cases.items():
            for t in counts:
                torch.set_num_threads(t)
                t0 = time.perf_counter()
                fn()
                times[name, t].append(time.perf_counter() - t0)
    print(f"cores usable {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.2f}; "
          f"median of {args.rounds} interleaved rounds")
    ceiling = None
    for name in cases:
        one, many = (statistics.median(times[name, t]) for t in counts)
        speedup = one / many
        ceiling = ceiling or speedup
        print(f"  {name:<27} 1 thread {1e3 * one:7.1f} ms, {args.threads} threads {1e3 * many:7.1f} ms: "
              f"{speedup:.2f}x ({speedup / ceiling:.0%} of the compute-bound kernel's)")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
