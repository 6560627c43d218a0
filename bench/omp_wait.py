"""How torch's idle OpenMP threads should wait on a small shared CPU: a regressor step on two threads under
each wait setting, alone and with a second process doing the same beside it.

    .venv/bin/python bench/omp_wait.py [CONFIG] [--rounds 1] [--steps 20]

Every case runs ``bench/train_step.py CONFIG`` in fresh processes (libgomp reads its settings once, when
torch loads it) and prints the median wall time of a full step per process. The settings:

  lib          what importing ``lib`` sets when the user set nothing: GOMP_SPINCOUNT=lib.OPENMP_SPINS
  PASSIVE      OMP_WAIT_POLICY=PASSIVE: no spin, a waiting thread sleeps at once
  ACTIVE       OMP_WAIT_POLICY=ACTIVE: a waiting thread spins until there is work
  libgomp      GOMP_SPINCOUNT=300000, libgomp's own default when nothing is set

Alone: one thread (the reference), then two threads under each setting. Side by side: two processes
started together, two threads each under each setting, then one thread each: what two jobs on a
2-core machine (two trainings, a training and the test suite) get.
"""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lib import OPENMP_SPINS  # noqa: E402

SETTINGS = {"lib": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
            "libgomp": {"GOMP_SPINCOUNT": "300000"}}


def start(config: str, threads: int, steps: int, setting: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(SETTINGS[setting])
    return subprocess.Popen([sys.executable, str(REPO / "bench" / "train_step.py"), config, "--threads",
                             str(threads), "--steps", str(steps)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO)


def step_ms(process: subprocess.Popen) -> float:
    out, _ = process.communicate()
    found = re.search(r"full step: ([0-9.]+) ms", out)
    if process.returncode != 0 or not found:
        raise SystemExit(f"bench/train_step.py failed (exit {process.returncode}):\n{out}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/default.yml")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"{args.config}, full regressor step (bench/train_step.py), median ms per process; lib's spin count "
          f"{OPENMP_SPINS}; cores usable {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.2f}")
    for r in range(args.rounds):
        print(f"round {r + 1}")
        one = step_ms(start(args.config, 1, args.steps, "lib"))
        print(f"  alone, 1 thread:                {one:7.1f} ms")
        for setting in SETTINGS:
            ms = step_ms(start(args.config, 2, args.steps, setting))
            print(f"  alone, 2 threads, {setting:8s}:     {ms:7.1f} ms  ({one / ms:4.2f}x one thread)", flush=True)
        cases = [(2, s) for s in SETTINGS] + [(1, "lib")]
        for threads, setting in cases:
            pair = [start(args.config, threads, args.steps, setting) for _ in range(2)]
            a, b = (step_ms(p) for p in pair)
            print(f"  side by side, {threads} thread(s) each, {setting:8s}: {a:7.1f} / {b:7.1f} ms", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
