import json
import os
import subprocess
import sys
import time

import pytest
import torch

from lib.config import load_config
from lib.dataset.vhap import VhapExport
from lib.eval import evaluate as evaluation
from lib.eval.evaluate import evaluate
from lib.eval.render import render_gaussians
from lib.flame.model import FlameModel
from lib.models.avatar import build_avatar
from lib.paths import REPO_ROOT, ActorPaths, resolve
from lib.train import trainer
from lib.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from lib.train.data import ActorData
from lib.train.fit_gem import fit_gem
from lib.train.losses import photometric, regularisers
from lib.viewer.sweeps import identity_view

ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def _train_cli(config, overrides, **kw):
    return subprocess.Popen([sys.executable, "train.py", str(config), *overrides], cwd=REPO_ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_a_few_training_steps_lower_the_loss(run_config):
    cfg = load_config(*run_config)
    torch.manual_seed(0)
    flame = FlameModel.from_file(resolve(cfg.actor.flame_model))
    export = VhapExport.from_config(cfg)
    data = ActorData(export, flame, torch.device("cpu"))
    avatar = build_avatar(cfg, ActorPaths(cfg), flame)
    opt = trainer.make_optimizer(avatar, cfg)
    frame = export.split("train")[3]
    sample = data.sample(frame)
    bg = torch.tensor([0.2, 0.5, 0.8])
    gt = sample.ground_truth(bg)

    def loss_now():
        g = avatar(*data.driving(frame.timestep_index))
        rgb = render_gaussians(g, 0, sample.viewmat[None], sample.K[None], frame.camera.width, frame.camera.height, bg)
        terms = photometric(rgb, gt, torch.ones_like(sample.alpha)[None], 0.4, 0.8)
        terms.update(regularisers(g.position_residual, g.scales, 750.0, 20.0))
        return sum(terms.values())

    losses = []
    for _ in range(25):
        loss = loss_now()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_killed_run_resumes_and_ends_at_the_configured_step(run_config):
    config, overrides = run_config
    overrides = overrides + ["train.iterations=300", "train.checkpoint_every=5", "train.keep_checkpoints=50"]
    cfg = load_config(config, overrides)
    folder = ActorPaths(cfg).regressor_checkpoints
    first = _train_cli(config, overrides)
    deadline = time.time() + 120
    while latest_checkpoint(folder) is None and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert first.poll() is None, "the run ended before it could be killed:\n" + first.stdout.read()
    first.kill()
    first.wait()
    killed_at = load_checkpoint(latest_checkpoint(folder))["step"]
    assert killed_at < 300

    second = _train_cli(config, overrides)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    assert "resuming from" in out and f"(step {killed_at})" in out
    final = load_checkpoint(latest_checkpoint(folder))
    assert final["step"] == 300
    avatar = build_avatar(cfg, ActorPaths(cfg), FlameModel.from_file(resolve(cfg.actor.flame_model)))
    avatar.load_state_dict(final["model"])


def test_corrupt_checkpoint_is_a_clear_error_naming_the_file(run_config):
    config, overrides = run_config
    cfg = load_config(config, overrides)
    folder = ActorPaths(cfg).regressor_checkpoints
    folder.mkdir(parents=True)
    bad = folder / "step_00000003.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(CheckpointError, match="step_00000003.pt is corrupt"):
        load_checkpoint(bad)
    run = _train_cli(config, overrides)
    out, _ = run.communicate(timeout=120)
    assert run.returncode != 0
    assert str(bad) in out and "corrupt" in out
    assert "Traceback" not in out


def test_nan_guard_restores_the_last_good_state_and_training_finishes(run_config, monkeypatch):
    cfg = load_config(run_config[0], run_config[1] + ["train.iterations=8", "train.nan_snapshot_every=2"])
    calls = {"n": 0}
    real = trainer.photometric

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        terms = real(*args, **kwargs)
        if calls["n"] in (4, 5):
            terms["l1"] = terms["l1"] * float("nan")
        return terms

    monkeypatch.setattr(trainer, "photometric", sometimes_nan)
    messages = []
    avatar = trainer.train(cfg, log=messages.append)
    assert sum("non-finite gradient" in m for m in messages) == 2
    assert sum("VGG perceptual loss off" in m for m in messages) == 1  # no weights configured: one line
    assert all(torch.isfinite(p).all() for p in avatar.parameters())
    assert load_checkpoint(latest_checkpoint(ActorPaths(cfg).regressor_checkpoints))["step"] == 8


def test_two_process_gloo_run_keeps_identical_weights(run_config, tmp_path):
    config, overrides = run_config
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "tests/train/ddp_worker.py", str(config), str(tmp_path), *overrides, "train.iterations=4"]
    run = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The generator's output layer starts at zero: non-zero weights show that training happened.
    assert a["generator.head.weight"].abs().sum() > 0


