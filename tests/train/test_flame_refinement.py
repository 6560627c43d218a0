"""Per-timestep refinement of the tracked FLAME parameters (train.refine_flame, lib/models/flame_refinement.py)."""
import shutil

import torch

from lib.config import load_config
from lib.dataset.masks import MaskRegions
from lib.dataset.vhap import VhapExport
from lib.eval.render import render_gaussians
from lib.flame.model import FlameModel, load_regions
from lib.models.avatar import build_avatar, load_regressor, rigid_pose
from lib.models.flame_refinement import UNITS, FlameRefinement, load_refinement, refinement_from_state
from lib.paths import ActorPaths, resolve
from lib.train import trainer
from lib.train.data import ActorData, read_pixels, remasked, to_sample
from lib.train.fit_gem import fit_gem

QUIET = lambda *a, **k: None  # noqa: E731


def test_corrections_are_added_in_their_units_to_the_refined_timesteps_only():
    refinement = FlameRefinement([4, 7], n_expr=3)
    with torch.no_grad():
        refinement.translation[1] = torch.tensor([2.0, 0.0, -1.0])
        refinement.expr[1] = torch.tensor([1.0, 0.0, 0.0])
    params = {"rotation": torch.zeros(3, 3), "translation": torch.ones(3, 3), "neck_pose": torch.zeros(3, 3),
              "jaw_pose": torch.zeros(3, 3), "eyes_pose": torch.zeros(3, 6), "expr": torch.zeros(3, 5),
              "shape": torch.zeros(1, 4), "static_offset": None}
    out = refinement.corrected(params, [7, 5, 4])  # rows: timestep 7 (refined), 5 (not), 4 (refined, zero)
    assert torch.allclose(out["translation"][0], torch.tensor([1.0 + 2 * UNITS["translation"], 1.0, 1.0 - UNITS["translation"]]))
    assert torch.equal(out["translation"][1:], params["translation"][1:])
    assert torch.allclose(out["expr"][0], torch.tensor([UNITS["expr"], 0, 0, 0, 0]))  # the first n_expr columns
    assert out["shape"] is params["shape"] and out["static_offset"] is None
    assert refinement.penalty([5]) == 0 and refinement.penalty([7]) > 0


def test_a_rotation_correction_turns_the_head_about_its_pivot():
    """With a pivot, the translation follows a rotation correction so that the pivot stays where it was, and a
    translation correction then moves it by exactly that; without one the head turns about the root joint."""
    j0, pivot = torch.tensor([0.01, -0.02, 0.005]), torch.tensor([0.003, 0.09, 0.04])
    params = {"rotation": torch.tensor([[0.1, 0.3, -0.05]]), "translation": torch.tensor([[0.02, 0.01, 0.3]])}

    def world(p, point):  # a head-space point posed as FLAME poses it (rotation about the rest root j0)
        R, t = rigid_pose(p["rotation"], p["translation"], j0[None])
        return (R[0] @ point + t[0])

    for about, stays in ((pivot, j0 + pivot), (None, j0)):
        refinement = FlameRefinement([3], n_expr=2, keys=("rotation", "translation"), pivot=about)
        with torch.no_grad():
            refinement.rotation[0] = torch.tensor([4.0, -6.0, 3.0])  # 0.01 rad units
        turned = refinement.corrected(params, [3])
        assert not torch.allclose(turned["rotation"], params["rotation"])
        assert torch.allclose(world(turned, stays), world(params, stays), atol=1e-7)
        moved = (world(turned, j0 + pivot) - world(params, j0 + pivot)).norm()
        assert (moved < 1e-7) == (about is not None)  # about the root joint the head's centre swings
        with torch.no_grad():
            refinement.translation[0] = torch.tensor([2.0, 0.0, -1.0])  # mm
        shifted = refinement.corrected(params, [3])
        assert torch.allclose(world(shifted, stays) - world(turned, stays), torch.tensor([0.002, 0.0, -0.001]),
                              atol=1e-7)


def test_corrections_saved_without_a_pivot_turn_about_the_root_joint():
    saved = FlameRefinement([3, 4], n_expr=2).state_dict()
    del saved["pivot"]  # as checkpoints written before the pivot hold them
    loaded = FlameRefinement([3, 4], n_expr=2, pivot=torch.ones(3))
    loaded.load_state_dict(saved)
    assert torch.equal(loaded.pivot, torch.zeros(3))
    assert torch.equal(refinement_from_state(saved).pivot, torch.zeros(3))


