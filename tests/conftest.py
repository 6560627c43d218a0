"""Suite-wide settings, applied before any test module imports torch."""
import os

# OpenMP threads that spin while waiting run 10-200x slower on a shared 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
