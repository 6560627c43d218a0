"""Stage 4 end to end on the tiny actor: warm-up and photometric training, resume, self-reenactment,
cross-identity reenactment by a second actor, the image-encoder signal, and DDP."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from lib.config import load_config
from lib.dataset.synthetic_actor import ActorSpec, HeadFiles, generate_actor
from lib.dataset.vhap import VhapExport
from lib.eval import mapping as mapping_eval
from lib.eval.evaluate import pick_frames
from lib.eval.mapping import evaluate_mapping, reenact
from lib.flame.model import FlameModel
from lib.models.flame_refinement import FlameRefinement, refinement_from_state
from lib.models.gem import GaussianEigenModel, render_gem
from lib.models.mapping import split_coefficients
from lib.paths import REPO_ROOT, ActorPaths, resolve
from lib.train import trainer
from lib.train.checkpoint import latest_checkpoint, load_checkpoint
from lib.train.data import ActorData
from lib.train.fit_gem import fit_gem
from lib.train.fit_mapping import driving_signals, fit_mapping, load_mapping
from lib.viewer.compressed import load_compressed, read_container
from lib.viewer.web_export import export_web

QUIET = lambda *a, **k: None  # noqa: E731
MAPPING = ["train.stage=mapping", "mapping.width=16", "mapping.warmup_iterations=30", "mapping.iterations=3",
           "gem.positions=2", "gem.rotations=2", "gem.scales=2", "gem.opacities=2", "gem.evaluate=false"]


@pytest.fixture(scope="module")
def stage3(tiny_actor_config, tmp_path_factory):
    """The tiny actor's regressor and GEM, trained once for this module. -> (config, experiments folder)"""
    cfg = load_config(tiny_actor_config)
    experiments = tmp_path_factory.mktemp("stage3") / "experiments"
    overrides = [f"actor.experiments_dir={os.path.relpath(experiments, REPO_ROOT)}"] + MAPPING
    shutil.copytree(ActorPaths(cfg).stage_dir("mesh_pca"), ActorPaths(load_config(tiny_actor_config, overrides)).stage_dir("mesh_pca"))
    cfg = load_config(tiny_actor_config, overrides + ["train.stage=regressor"])
    trainer.train(cfg, log=QUIET)
    fit_gem(cfg, log=QUIET)
    return tiny_actor_config, experiments


@pytest.fixture
def run(stage3, tmp_path):
    """A fresh stage-4 run on a copy of stages 1-3. -> (config path, overrides)"""
    config, experiments = stage3
    shutil.copytree(experiments, tmp_path / "experiments")
    return config, [f"actor.experiments_dir={os.path.relpath(tmp_path / 'experiments', REPO_ROOT)}"] + MAPPING


@pytest.fixture(scope="module")
def source_config(tiny_actor_config, tmp_path_factory):
    """A second tiny actor (another identity and motion) as the source of a cross-identity reenactment."""
    root = tmp_path_factory.mktemp("source")
    values = yaml.safe_load(open(tiny_actor_config))
    values["base"] = os.path.relpath(resolve(os.path.join(os.path.dirname(tiny_actor_config), values["base"])), root)
    values["actor"]["name"] = "tiny_source"
    values["actor"]["data_dir"] = os.path.relpath(root / "actor", REPO_ROOT)
    values["data"]["masks_dir"] = os.path.relpath(root / "masks", REPO_ROOT)  # not the target actor's
    values["synthetic"]["seed"] = 2
    path = root / "source.yml"
    path.write_text(yaml.safe_dump(values))
    cfg = load_config(path)
    generate_actor(resolve(cfg.actor.data_dir), HeadFiles.from_config(cfg), ActorSpec.from_config(cfg), log=QUIET)
    return path


