"""./run.sh end to end on a tiny synthetic actor reenacted by a second one: every stage runs once,
then every stage is skipped, then an edited config reruns exactly the stages it drives."""
import os
import re
import subprocess

import pytest
import yaml

from lib.paths import REPO_ROOT

STAGES = ["synthetic data (made only when missing)", "source actor data", "masks", "mesh PCA", "regressor",
          "regressor test", "GEM", "GEM viewer sweeps", "mapping network", "self-reenactment",
          "cross-identity reenactment"]
SKIPPED = "skipped (outputs exist for the same config)"


def _rel(path) -> str:
    """Configs take paths relative to the repository root, also for pytest's temporary folders."""
    return os.path.relpath(path, REPO_ROOT)


def _write_configs(root) -> dict:
    """Target actor (80x55 images, 10 cameras, 2 x 3 timesteps, a tiny regressor), its mapping config
    and a source actor of another seed; all artifacts under ``root``."""
    head = root / "head"
    tiny = {
        "base": os.path.relpath(REPO_ROOT / "configs" / "synthetic_a.yml", root),
        "actor": {"name": "tiny", "data_dir": _rel(root / "actor"), "flame_model": _rel(head / "flame2023.pkl"),
                  "flame_uv": _rel(head / "head_template.obj"), "flame_masks": _rel(head / "FLAME_masks.pkl"),
                  "experiments_dir": _rel(root / "experiments")},
        "synthetic": {"head_dir": _rel(head), "scale": 0.1, "n_cameras": 10, "sequences": ["A", "B"],
                      "frames_per_sequence": 3},
        "regressor": {"uv_size": 16, "widths": [8, 8], "convs_per_level": 1, "feature_channels": 4,
                      "style_dim": 8, "colour_width": 8, "n_pca": 4},
        "train": {"iterations": 6, "checkpoint_every": 3, "log_every": 2, "image_every": 3,
                  "curve_every_minutes": 0.0, "lr": 2e-3, "lr_features": 1e-2, "lr_schedule": "exponential",
                  "device": "cpu", "threads": 1},
        "test": {"spin_views": 4, "max_frames": 2},
        "gem": {"positions": 2, "rotations": 2, "scales": 2, "opacities": 2, "table_components": [1]},
        "viewer": {"components": 1, "strip_steps": 2, "video_frames": 2},
    }
    files = {"config": root / "tiny.yml", "mapping": root / "tiny_mapping.yml", "source": root / "tiny_b.yml"}
    files["config"].write_text(yaml.safe_dump(tiny))
    files["mapping"].write_text(yaml.safe_dump({
        "base": "tiny.yml", "train": {"stage": "mapping"},
        "mapping": {"width": 16, "warmup_iterations": 20, "iterations": 4}}))
    files["source"].write_text(yaml.safe_dump({
        "base": "tiny.yml", "actor": {"name": "tiny_b", "data_dir": _rel(root / "actor_b")}, "synthetic": {"seed": 2}}))
    return files


def _run(*configs) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO_ROOT / "run.sh"), *map(str, configs)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=900)


def _ran_and_skipped(out: str) -> tuple[list[str], list[str]]:
    """Titles of the stages that ran ('=== TITLE: N s') and that were skipped, in order."""
    ran = re.findall(r"^=== (.+): \d+ s$", out, re.M)
    skipped = re.findall(rf"^=== (.+): {re.escape(SKIPPED)}$", out, re.M)
    return ran, skipped


@pytest.mark.slow
def test_run_sh_runs_each_stage_once_and_reruns_only_what_an_edit_invalidates(tmp_path):
    if not (REPO_ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("run.sh would install .venv first; run ./install.sh")
    files = _write_configs(tmp_path)
    target = [files["config"], files["mapping"], files["source"]]
    experiments = tmp_path / "experiments" / "tiny" / "default"

    first = _run(*target)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert _ran_and_skipped(first.stdout) == (STAGES, [])
    for result in ("regressor/eval/metrics.json", "gem/report.json", "mapping/eval/metrics.json",
                   "mapping/reenact/tiny_b/reenactment.json"):
        assert (experiments / result).is_file(), result
    assert list((experiments / "gem" / "sweeps").glob("*.mp4"))
    listed = first.stdout.split("=== done; results:")[1]
    assert "regressor/eval/metrics.json" in listed and "mapping/reenact/tiny_b/" in listed

    second = _run(*target)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert _ran_and_skipped(second.stdout) == ([], STAGES)

    # An edited mapping config and a deleted sweep folder: the stages they drive run again, only those.
    mapping = yaml.safe_load(files["mapping"].read_text())
    mapping["mapping"]["iterations"] += 1  # a key whose change the training resumes from
    files["mapping"].write_text(yaml.safe_dump(mapping))
    for video in (experiments / "gem" / "sweeps").iterdir():
        video.unlink()
    third = _run(*target)
    assert third.returncode == 0, third.stdout[-4000:] + third.stderr[-4000:]
    ran, skipped = _ran_and_skipped(third.stdout)
    assert ran == ["GEM viewer sweeps", "mapping network", "self-reenactment", "cross-identity reenactment"]
    assert skipped == [s for s in STAGES if s not in ran]
    assert "=== mapping network (its config changed since it last ran)" in third.stdout

    # A viewer setting: the sweeps run again, nothing else (stages hash only the sections they read).
    tiny = yaml.safe_load(files["config"].read_text())
    tiny["viewer"]["fps"] = 12
    files["config"].write_text(yaml.safe_dump(tiny))
    viewer_only = _run(*target)
    assert viewer_only.returncode == 0, viewer_only.stdout[-4000:] + viewer_only.stderr[-4000:]
    assert _ran_and_skipped(viewer_only.stdout) == (["GEM viewer sweeps"], [s for s in STAGES if s != "GEM viewer sweeps"])

    # A named run of the same actor with one key changed: every stage runs for it, beside the first run.
    ablation = _run(*target, "run.name=ablation", "loss.ssim=0.5")
    assert ablation.returncode == 0, ablation.stdout[-4000:] + ablation.stderr[-4000:]
    ran, _ = _ran_and_skipped(ablation.stdout)
    assert ran == [s for s in STAGES if s != "source actor data"]  # the source actor's stamps are its own run's
    assert (experiments.parent / "ablation" / "mapping" / "reenact" / "tiny_b" / "reenactment.json").is_file()
    assert _ran_and_skipped(_run(*target).stdout) == ([], STAGES)  # the first run is untouched

    # A source actor whose data does not exist (not synthetic): the no-op stage is refused, no stamp.
    ghost = tmp_path / "ghost.yml"
    ghost.write_text(yaml.safe_dump({"base": "tiny.yml", "actor": {"name": "ghost", "data_dir": _rel(tmp_path / "none")},
                                     "synthetic": {"enabled": False}}))
    fourth = _run(files["config"], files["mapping"], ghost)
    assert fourth.returncode == 1
    assert "=== source actor data failed (its outputs are missing)" in fourth.stdout
    assert "did not write" in fourth.stderr and "transforms_train.json" in fourth.stderr
    assert not (tmp_path / "experiments" / "ghost" / "default" / "stages").exists()