def test_corrections_saved_before_the_neck_and_eyes_were_refined_load_as_zero():
    saved = FlameRefinement([3, 4], n_expr=2).state_dict()
    for key in ("neck_pose", "eyes_pose"):  # as checkpoints written before these two keys hold them
        del saved[key]
    loaded = refinement_from_state(saved)
    assert loaded.neck_pose.shape == (2, 3) and loaded.eyes_pose.shape == (2, 6)
    assert loaded.neck_pose.abs().sum() == 0 and loaded.eyes_pose.abs().sum() == 0


def test_neck_and_eye_corrections_re_pose_flame_where_they_act(run_config):
    """The neck and eyes keys (refined as GaussianAvatars refines them): an eye correction moves the eyeballs
    and nothing else, a neck correction bends the head-space mesh, and both get gradients through FLAME."""
    cfg = load_config(*run_config)
    flame = FlameModel.from_file(resolve(cfg.actor.flame_model))
    export = VhapExport.from_config(cfg)
    data = ActorData(export, flame, torch.device("cpu"), keep_meshes=False)
    t = export.split("train")[0].timestep_index
    before = data.driving(t)[0][0]
    regions = load_regions(resolve(cfg.actor.flame_masks), flame.v_template.shape[0])
    eyes = torch.zeros(len(before), dtype=torch.bool)
    eyes[torch.as_tensor(regions["left_eyeball"])] = eyes[torch.as_tensor(regions["right_eyeball"])] = True
    for key, value in (("eyes_pose", [0.0, 8.0, 0.0, 0.0, 8.0, 0.0]), ("neck_pose", [6.0, 0.0, 0.0])):
        refinement = FlameRefinement([t], data.params["expr"].shape[1], keys=(key,))
        assert not refinement.rigid
        with torch.no_grad():
            getattr(refinement, key)[0] = torch.tensor(value)  # 0.01 rad units
        verts, R, trans, _ = data.driving(t, refinement)
        moved = (verts[0] - before).norm(dim=-1) > 1e-6
        if key == "eyes_pose":
            assert moved[eyes].float().mean() > 0.5 and not moved[~eyes].any()
        else:
            assert moved.float().mean() > 0.5
        verts.sum().backward()
        assert getattr(refinement, key).grad.abs().sum() > 0


def test_the_refinement_pulls_a_mistracked_head_back_onto_its_images(run_config):
    """The images of a timestep, and its tracked translation off by 5 mm: optimising the corrections alone
    through the renderer moves the head back (the chain FLAME -> Gaussians -> image is differentiable)."""
    cfg = load_config(*run_config)
    torch.manual_seed(0)
    flame = FlameModel.from_file(resolve(cfg.actor.flame_model))
    export = VhapExport.from_config(cfg)
    data = ActorData(export, flame, torch.device("cpu"))
    avatar = build_avatar(cfg, ActorPaths(cfg), flame).requires_grad_(False)
    frames = [f for f in export.split("train") if f.timestep_index == export.split("train")[0].timestep_index][:3]
    t = frames[0].timestep_index
    bg = torch.tensor([0.2, 0.5, 0.8])

    def images(refinement):
        g = avatar(*data.driving(t, refinement))
        return [render_gaussians(g, 0, f.camera.viewmat[None], f.camera.K[None], f.camera.width, f.camera.height, bg)
                for f in frames]

    with torch.no_grad():
        targets = images(None)
    refinement = FlameRefinement([t], data.params["expr"].shape[1])
    with torch.no_grad():
        refinement.translation[0] = torch.tensor([5.0, -3.0, 0.0])  # mm
    opt = torch.optim.Adam(refinement.parameters(), lr=0.2)
    for _ in range(60):
        loss = sum((a - b).abs().mean() for a, b in zip(images(refinement), targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert refinement.translation[0, :2].norm() < 0.25 * 34 ** 0.5  # a quarter of the 5.8 mm left, at most


def test_training_stores_the_corrections_and_the_later_stages_pose_with_them(run_config):
    config, overrides = run_config
    cfg = load_config(config, overrides + ["train.refine_flame=true", "train.iterations=6", "gem.evaluate=false",
                                           "gem.positions=2", "gem.rotations=2", "gem.scales=2", "gem.opacities=2"])
    trainer.train(cfg, log=QUIET)
    refinement = load_refinement(ActorPaths(cfg))
    export = VhapExport.from_config(cfg)
    train_steps = sorted(t for t, _ in export.timesteps("train"))
    test_steps = sorted(t for t, _ in export.timesteps("test"))
    assert refinement.timesteps.tolist() == train_steps  # held-out timesteps are never refined
    assert refinement.rotation.abs().sum() > 0  # the sampled timesteps moved
    flame = FlameModel.from_file(resolve(cfg.actor.flame_model))
    _, info = load_regressor(cfg, ActorPaths(cfg), flame, torch.device("cpu"))
    plain = ActorData(export, flame, torch.device("cpu"), keep_meshes=False)
    pivot = plain.rotation_pivot()
    assert torch.allclose(refinement.pivot, pivot) and pivot.norm() > 0.01  # turned about the head's centre
    refined = ActorData(export, flame, torch.device("cpu"), keep_meshes=False, refinement=info["refinement"])
    moved = [not torch.equal(plain.driving(t)[0], refined.driving(t)[0]) for t in train_steps]
    assert any(moved)
    for t in test_steps:
        assert all(torch.equal(a, b) for a, b in zip(plain.driving(t)[:3], refined.driving(t)[:3]))
        assert refined.driving(t).tracked is None  # not refined: nothing to keep
    # resuming keeps the corrections; GEM is fitted on the refined poses
    before = refinement.state_dict()
    trainer.train(load_config(config, overrides + ["train.refine_flame=true", "train.iterations=6"]), log=QUIET)
    assert all(torch.equal(v, load_refinement(ActorPaths(cfg)).state_dict()[k])
               for k, v in before.items())
    fit_gem(cfg, log=QUIET)


def test_centring_removes_the_common_correction_and_keeps_the_frame_to_frame_part():
    refinement = FlameRefinement([1, 2, 3], n_expr=2, keys=("rotation", "translation"))
    with torch.no_grad():
        refinement.translation.copy_(torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [6.0, 3, 0]]))
    refinement.centre_()
    assert torch.allclose(refinement.translation, torch.tensor([[-2.0, -1, 0], [-1.0, -1, 0], [3.0, 2, 0]]))
    assert refinement.rotation.abs().sum() == 0 and refinement.expr.abs().sum() == 0


