"""The GEM pipeline's library. Importing it first (every script and benchmark does) sets how torch's idle
OpenMP threads wait, before torch loads libgomp, unless the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT:
they spin ``OPENMP_SPINS`` times, then sleep.

Why (``bench/omp_wait.py``, a regressor step of configs/default.yml on two threads, 2-core CPU):
libgomp's own default (300,000 spins) and ``OMP_WAIT_POLICY=ACTIVE`` are fast alone, but two such
processes side by side took 620-810 ms a step each, as each waiting thread holds a core the other process
needs; ``PASSIVE`` (no spin) shares the cores, but each of a step's many small parallel regions then
wakes a sleeping thread, and two threads ran no faster than one. A short spin shares the cores about as
``PASSIVE`` does and keeps part of the second thread's gain: 21% more regressor steps in a 2-minute
budget than ``PASSIVE``."""
import os

OPENMP_SPINS = "1000"

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPINS
