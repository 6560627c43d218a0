"""A run resumes only under the config that trained it: keys that shape the model are recorded in every
checkpoint; how long and how often it runs may change."""
import shutil

import pytest

from lib.config import load_config
from lib.paths import ActorPaths
from lib.train import trainer
from lib.train.checkpoint import CheckpointError, check_resume, latest_checkpoint, load_checkpoint, shaping_config


def _train(config, overrides):
    cfg = load_config(config, overrides)
    trainer.train(cfg, log=lambda *a: None)
    return ActorPaths(cfg)


def test_a_run_resumes_when_only_its_length_and_cadence_change(run_config):
    config, overrides = run_config
    paths = _train(config, overrides + ["train.iterations=2"])
    first = load_checkpoint(latest_checkpoint(paths.regressor_checkpoints))
    assert first["shaping"]["regressor.feature_channels"] == 4 and "train.iterations" not in first["shaping"]
    _train(config, overrides + ["train.iterations=4", "train.log_every=1", "train.threads=1"])
    assert load_checkpoint(latest_checkpoint(paths.regressor_checkpoints))["step"] == 4


def test_a_run_that_changes_a_shaping_key_is_refused_then_starts_over_when_asked(run_config):
    config, overrides = run_config
    paths = _train(config, overrides + ["train.iterations=2"])
    old = sorted(p.name for p in paths.regressor_checkpoints.iterdir())
    with pytest.raises(CheckpointError, match=r"train\.lr: 0\.002 -> 0\.001.*run\.name=NAME.*train\.resume=false"):
        _train(config, overrides + ["train.iterations=2", "train.lr=1e-3"])
    _train(config, overrides + ["train.iterations=2", "train.lr=1e-3", "train.resume=false"])
    aside = [p for p in paths.regressor.iterdir() if p.name.startswith("checkpoints.before-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == old  # kept, not deleted
    state = load_checkpoint(latest_checkpoint(paths.regressor_checkpoints))
    assert state["step"] == 2 and state["shaping"]["train.lr"] == 1e-3


def test_the_mapping_stage_compares_its_own_and_its_upstream_keys():
    cfg = load_config(None, ["train.stage=mapping"])
    state = {"shaping": shaping_config(cfg, "mapping")}
    assert "gem.positions" in state["shaping"] and "mapping.width" in state["shaping"]
    assert "viewer.fps" not in state["shaping"] and "mapping.iterations" not in state["shaping"]
    check_resume(state, load_config(None, ["train.stage=mapping", "mapping.iterations=5", "viewer.fps=9"]),
                 "mapping", "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"ckpt\.pt was trained with another config: gem\.positions: 50 -> 20"):
        check_resume(state, load_config(None, ["train.stage=mapping", "gem.positions=20"]), "mapping", "ckpt.pt")


def test_a_key_newer_than_the_checkpoint_resumes_at_its_default_only():
    """A checkpoint written before a key existed records no value for it: its default (the old behaviour)
    resumes, another value is refused."""
    cfg = load_config(None)
    state = {"shaping": shaping_config(cfg, "regressor")}
    del state["shaping"]["train.views_per_step"]
    check_resume(state, cfg, "regressor", "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"train\.views_per_step: '\(absent\)' -> 3"):
        check_resume(state, load_config(None, ["train.views_per_step=3"]), "regressor", "ckpt.pt")


def test_two_named_runs_of_one_actor_live_side_by_side(run_config):
    config, overrides = run_config
    first = _train(config, overrides + ["train.iterations=2"])
    second_cfg = load_config(config, overrides + ["run.name=ablation", "train.iterations=3", "train.lr=1e-3"])
    shutil.copytree(first.stage_dir("mesh_pca"), ActorPaths(second_cfg).stage_dir("mesh_pca"))
    trainer.train(second_cfg, log=lambda *a: None)  # another run: no refusal, its own folder
    second = ActorPaths(second_cfg)
    assert first.root.parent == second.root.parent and first.root.name == "default" and second.root.name == "ablation"
    assert load_checkpoint(latest_checkpoint(first.regressor_checkpoints))["step"] == 2
    assert load_checkpoint(latest_checkpoint(second.regressor_checkpoints))["shaping"]["train.lr"] == 1e-3
