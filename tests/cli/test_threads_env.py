"""The scripts' OpenMP setting: importing lib (every script's and benchmark's first import) sets how idle
OpenMP threads wait, before torch loads libgomp, unless the user chose otherwise."""
import os
import subprocess
import sys

from lib import OPENMP_SPINS
from lib.paths import REPO_ROOT

PROBE = "import lib, os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"


def _probe(**env) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, "PYTHONPATH": str(REPO_ROOT), **env},
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_importing_lib_sets_a_short_spin_when_nothing_is_set():
    assert _probe() == f"None {OPENMP_SPINS}"


def test_a_users_wait_setting_is_kept():
    assert _probe(OMP_WAIT_POLICY="PASSIVE") == "PASSIVE None"
    assert _probe(GOMP_SPINCOUNT="50") == "None 50"


def test_every_script_and_benchmark_imports_lib_before_torch():
    scripts = ["train.py", "test.py", "pca_mesh.py", "pca_gauss.py", "pca_viewer.py", "render_masks.py"]
    scripts += [str(p.relative_to(REPO_ROOT)) for p in sorted((REPO_ROOT / "bench").glob("*.py"))]
    for script in scripts:
        lines = [ln for ln in (REPO_ROOT / script).read_text().splitlines() if ln.startswith(("import ", "from "))]
        torch_at = [i for i, ln in enumerate(lines) if ln.split()[1].split(".")[0] == "torch"]
        first_lib = next((i for i, ln in enumerate(lines) if ln.startswith(("from lib", "import lib"))), len(lines))
        assert all(i > first_lib for i in torch_at), f"{script} imports torch before lib"