def test_centred_training_keeps_the_tracker_average_pose(run_config):
    """train.refine_centred: the stored corrections of every key have zero mean over the train timesteps,
    while the timesteps still differ (without it, the few sampled timesteps' corrections give a mean)."""
    config, overrides = run_config
    means = {}
    for centred in (False, True):
        cfg = load_config(config, overrides + ["train.refine_flame=true", "train.iterations=6",
                                               f"train.refine_centred={centred}", "train.resume=false"])
        trainer.train(cfg, log=QUIET)
        refinement = load_refinement(ActorPaths(cfg))
        means[centred] = max(refinement.rotation.mean(0).abs().max(), refinement.translation.mean(0).abs().max())
        assert refinement.rotation.std(0).max() > 0
    assert means[True] < 1e-6 < means[False]


def test_the_corrections_move_the_geometry_not_the_networks_input(run_config):
    """Refining, the gradient reaches the mesh through the Gaussians' geometry only: the generator's input
    (normal map and mesh-PCA code) carries none, so the corrections cannot become a per-frame code."""
    cfg = load_config(*run_config)
    flame = FlameModel.from_file(resolve(cfg.actor.flame_model))
    data = ActorData(VhapExport.from_config(cfg), flame, torch.device("cpu"))
    avatar = build_avatar(cfg, ActorPaths(cfg), flame)
    seen = []
    avatar.generator.register_forward_hook(lambda module, args, out: seen.append(args))
    verts, R, t, _ = data.driving(0)
    verts = verts.clone().requires_grad_(True)
    g = avatar(verts, R, t)
    assert seen and not any(a.requires_grad for a in seen[0])
    g.means.sum().backward()
    assert verts.grad is not None and verts.grad.abs().sum() > 0  # the geometry still carries it