def _image_loss(cfg, net=None) -> float:
    """Mean L1 of the network's GEM renders (the GEM's mean without a network) against every training
    image (white background)."""
    paths = ActorPaths(cfg)
    gem = GaussianEigenModel.load(paths.gem)
    flame = FlameModel.from_file(resolve(cfg.actor.flame_model))
    export = VhapExport.from_config(cfg)
    data = ActorData(export, flame, torch.device("cpu"))
    frames = export.split("train")
    steps = sorted({f.timestep_index for f in frames})
    R, t = data.gem_pose(steps)
    with torch.no_grad():
        if net is None:
            coeffs = gem.zero_coefficients(len(steps))
        else:
            coeffs = split_coefficients(gem, net.eval()(driving_signals(cfg, export, steps, data)))
        losses = []
        for f in frames:
            i, s = steps.index(f.timestep_index), data.sample(f)
            c = {a: v[i:i + 1] for a, v in coeffs.items()}
            rgb = render_gem(gem, c, R[i:i + 1], t[i:i + 1], s.viewmat[None], s.K[None], f.camera.width,
                             f.camera.height, torch.ones(3)).rgb
            losses.append((rgb - s.ground_truth(torch.ones(3))).abs().mean())
    return float(torch.stack(losses).mean())


def test_photometric_steps_lower_the_image_loss_and_a_rerun_resumes(run):
    config, overrides = run
    overrides = overrides + ["mapping.warmup_iterations=200", "mapping.lr=1e-2", "mapping.regression=0",
                             "train.random_background=false", "train.lr_schedule=constant"]
    cfg = load_config(config, overrides + ["mapping.iterations=0"])
    # Wrong targets: the warm-up teaches the network to push the Gaussians 2.5 sigma along the position
    # basis (about 2 cm each: sigma spreads over the N Gaussians of a unit basis row); only the
    # photometric loss, against the images, can tell it to stop.
    gem = GaussianEigenModel.load(ActorPaths(cfg).gem)
    block = gem.blocks["positions"][0]
    block.eigenvalues = torch.full_like(block.eigenvalues, 0.01 ** 2 * gem.n_gaussians)
    gem.coefficients["positions"] = torch.full_like(gem.coefficients["positions"], 2.5)
    gem.save(ActorPaths(cfg).gem)
    before = _image_loss(cfg, fit_mapping(cfg, log=QUIET))
    mean = _image_loss(cfg)  # where the images pull the coefficients (the frames barely differ)
    cfg = load_config(config, overrides + ["mapping.iterations=150"])
    lines = []
    after = _image_loss(cfg, fit_mapping(cfg, log=lines.append))
    assert any(line.startswith("resumed from") and "(step 200)" in line for line in lines)
    assert after - mean < 0.5 * (before - mean), (before, after, mean)
    folder = ActorPaths(cfg).mapping_checkpoints
    assert load_checkpoint(latest_checkpoint(folder))["step"] == 350
    assert any((ActorPaths(cfg).mapping_tensorboard).iterdir())


