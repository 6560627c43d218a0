"""The scripts' OpenMP setting: importing lib (every script's first import) makes idle OpenMP threads
sleep, before torch loads libgomp, unless the user chose otherwise."""
import os
import subprocess
import sys

from lib.paths import REPO_ROOT

PROBE = "import lib, os; print(os.environ.get('OMP_WAIT_POLICY'))"


def _probe(**env) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, "PYTHONPATH": str(REPO_ROOT), **env},
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_importing_lib_sets_passive_waits_when_unset():
    assert _probe() == "PASSIVE"


def test_a_users_wait_policy_is_kept():
    assert _probe(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


def test_every_script_imports_lib_before_torch():
    for script in ("train.py", "test.py", "pca_mesh.py", "pca_gauss.py", "pca_viewer.py", "render_masks.py"):
        lines = [ln for ln in (REPO_ROOT / script).read_text().splitlines() if ln.startswith(("import ", "from "))]
        first_lib = next(i for i, ln in enumerate(lines) if ln.startswith(("from lib", "import lib")))
        torch_at = [i for i, ln in enumerate(lines) if ln.split()[1].split(".")[0] == "torch"]
        assert all(i > first_lib for i in torch_at), f"{script} imports torch before lib"