def test_a_refinement_of_the_global_pose_turns_the_kept_mesh_as_posing_flame_would(run_config):
    """refine_keys [rotation, translation]: the kept head-space mesh with the corrected rigid pose equals FLAME
    posed with the corrected parameters, the corrections get gradients and the others stay zero and frozen."""
    cfg = load_config(*run_config)
    flame = FlameModel.from_file(resolve(cfg.actor.flame_model))
    export = VhapExport.from_config(cfg)
    kept = ActorData(export, flame, torch.device("cpu"))
    posed = ActorData(export, flame, torch.device("cpu"), keep_meshes=False)
    t = export.split("train")[0].timestep_index
    refinement = FlameRefinement([t], kept.params["expr"].shape[1], keys=("rotation", "translation"))
    assert refinement.rigid and [p.requires_grad for p in refinement.parameters()] == [True, True] + [False] * 4
    with torch.no_grad():
        refinement.rotation[0] = torch.tensor([3.0, -5.0, 2.0])
        refinement.translation[0] = torch.tensor([4.0, 1.0, -2.0])
    fast = kept.driving(t, refinement)
    slow = posed.driving(t, refinement)
    for a, b in zip(fast[:3], slow[:3]):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(fast.tracked, slow.tracked):  # the export's pose, about the same root joint
        assert torch.allclose(a, b, atol=1e-6)
    torch.testing.assert_close(fast.tracked[0], kept.driving(t).R, rtol=0, atol=1e-7)  # as tracked
    assert not torch.equal(fast[1], kept.driving(t)[1])  # the correction turned the head
    (fast[1].sum() + fast[2].sum()).backward()
    assert refinement.rotation.grad.abs().sum() > 0 and refinement.translation.grad.abs().sum() > 0
    assert refinement.expr.grad is None and refinement.penalty([t]) > 0
    assert set(refinement.corrected(posed.params, posed.timesteps)) == set(posed.params)


def test_masks_rendered_at_a_step_match_those_on_disk_and_follow_the_corrections(run_config):
    """train.refine_masks: without corrections the masks rendered from a timestep's mesh are exactly those
    render_masks.py wrote; a correction lifting the head lifts the neck cut with it, and the ground truth
    is composited on the new keep mask."""
    cfg = load_config(*run_config)
    flame = FlameModel.from_file(resolve(cfg.actor.flame_model))
    export = VhapExport.from_config(cfg)
    data = ActorData(export, flame, torch.device("cpu"))
    regions = MaskRegions.of_model(flame, load_regions(resolve(cfg.actor.flame_masks), flame.v_template.shape[0]))
    t = export.split("train")[0].timestep_index
    frames = [f for f in export.split("train") if f.timestep_index == t][:2]
    samples = [to_sample(f, torch.from_numpy(read_pixels(export, f)), torch.device("cpu")) for f in frames]
    bg = torch.tensor([[0.2, 0.5, 0.8], [1.0, 0.0, 0.0]])
    refinement = FlameRefinement([t], data.params["expr"].shape[1])
    same, gt = remasked(samples, bg, regions, *data.world_mesh(t, refinement))
    for a, b in zip(same, samples):
        assert torch.equal(a.keep, b.keep) and torch.equal(a.mouth, b.mouth) and a.keep.min() == 0
    assert torch.equal(gt, torch.cat([s.ground_truth(c) for s, c in zip(samples, bg)]))
    with torch.no_grad():
        refinement.translation[0] = torch.tensor([0.0, 20.0, 0.0])  # mm, up
    lifted, gt = remasked(samples, bg, regions, *data.world_mesh(t, refinement))
    for a, b, c, g in zip(lifted, samples, bg, gt):
        assert a.keep.sum() < b.keep.sum()  # fewer rows lie above the cut
        assert torch.equal(g[None], a.ground_truth(c)) and not torch.equal(g[None], b.ground_truth(c))


def test_a_step_with_refined_masks_takes_its_ground_truth_from_the_corrected_mesh(run_config, monkeypatch):
    """train.refine_masks: every step renders its masks from its timestep's corrected mesh, and the loss sees
    that ground truth; off, no step renders masks."""
    config, overrides = run_config
    calls, seen = [], []
    real_remasked, real_photometric = trainer.remasked, trainer.photometric

    def spy_remasked(samples, bg, regions, verts, joints):
        out = real_remasked(samples, bg, regions, verts, joints)
        calls.append((samples[0].frame.timestep_index, out[1]))
        return out

    def spy_photometric(render, gt, *args):
        seen.append(gt)
        return real_photometric(render, gt, *args)

    monkeypatch.setattr(trainer, "remasked", spy_remasked)
    monkeypatch.setattr(trainer, "photometric", spy_photometric)
    trainer.train(load_config(config, overrides + ["train.refine_flame=true", "train.refine_masks=true"]), log=QUIET)
    assert len(calls) == len(seen) == 6 and all(gt is s for (_, gt), s in zip(calls, seen))
    train_steps = {t for t, _ in VhapExport.from_config(load_config(config, overrides)).timesteps("train")}
    assert {t for t, _ in calls} <= train_steps
    calls.clear()
    off = load_config(config, overrides + ["train.refine_flame=true", "run.name=masks_off"])
    shutil.copytree(ActorPaths(load_config(config, overrides)).stage_dir("mesh_pca"), ActorPaths(off).stage_dir("mesh_pca"))
    trainer.train(off, log=QUIET)
    assert calls == [] and len(seen) == 12