def test_self_and_cross_identity_reenactment_write_their_results(run, source_config, render_log, tmp_path):
    config, overrides = run
    cfg = load_config(config, overrides)
    fit_mapping(cfg, log=QUIET)
    assert load_checkpoint(latest_checkpoint(ActorPaths(cfg).mapping_checkpoints))["step"] == 33

    render_log.watch(mapping_eval, "render_gem")
    results = evaluate_mapping(cfg, log=QUIET)
    # each frame goes to the video as soon as it is rendered (predicted and oracle coefficients: 2 renders)
    assert render_log.renders_in_a_row() == 2 and render_log.frames("test.mp4") == 2
    saved = json.loads((ActorPaths(cfg).mapping_eval / "metrics.json").read_text())
    assert saved["frames"] == results["frames"] == 2
    for name in ("predicted", "oracle_coefficients"):
        assert 5.0 < saved[name]["psnr"] < 60.0 and 5.0 < saved[name]["psnr_masked"] < 60.0
    assert (ActorPaths(cfg).mapping_eval / "test.mp4").stat().st_size > 0
    # GEM is posed with the held-out sequence's refitted tracking (test.refit_tracking), as the regressor's
    # evaluation scores it
    assert saved["tracking"]["refit"] and (ActorPaths(cfg).regressor / "tracking_refit" / "test.pt").is_file()
    as_tracked = evaluate_mapping(load_config(config, overrides + ["test.refit_tracking=[]"]), log=QUIET)
    assert as_tracked["tracking"] == {"refit": False}
    assert as_tracked["predicted"]["psnr"] != results["predicted"]["psnr"]

    source = load_config(source_config)
    render_log.events.clear()
    summary = reenact(cfg, source, log=QUIET)
    assert render_log.renders_in_a_row() == 1  # the three videos are written as the frames come
    assert [render_log.frames(v) for v in ("source.mp4", "target.mp4", "side_by_side.mp4")] == [2, 2, 2]
    out = ActorPaths(cfg).reenactment("tiny_source")
    assert json.loads((out / "reenactment.json").read_text()) == summary
    assert summary["source"] == "tiny_source" and summary["frames"] == 2
    for video in ("source.mp4", "target.mp4", "side_by_side.mp4"):
        assert (out / video).stat().st_size > 0
    assert len(list((out / "frames").glob("*.png"))) == 2
    # the source's identity frame drives the target to its own neutral signal: zero
    src_export = VhapExport.from_config(source)
    zero = driving_signals(cfg, src_export, [source.actor.identity_timestep], source_cfg=source)
    assert torch.equal(zero, torch.zeros_like(zero))

    # the web export carries both reenactments as coefficient tracks, with their GEM poses
    sizes = export_web(cfg, tmp_path / "web", log=QUIET)
    meta, arrays = read_container(tmp_path / "web")
    assert [t["name"] for t in meta["tracks"]] == ["fitted", "self_reenactment", "reenact_tiny_source"]
    assert [t["frames"] for t in meta["tracks"][1:]] == [2, 2] and sizes["total"] > sizes["gem"]
    track = torch.load(out / "track.pt", weights_only=True)
    model = load_compressed(tmp_path / "web")
    kept = {a: model.n_components(a) for a in track["coefficients"]}  # leading components of one block each
    expected = torch.cat([c[:, :kept[a]] for a, c in track["coefficients"].items()], 1)
    assert torch.allclose(torch.from_numpy(arrays["track.2.coefficients"].copy()), expected)
    assert torch.allclose(torch.from_numpy(arrays["track.2.R"].copy()), track["R"])
    # the self-reenactment track is posed with the refitted tracking the evaluations kept, not as tracked
    test_export = VhapExport.from_config(cfg)
    steps = sorted({f.timestep_index for f in pick_frames(test_export.camera_frames("test", cfg.test.camera),
                                                           cfg.test.max_frames)})
    data = ActorData(test_export, FlameModel.from_config(cfg), torch.device("cpu"), keep_meshes=False)
    as_tracked_R = data.gem_pose(steps)[0]
    kept = torch.load(ActorPaths(cfg).regressor / "tracking_refit" / "test.pt", weights_only=True)
    data.refine(refinement_from_state(kept["refinement"]))
    track_R = torch.from_numpy(arrays["track.1.R"].copy())
    assert torch.allclose(track_R, data.gem_pose(steps)[0], atol=1e-6)
    assert not torch.allclose(track_R, as_tracked_R, atol=1e-6)
    # a config the checkpoint does not fit (run.sh trains the mapping with configs/mapping.yml, one exports
    # with default.yml): the export still works, without the network's track, and says why
    messages = []
    export_web(load_config(config, overrides + ["mapping.architecture=attention"]), tmp_path / "web2", log=messages.append)
    assert [t["name"] for t in read_container(tmp_path / "web2")[0]["tracks"]] == ["fitted", "reenact_tiny_source"]
    assert any("no self-reenactment track" in m for m in messages)


class _TinyEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=2)
        self.fc = torch.nn.Linear(8 * 4 * 4, 12)

    def forward(self, x):
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1))


