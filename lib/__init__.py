"""The GEM pipeline's library. Importing it first (every script does) sets, before torch loads libgomp,
OMP_WAIT_POLICY=PASSIVE unless the user set it: idle OpenMP threads then sleep instead of spinning, so
that torch's intra-op threads (``train.threads``) do not stall each other on a machine shared with other
processes (2 threads ran up to 3x slower than 1 there with spinning waits)."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
