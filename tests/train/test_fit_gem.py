"""Stage 3 end to end on the tiny actor: regressor -> GEM file, report, renders, the sweeps' view."""
import json

import pytest
import torch

from lib.config import load_config
from lib.flame.model import FlameModel
from lib.models.avatar import load_regressor
from lib.models.gem import ATTRIBUTES, GaussianEigenModel
from lib.paths import ActorPaths, resolve
from lib.train import trainer
from lib.train.checkpoint import CheckpointError
from lib.train.fit_gem import fit_gem
from lib.viewer.sweeps import identity_view, render_sweep


def test_gem_of_the_trained_regressor_renders_its_training_frames_like_it(run_config):
    config, overrides = run_config
    cfg = load_config(config, overrides + ["gem.table_components=[1]", "gem.parts=true"])
    trainer.train(cfg, log=lambda *a: None)
    lines = []
    model = fit_gem(cfg, log=lines.append)
    paths = ActorPaths(cfg)

    loaded = GaussianEigenModel.load(paths.gem)
    T = len(loaded.timesteps)  # the train + val timesteps: one training sequence
    assert T == 3 and loaded.n_gaussians == model.n_gaussians
    assert all(b.n_components <= T - 1 for a in ATTRIBUTES for b in loaded.blocks[a])
    assert "rest" in loaded.parts or len(loaded.parts) > 1

    report = json.loads(paths.gem_report.read_text())
    sizes = report["size_mb"]
    assert 0 < sizes["gem_fp16"] < sizes["gem_fp32"] and sizes["regressor_weights"] > 0
    val = report["renders"]["val"]
    # T frames span at most T - 1 directions: GEM rebuilds its training frames exactly.
    assert abs(val["gem"]["psnr"] - val["regressor"]["psnr"]) < 0.01
    assert abs(val["gem"]["psnr_masked"] - val["regressor"]["psnr_masked"]) < 0.01
    assert 5.0 < report["renders"]["test"]["gem"]["psnr"] < 60.0
    assert [row["components"] for row in report["renders"]["table"]] == [1, T - 1]
    assert any(line.startswith("size: GEM") for line in lines)

    camera, R, t = identity_view(cfg)  # the sweeps' view: identity camera and pose
    images = render_sweep(loaded, "positions", 0, torch.tensor([0.0, 3.0]), camera, R, t, torch.ones(3))
    assert images.shape == (2, camera.height, camera.width, 3)
    assert (images[0] < 0.95).any(dim=-1).float().mean() > 0.02  # the head is in view


def test_a_checkpoint_of_another_regressor_config_is_a_clear_error(run_config):
    config, overrides = run_config
    cfg = load_config(config, overrides)
    trainer.train(cfg, log=lambda *a: None)
    other = load_config(config, overrides + ["regressor.feature_channels=3"])
    flame = FlameModel.from_file(resolve(other.actor.flame_model))
    with pytest.raises(CheckpointError, match=r"step_\d+\.pt does not fit the regressor of this config"):
        load_regressor(other, ActorPaths(other), flame, torch.device("cpu"))