def test_evaluation_writes_metrics_renders_and_videos(run_config, render_log):
    cfg = load_config(*run_config)
    trainer.train(cfg, log=lambda *a: None)
    render_log.watch(evaluation, "render_frame")
    render_log.watch(evaluation, "render_gaussians")
    results = evaluate(cfg, log=lambda *a: None)
    # each frame goes to its video as soon as it is rendered: no split is held in memory
    assert render_log.renders_in_a_row() == 1
    assert [render_log.frames(f"{split}.mp4") for split in ("val", "test", "spin")] == [2, 2, 4]
    out = ActorPaths(cfg).regressor_eval
    saved = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in ("psnr", "psnr_masked", "ssim", "l1"):
            assert 5.0 < saved[split][key] < 60.0 if "psnr" in key else 0.0 <= saved[split][key] <= 1.0
        assert saved[split]["frames"] == 2
        assert (out / f"{split}.mp4").stat().st_size > 0
        assert len(list((out / split).glob("*.png"))) == 2
    assert saved["lpips"].startswith("unavailable")
    assert len(list((out / "spin").glob("*.png"))) == 4 and (out / "spin.mp4").stat().st_size > 0
    assert results["test"]["per_frame"][0]["camera"] == cfg.test.camera


def test_a_one_camera_export_trains_and_evaluates_reporting_its_empty_val_split(tiny_actor_factory):
    """VHAP's union of a single camera has an empty val split: what only val feeds is said and skipped;
    a step asked for more views than the one camera trains on that one."""
    config = tiny_actor_factory(synthetic={"n_cameras": 1}, actor={"identity_camera": 0}, test={"camera": 0},
                                train={"iterations": 2, "curve_every_minutes": 1e-6, "views_per_step": 2})
    cfg = load_config(config)
    empty = f"val split is empty in {resolve(cfg.actor.data_dir) / 'transforms_val.json'}"
    lines = []
    trainer.train(cfg, log=lines.append)
    assert f"{empty}: no val curve" in lines
    paths = ActorPaths(cfg)
    assert latest_checkpoint(paths.regressor_checkpoints) is not None and not paths.regressor_curve.exists()

    lines.clear()
    evaluate(cfg, log=lines.append)
    assert f"{empty}: no val metrics" in lines
    saved = json.loads((paths.regressor_eval / "metrics.json").read_text())
    assert saved["val"]["frames"] == 0 and "val split is empty" in saved["val"]["skipped"]
    assert saved["test"]["frames"] == 2 and 5.0 < saved["test"]["psnr"] < 60.0 and saved["spin"]["views"] == 4

    lines.clear()
    fit_gem(load_config(config, ["gem.table_components=[1]"]), log=lines.append)
    assert f"{empty}: no val PSNR" in lines
    renders = json.loads(paths.gem_report.read_text())["renders"]
    assert "val" not in renders and 5.0 < renders["test"]["gem_oracle"]["psnr"] < 60.0
    assert all(row["oracle_val_psnr"] is None and row["oracle_test_psnr"] > 5.0 for row in renders["table"])


