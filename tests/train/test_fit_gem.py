"""Stage 3 end to end on the tiny actor: regressor -> GEM file, report, renders, the sweeps' view."""
import json

import pytest
import torch

from lib.config import load_config
from lib.dataset.vhap import VhapExport
from lib.flame.model import FlameModel
from lib.models.avatar import load_regressor
from lib.models.gem import ATTRIBUTES, GaussianEigenModel, GaussianSet
from lib.paths import ActorPaths, resolve
from lib.train import trainer
from lib.train.checkpoint import CheckpointError
from lib.train.data import ActorData
from lib.train.fit_gem import fit_gem, gem_space_gaussians
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
    assert not list(paths.gem_dir.glob(".*partial*"))  # the frame store is gone
    assert report["store_mb"] == pytest.approx(T * model.n_gaussians * 11 * 4 / 2 ** 20)
    assert report["gram_mb"] == pytest.approx(T * T * 8 / 2 ** 20)
    # The model fitted from the frame store is the fit of the regressor's frames held in memory.
    flame = FlameModel.from_config(cfg)
    avatar, _ = load_regressor(cfg, paths, flame, torch.device("cpu"))
    data = ActorData(VhapExport.from_config(cfg), flame, torch.device("cpu"), keep_meshes=False)  # as stage 3
    frames = GaussianSet(*map(torch.cat, zip(*gem_space_gaussians(avatar, data, loaded.timesteps.tolist()))))
    labels = torch.empty(loaded.n_gaussians, dtype=torch.long)
    for i, block in enumerate(loaded.blocks["positions"]):
        labels[block.index] = i
    counts = {a: getattr(cfg.gem, a) for a in ATTRIBUTES}
    in_memory = GaussianEigenModel.fit(frames, counts, parts=(loaded.parts, labels))
    for attr in ATTRIBUTES:
        for a, b in zip(in_memory.blocks[attr], loaded.blocks[attr]):
            assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-5, atol=1e-12)
    for x, y in zip(in_memory.reconstruct(in_memory.coefficients), loaded.reconstruct(loaded.coefficients)):
        assert torch.allclose(x, y, atol=1e-6)
    sizes = report["size_mb"]
    assert 0 < sizes["gem_fp16"] < sizes["gem_fp32"] and sizes["regressor_weights"] > 0
    val = report["renders"]["val"]
    # T frames span at most T - 1 directions: GEM rebuilds its training frames exactly.
    assert abs(val["gem_oracle"]["psnr"] - val["regressor"]["psnr"]) < 0.01
    assert abs(val["gem_oracle"]["psnr_masked"] - val["regressor"]["psnr_masked"]) < 0.01
    assert 5.0 < report["renders"]["test"]["gem_oracle"]["psnr"] < 60.0
    assert report["renders"]["coefficients"].startswith("oracle")  # a best case, named as such
    assert [row["components"] for row in report["renders"]["table"]] == [1, T - 1]
    assert report["renders"]["table"][-1]["oracle_test_psnr"] == report["renders"]["test"]["gem_oracle"]["psnr"]
    assert any("GEM oracle" in line for line in lines)
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


def test_the_frame_store_is_removed_after_a_build_that_raised_and_after_a_killed_one(run_config, monkeypatch):
    config, overrides = run_config
    cfg = load_config(config, overrides + ["gem.evaluate=false"])
    trainer.train(cfg, log=lambda *a: None)
    gem_dir = ActorPaths(cfg).gem_dir
    gem_dir.mkdir(parents=True)
    killed = gem_dir / ".frames.f32.k1ll3d.partial"  # what a killed stage 3 leaves
    killed.write_bytes(b"\0" * 4096)
    seen = []

    def failing_fit(store, *args, **kwargs):
        seen.extend((path, path.stat().st_size, store.nbytes) for path in gem_dir.glob(".*partial*"))
        raise RuntimeError("the fit failed")

    monkeypatch.setattr(GaussianEigenModel, "fit", failing_fit)
    with pytest.raises(RuntimeError, match="the fit failed"):
        fit_gem(cfg, log=lambda *a: None)
    [(store, size, nbytes)] = seen  # the killed run's file was removed when this run took the folder
    assert store != killed and size == nbytes > 0
    assert not list(gem_dir.glob(".*partial*"))
