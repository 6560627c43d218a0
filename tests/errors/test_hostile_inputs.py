"""Bad input never passes silently: each script, given a broken file, stops with one line that names the
file, exit code 1 and no traceback; and nothing it had already written is lost.

The scripts run as a user runs them (subprocesses on a copy of the tiny actor), so these tests see
exactly what a user sees on the terminal.
"""
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from lib.config import load_config
from lib.paths import REPO_ROOT, ActorPaths, resolve


def _rel(path) -> str:
    return os.path.relpath(path, REPO_ROOT)


def run_script(*args, timeout=300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_one_line_error(result: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 1, no traceback, the last stderr line is 'error: ...' naming each of ``names``. -> that line"""
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), result.stderr[-2000:]
    for name in names:
        assert str(name) in line, (name, line)
    return line


@pytest.fixture
def actor_copy(tiny_actor_config, tmp_path):
    """(config path, overrides) of a private copy of the tiny actor's export, masks and stage 1, to break."""
    cfg = load_config(tiny_actor_config)
    data = tmp_path / "actor"
    shutil.copytree(resolve(cfg.actor.data_dir), data)
    shutil.copytree(ActorPaths(cfg).masks, tmp_path / "masks")
    overrides = [f"actor.data_dir={_rel(data)}", f"actor.experiments_dir={_rel(tmp_path / 'experiments')}",
                 f"data.masks_dir={_rel(tmp_path / 'masks')}"]
    shutil.copytree(ActorPaths(cfg).stage_dir("mesh_pca"),
                    ActorPaths(load_config(tiny_actor_config, overrides)).stage_dir("mesh_pca"))
    return tiny_actor_config, overrides


def _edit_npz(path, **changes):
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(changes)
    np.savez(path, **arrays)


def _without_masks(config, overrides):
    """No masks rendered yet for the actor (render_masks.py skips frames whose masks exist)."""
    shutil.rmtree(ActorPaths(load_config(config, overrides)).masks)


def _first_train_param(data_dir):
    import json

    frame = json.loads((data_dir / "transforms_train.json").read_text())["frames"][0]
    return data_dir / frame["flame_param_path"]


# ---------------------------------------------------------------- FLAME model file

def test_truncated_and_keyless_flame_files_are_one_line_errors_in_every_script(actor_copy, tmp_path):
    config, overrides = actor_copy
    flame = resolve(load_config(config).actor.flame_model)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(flame.read_bytes()[:5000])
    with open(flame, "rb") as f:
        data = pickle.load(f)  # our own synthetic model: a trusted file
    del data["shapedirs"]
    keyless = tmp_path / "keyless.pkl"
    keyless.write_bytes(pickle.dumps(data))
    for script in ("pca_mesh.py", "train.py"):
        result = run_script(script, config, *overrides, f"actor.flame_model={_rel(truncated)}")
        assert "could not be read as a FLAME model pickle" in assert_one_line_error(result, truncated)
        result = run_script(script, config, *overrides, f"actor.flame_model={_rel(keyless)}")
        assert "has no 'shapedirs'" in assert_one_line_error(result, keyless)
    debug = run_script("pca_mesh.py", config, *overrides, f"actor.flame_model={_rel(keyless)}", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # --debug shows where it was raised


def test_a_model_with_fewer_expression_columns_than_asked_is_refused(actor_copy, tmp_path):
    config, overrides = actor_copy
    with open(resolve(load_config(config).actor.flame_model), "rb") as f:
        data = pickle.load(f)
    data["shapedirs"] = data["shapedirs"][..., :310]  # 300 shape + 10 expression columns
    short = tmp_path / "short.pkl"
    short.write_bytes(pickle.dumps(data))
    result = run_script("pca_mesh.py", config, *overrides, f"actor.flame_model={_rel(short)}")
    line = assert_one_line_error(result, short, "actor.n_expr")
    assert "holds 10 expression columns" in line
    # stated in the config, the truncation is the user's choice and runs
    ok = run_script("pca_mesh.py", config, *overrides, f"actor.flame_model={_rel(short)}", "actor.n_expr=10")
    assert ok.returncode == 0, ok.stderr[-2000:]


# ---------------------------------------------------------------- numbers in the data

@pytest.mark.parametrize("key, value", [("expr", np.nan), ("translation", np.inf)])
def test_a_non_finite_flame_parameter_is_named_by_every_script(actor_copy, key, value):
    config, overrides = actor_copy
    data_dir = resolve(overrides[0].split("=", 1)[1])
    param = _first_train_param(data_dir)
    with np.load(param) as npz:
        broken = npz[key].copy()
    broken[0, 1] = value
    _edit_npz(param, **{key: broken})
    _without_masks(config, overrides)
    for script in ("pca_mesh.py", "train.py", "render_masks.py"):
        line = assert_one_line_error(run_script(script, config, *overrides), param, f"'{key}'")
        assert "non-finite" in line


def test_a_zero_focal_length_is_named_with_its_frame(actor_copy):
    import json

    config, overrides = actor_copy
    split = resolve(overrides[0].split("=", 1)[1]) / "transforms_val.json"
    content = json.loads(split.read_text())
    content["frames"][1]["fl_x"] = 0.0
    split.write_text(json.dumps(content))
    for script in ("render_masks.py", "train.py"):
        line = assert_one_line_error(run_script(script, config, *overrides), split, "frame 1")
        assert "fl_x = 0" in line


def test_an_empty_split_is_an_error_not_zero_frames(actor_copy):
    import json

    config, overrides = actor_copy
    split = resolve(overrides[0].split("=", 1)[1]) / "transforms_test.json"
    split.write_text(json.dumps({**json.loads(split.read_text()), "frames": []}))
    for script in ("render_masks.py", "train.py"):
        assert "lists no frames" in assert_one_line_error(run_script(script, config, *overrides), split)


# ---------------------------------------------------------------- checkpoints

def test_resuming_with_another_network_shape_is_one_clear_line(run_config):
    config, overrides = run_config
    assert run_script("train.py", config, *overrides, "train.iterations=2").returncode == 0
    paths = ActorPaths(load_config(config, overrides))
    saved = (paths.regressor / "config.yml").read_text()
    result = run_script("train.py", config, *overrides, "train.iterations=4", "regressor.feature_channels=6")
    line = assert_one_line_error(result, paths.regressor_checkpoints / "step_00000002.pt")
    assert "regressor.feature_channels: 4 -> 6" in line and "run.name" in line and "train.resume=false" in line
    assert (paths.regressor / "config.yml").read_text() == saved  # the record of how it was trained stays


def test_a_checkpoint_of_another_shape_without_a_config_record_is_refused_by_its_weights(run_config):
    config, overrides = run_config
    cfg = load_config(config, overrides)
    assert run_script("train.py", config, *overrides, "train.iterations=2").returncode == 0
    path = ActorPaths(cfg).regressor_checkpoints / "step_00000002.pt"
    state = torch.load(path, weights_only=True)
    del state["shaping"]  # as written before checkpoints recorded their config
    torch.save(state, path)
    result = run_script("train.py", config, *overrides, "train.iterations=4", "regressor.feature_channels=6")
    assert "does not fit the regressor" in assert_one_line_error(result, path)


def test_partial_checkpoints_of_a_killed_write_are_removed_on_the_next_start(run_config):
    config, overrides = run_config
    folder = ActorPaths(load_config(config, overrides)).regressor_checkpoints
    folder.mkdir(parents=True)
    stale = folder / ".step_00000003.pt.k1ll3d.partial"
    stale.write_bytes(b"half a checkpoint")
    assert run_script("train.py", config, *overrides, "train.iterations=1").returncode == 0
    assert not stale.exists()
    assert [p.name for p in folder.iterdir()] == ["step_00000001.pt"]


# ---------------------------------------------------------------- concurrency

def test_a_second_training_of_one_run_folder_says_who_holds_it(run_config):
    from lib.lock import locked

    config, overrides = run_config
    folder = ActorPaths(load_config(config, overrides)).regressor
    with locked(folder, "the regressor run folder"):
        result = run_script("train.py", config, *overrides)
    line = assert_one_line_error(result, folder, f"process {os.getpid()}")
    assert "is in use by" in line
    assert not (folder / "checkpoints").exists()  # it wrote nothing


def test_a_second_generation_of_one_synthetic_actor_stops_with_the_first_ones_pid(tmp_path, tiny_actor_config):
    from lib.lock import locked

    data = tmp_path / "fresh_actor"
    overrides = [f"actor.data_dir={_rel(data)}"]
    with locked(data, "the synthetic dataset", data.parent / f".{data.name}.lock", clean=False):
        result = run_script("-m", "lib.dataset.synthetic_actor", tiny_actor_config, *overrides)
    assert f"process {os.getpid()}" in assert_one_line_error(result, data)
    assert not data.exists() and not list(tmp_path.glob(".fresh_actor.partial*"))


def test_actors_of_one_finished_head_are_generated_side_by_side(tmp_path, tiny_actor_config):
    """The head's lock guards only its making: another actor's generator holding it stops no one."""
    from lib.lock import locked

    head = resolve(load_config(tiny_actor_config).synthetic.head_dir)
    data = tmp_path / "second_actor"
    with locked(head, "the synthetic head model folder", head.parent / f".{head.name}.lock"):
        result = run_script("-m", "lib.dataset.synthetic_actor", tiny_actor_config, f"actor.data_dir={_rel(data)}",
                            "synthetic.seed=5", "synthetic.frames_per_sequence=1")
    assert result.returncode == 0, result.stderr
    assert (data / "transforms_test.json").is_file()


@pytest.mark.parametrize("moment", ["while the stage starts up", "while the stage writes"])
def test_killing_run_sh_ends_the_stage_it_was_running(tmp_path, tiny_actor_config, moment):
    """run.sh is SIGKILLed while it generates a new actor: the generator ends too, leaving no partial folder."""
    import signal
    import time

    import yaml

    cfg_path = tmp_path / "fresh.yml"
    data = tmp_path / "fresh_actor"
    cfg_path.write_text(yaml.safe_dump({
        "base": os.path.relpath(tiny_actor_config, tmp_path),
        "actor": {"name": "fresh", "data_dir": _rel(data), "experiments_dir": _rel(tmp_path / "experiments")},
        "synthetic": {"frames_per_sequence": 40}}))  # long enough to be caught in the act
    run_sh = subprocess.Popen([str(REPO_ROOT / "run.sh"), str(cfg_path)], cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    generator = None
    deadline = time.time() + 120
    while generator is None and time.time() < deadline:
        time.sleep(0.2)
        out = subprocess.run(["pgrep", "-P", str(run_sh.pid), "-f", "synthetic_actor"], capture_output=True, text=True)
        generator = int(out.stdout.split()[0]) if out.stdout.strip() else None
    assert generator is not None, "run.sh never started the generator"
    while moment == "while the stage writes" and not list(tmp_path.glob(".fresh_actor.partial-*")) \
            and time.time() < deadline:
        time.sleep(0.2)
    run_sh.send_signal(signal.SIGKILL)
    run_sh.wait()
    for _ in range(100):
        if not os.path.exists(f"/proc/{generator}") or _is_zombie(generator):
            break
        time.sleep(0.1)
    else:
        os.kill(generator, signal.SIGKILL)
        pytest.fail("the generator kept running after run.sh was killed")
    assert not data.exists() and not list(tmp_path.glob(".fresh_actor.partial-*"))


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# ---------------------------------------------------------------- disk full

def test_a_full_disk_is_named_with_the_path_and_keeps_the_previous_checkpoint(tmp_path, fill_disk, capsys):
    """The temp file of the atomic write fails every write with ENOSPC, as a full file system does."""
    from lib.cli import run
    from lib.models.mesh_pca import MeshPCA
    from lib.train.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint({"model": {"w": torch.ones(3)}, "step": 1}, tmp_path, 1)
    fill_disk()
    state = {"model": {"w": torch.zeros(1 << 16)}, "step": 2}
    with pytest.raises(SystemExit) as exit_:
        run(lambda: save_checkpoint(state, tmp_path, 2), debug=False)
    assert exit_.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: no space left on device while writing") and "step_00000002.pt" in line
    assert load_checkpoint(tmp_path / "step_00000001.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt"]  # no partial file either

    pca = MeshPCA.fit(torch.randn(4, 10, 3), 2)  # np.savez, another writer than torch's
    with pytest.raises(SystemExit):
        run(lambda: pca.save(tmp_path / "mesh_pca.npz"), debug=False)
    assert "no space left on device while writing" in capsys.readouterr().err
    assert not (tmp_path / "mesh_pca.npz").exists()


@pytest.mark.parametrize("key", ["actor.flame_model", "actor.flame_uv", "actor.flame_masks", "actor.data_dir"])
@pytest.mark.parametrize("wrong", ["a folder", "another kind of file"])
def test_a_path_key_naming_a_folder_or_the_wrong_file_is_one_line(run_config, key, wrong):
    config, overrides = run_config
    target = "configs" if wrong == "a folder" else "configs/default.yml"
    if key == "actor.data_dir" and wrong == "a folder":
        target = "lib"  # a folder, but no export
    assert_one_line_error(run_script("train.py", config, *overrides, f"{key}={target}"), REPO_ROOT / target)