def test_renders_without_ground_truth_take_the_camera_of_the_sequence_they_show(tiny_actor_factory, monkeypatch):
    """A union relocates each sequence's cameras; the orbit, the sweeps and a reenactment show the identity
    timestep (here in the second sequence), so they must see it through that sequence's camera, not the
    first sequence's."""
    from lib.eval import mapping as mapping_eval
    from lib.eval.mapping import reenact
    from lib.train.fit_mapping import fit_mapping

    config = tiny_actor_factory(synthetic={"union": True}, actor={"identity_timestep": 4},
                                train={"iterations": 1}, test={"splits": ["spin"]})
    cfg = load_config(config)
    export = VhapExport.from_config(cfg)
    mine, other = export.camera_at(4, cfg.test.camera), export.camera_at(0, cfg.test.camera)
    assert float((mine.viewmat - other.viewmat).abs().max()) > 1e-4  # the sequences' cameras differ

    trainer.train(cfg, log=lambda *a: None)
    seen = []
    real = evaluation.render_gaussians
    monkeypatch.setattr(evaluation, "render_gaussians", lambda g, i, viewmats, *a: seen.append(viewmats[0]) or real(g, i, viewmats, *a))
    evaluate(cfg, log=lambda *a: None)
    assert len(seen) == cfg.test.spin_views
    torch.testing.assert_close(seen[0].cpu(), mine.viewmat, rtol=0, atol=1e-6)  # view 0 of the orbit: yaw 0
    camera, _, _ = identity_view(cfg)
    assert torch.equal(camera.viewmat, export.camera_at(4, cfg.actor.identity_camera).viewmat)

    small = ["gem.positions=1", "gem.rotations=1", "gem.scales=1", "gem.opacities=1", "gem.evaluate=false"]
    fit_gem(load_config(config, small), log=lambda *a: None)
    cfg = load_config(config, small + ["train.stage=mapping", "mapping.width=8", "mapping.warmup_iterations=2",
                                       "mapping.iterations=1"])
    fit_mapping(cfg, log=lambda *a: None)
    seen.clear()
    render = mapping_eval.render_gem
    monkeypatch.setattr(mapping_eval, "render_gem", lambda gem, c, R, t, viewmat, *a: seen.append(viewmat[0]) or render(gem, c, R, t, viewmat, *a))
    reenact(cfg, cfg, log=lambda *a: None)  # the actor drives itself: the target is shown at its identity place
    assert seen and all(torch.equal(v.cpu(), mine.viewmat) for v in seen)


def test_loss_alpha_pulls_the_renders_alpha_towards_the_heads_and_is_skipped_at_zero(run_config, monkeypatch):
    seen = []
    real = trainer.alpha_l1

    def recording(alpha, target, weight):
        seen.append((alpha, target, weight))
        return real(alpha, target, weight)

    monkeypatch.setattr(trainer, "alpha_l1", recording)
    cfg = load_config(run_config[0], run_config[1] + ["train.iterations=3", "loss.alpha=0.5"])
    trainer.train(cfg, log=lambda *a: None)
    assert len(seen) == 3 and all(w == 0.5 for _, _, w in seen)
    for alpha, target, _ in seen:
        assert alpha.requires_grad and alpha.shape == (*target.shape, 1)  # the render's, into the loss
        assert 0 < float(target.mean()) < 1 and float(target.min()) >= 0  # fg · keep: head and background
    seen.clear()
    off = load_config(run_config[0], run_config[1] + ["train.iterations=2", "loss.alpha=0", "train.resume=false"])
    trainer.train(off, log=lambda *a: None)
    assert seen == []


def test_time_limit_ends_the_run_early_with_a_final_checkpoint_and_decayed_rate(run_config):
    # 0.6 s: enough steps that the last one's rate, set from the progress before it, is near the end's
    cfg = load_config(run_config[0], run_config[1] + ["train.iterations=100000", "train.time_limit_minutes=0.01"])
    trainer.train(cfg, log=lambda *a: None)
    final = load_checkpoint(latest_checkpoint(ActorPaths(cfg).regressor_checkpoints))
    assert 0 < final["step"] < 100000
    assert final["elapsed"] >= 0.6
    lrs = [g["lr"] / g["base_lr"] for g in final["optimizer"]["param_groups"]]
    assert all(f < 0.1 for f in lrs)  # near lr_final (0.05) at the end of the budget