def test_the_image_encoder_signal_trains_evaluates_and_drives_another_actor(run, source_config, tmp_path):
    torch.manual_seed(0)
    encoder = tmp_path / "encoder.pt"
    torch.jit.script(_TinyEncoder()).save(str(encoder))
    config, overrides = run
    cfg = load_config(config, overrides + ["mapping.signal=encoder", f"mapping.encoder={os.path.relpath(encoder, REPO_ROOT)}",
                                           "mapping.encoder_crop=32", "mapping.encoder_components=3"])
    net = fit_mapping(cfg, log=QUIET)
    assert net.signal_scale.shape == (2,)  # 3 train timesteps: the PCA keeps T - 1 = 2 components
    assert ActorPaths(cfg).encoder_pca.is_file()
    assert 5.0 < evaluate_mapping(cfg, log=QUIET)["predicted"]["psnr"] < 60.0
    assert reenact(cfg, load_config(source_config), log=QUIET)["signal"] == "encoder"
    with pytest.raises(Exception, match="architecture"):
        load_mapping(load_config(config, overrides + ["mapping.signal=encoder", "mapping.architecture=attention"]),
                     GaussianEigenModel.load(ActorPaths(cfg).gem), "cpu")


def test_two_process_gloo_mapping_run_keeps_identical_weights(run, tmp_path):
    config, overrides = run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "tests/train/ddp_worker.py", str(config), str(tmp_path), *overrides, "mapping.architecture=attention"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a.keys() == b.keys() and any(k.startswith("context") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_warm_up_fine_tunes_the_basis_keeps_it_orthonormal_and_evaluation_renders_with_it(run):
    config, overrides = run
    cfg = load_config(config, overrides + ["mapping.basis_lr=1e-3", "mapping.warmup_iterations=25"])
    fit_mapping(cfg, log=QUIET)
    paths = ActorPaths(cfg)
    state = load_checkpoint(latest_checkpoint(paths.mapping_checkpoints))
    tuned, built = GaussianEigenModel.from_state(state["gem"]), GaussianEigenModel.load(paths.gem)
    assert "basis_optimizer" in state
    for attr in ("positions", "rotations", "scales", "opacities"):
        a, b = tuned.blocks[attr][0], built.blocks[attr][0]
        assert (a.basis - b.basis).abs().max() > 1e-4 and (a.mean - b.mean).abs().max() > 1e-4, attr
        eye = torch.eye(a.basis.shape[0])
        assert torch.allclose(a.basis @ a.basis.T, eye, atol=1e-4), attr  # re-orthonormalised
        assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert evaluate_mapping(cfg, log=QUIET)["basis_fine_tuned"] is True
    lines = []
    fit_mapping(load_config(config, overrides + ["mapping.basis_lr=1e-3", "mapping.warmup_iterations=25",
                                                 "mapping.iterations=5"]), log=lines.append)
    assert any("(step 28)" in line for line in lines)
    resumed = load_checkpoint(latest_checkpoint(paths.mapping_checkpoints))
    # after the warm-up the basis is frozen: the photometric steps train the network only
    assert torch.equal(resumed["gem"]["blocks"]["positions"][0]["basis"], state["gem"]["blocks"]["positions"][0]["basis"])


def test_the_flame_signal_is_the_tracking_the_avatar_is_posed_with(tiny_actor_config):
    """Given the actor's data, the flame signal reads its tracking: the export's files as tracked, and with the
    corrections of a refit (or of training's refinement) of jaw and expression once they are added."""
    cfg = load_config(tiny_actor_config)
    export = VhapExport.from_config(cfg)
    data = ActorData(export, FlameModel.from_config(cfg), torch.device("cpu"), keep_meshes=False)
    steps = [t for t, _ in export.timesteps("test")][:2]
    as_tracked = driving_signals(cfg, export, steps)
    assert torch.equal(driving_signals(cfg, export, steps, data), as_tracked)
    n_expr = data.params["expr"].shape[1]
    refit = FlameRefinement(steps, n_expr, ["jaw_pose", "expr"])
    with torch.no_grad():
        refit.expr.fill_(1.0)  # 0.1 of a coefficient each (UNITS)
        refit.jaw_pose.fill_(2.0)  # 0.02 rad
    data.refine(refit)
    moved = driving_signals(cfg, export, steps, data) - as_tracked  # the identity timestep is not refitted
    assert torch.allclose(moved[:, :n_expr], torch.full((2, n_expr), 0.1), atol=1e-6)
    assert torch.allclose(moved[:, n_expr:n_expr + 3], torch.full((2, 3), 0.02), atol=1e-6)
    assert torch.equal(moved[:, n_expr + 3:], torch.zeros(2, 6))  # the eyes are not refitted
