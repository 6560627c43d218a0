import hashlib
import json
import os
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from lib.config import load_config
from lib.dataset import synthetic_actor
from lib.dataset.synthetic_actor import (
    FRONTAL_CAMERA, ActorRenderer, ActorSpec, HeadFiles, crown_and_chin, generate_actor, image_size, make_rig,
    plan_actor,
)
from lib.dataset.vhap import VhapExport
from lib.flame.synthetic import EXPRESSION_NAMES, ensure_head_model
from lib.geometry.rasterize import rasterize_camera
from lib.geometry.uv import vertex_normals
from lib.paths import REPO_ROOT

SPEC = ActorSpec(seed=1, scale=0.1, n_cameras=16, sequences=("EXP-1", "EMO-1"), frames_per_sequence=3,
                 tracking_noise=0.0)
FRAME_KEYS = {"file_path", "fg_mask_path", "flame_param_path", "timestep_index", "camera_index", "transform_matrix",
              "fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x"}
TOP_KEYS = {"frames", "cx", "cy", "fl_x", "fl_y", "h", "w", "camera_angle_x", "timestep_indices", "camera_indices"}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    paths = ensure_head_model(tmp_path_factory.mktemp("head"), seed=0)
    files = HeadFiles(paths["flame_model"], paths["uv_obj"], paths["masks"])
    return files, *files.load()


@pytest.fixture(scope="module")
def actor(head, tmp_path_factory):
    folder = tmp_path_factory.mktemp("actors") / "actor_a"
    generate_actor(folder, head[0], SPEC, log=lambda *_: None)
    return folder


def _silhouettes(model, params, cameras, upsample=2):
    """Tracked-mesh coverage [C, H', W'] rendered at `upsample` x the image size."""
    with torch.no_grad():
        verts, _ = model(**params)
    scale = torch.tensor([[upsample], [upsample], [1.0]])
    viewmats = torch.stack([c.viewmat for c in cameras])
    Ks = torch.stack([c.K * scale for c in cameras])
    H, W = cameras[0].height * upsample, cameras[0].width * upsample
    return rasterize_camera(verts, model.faces, viewmats, Ks, H, W).pix_to_face >= 0


def test_reader_cameras_and_params_reproduce_the_generators_silhouettes(head, actor):
    _, model, _, _, masks = head
    plan = plan_actor(SPEC, model, masks)
    export = VhapExport(actor)
    for t in (0, plan.n_timesteps - 1):
        split = "test" if t in plan.split_timesteps("test") else "train"
        frames = sorted([f for f in export.split(split) + export.split("val") if f.timestep_index == t],
                        key=lambda f: f.camera_index)
        mine = [plan.cameras[f.camera_index] for f in frames]
        assert [f.camera_index for f in frames] == list(range(SPEC.n_cameras))
        theirs = _silhouettes(model, export.load_flame(frames[0]), [f.camera for f in frames])
        ours = _silhouettes(model, plan.timestep_params(t), mine)
        iou = (theirs & ours).sum((1, 2)).float() / (theirs | ours).sum((1, 2)).float()
        assert iou.min() >= 0.97, f"timestep {t}: IoU per camera {iou.tolist()}"
        verts, _ = model(**plan.timestep_params(t))
        for f, cam in zip(frames, mine):
            np.testing.assert_allclose(f.camera.project(verts[0])[0], cam.project(verts[0])[0], atol=0.01)


@pytest.mark.parametrize("seed", [1, 2])
def test_frontal_camera_frames_crown_to_chin_at_55_to_70_percent_of_the_height(head, seed):
    _, model, _, _, masks = head
    plan = plan_actor(replace(SPEC, seed=seed, scale=1.0), model, masks)
    with torch.no_grad():
        verts, _ = model(**plan.timestep_params(0))
    crown, chin = crown_and_chin(verts[0], masks)
    camera = plan.cameras[FRONTAL_CAMERA]
    uv, _ = camera.project(verts[0, [crown, chin]])
    assert (camera.height, camera.width) == (802, 550)
    assert 0.55 <= float(uv[1, 1] - uv[0, 1]) / camera.height <= 0.70
    assert abs(float(camera.centre[0])) < 1e-6  # frontal: straight in front of the head


def test_rig_has_distinct_focal_lengths_and_off_centre_principal_points(head):
    _, model, _, _, masks = head
    cameras = plan_actor(replace(SPEC, scale=1.0), model, masks).cameras
    focals = torch.stack([c.K[0, 0] for c in cameras])
    offsets = torch.stack([c.K[:2, 2] - torch.tensor([c.width / 2, c.height / 2]) for c in cameras])
    assert 0.01 < float(focals.std() / focals.mean()) < 0.05
    assert float(offsets.abs().max()) > 10.0 and float(offsets.abs().max()) < 60.0
    centres = torch.stack([c.centre for c in cameras])
    yaw = torch.rad2deg(torch.atan2(centres[:, 0], centres[:, 2]))
    assert float(yaw.min()) < -45 and float(yaw.max()) > 45 and abs(float(yaw[FRONTAL_CAMERA])) < 1e-3


@pytest.mark.parametrize("n_cameras", [9, 10, 12, 16, 21])
def test_rig_sees_both_sides_of_the_frontal_camera(head, n_cameras):
    _, model, _, _, masks = head
    centres = torch.stack([c.centre for c in make_rig(model.v_template, masks, n_cameras, 0.1)])
    yaw = torch.rad2deg(torch.atan2(centres[:, 0], centres[:, 2]))
    assert abs(float(yaw[FRONTAL_CAMERA])) < 1e-3
    left, right = int((yaw < -1).sum()), int((yaw > 1).sum())
    assert left + right == n_cameras - 1 and left - right in (0, 1)
    for side in (yaw[yaw < -1].sort().values, yaw[yaw > 1].sort().values):
        gaps = side.diff() if len(side) > 1 else side
        assert float(gaps.max() - gaps.min()) < 8.0  # evenly spaced but for each camera's +-2 degree jitter
    assert float(yaw.min()) < -50 and float(yaw.max()) > 50
    for side in (yaw < -1, yaw > 1):  # heights alternate along each half of the arc
        heights = torch.sign(centres[side, 1] - centres[FRONTAL_CAMERA, 1])[yaw[side].argsort()]
        assert bool((heights[1:] != heights[:-1]).all())
    if n_cameras == 16:  # NeRSemble's order: left to right
        assert bool((yaw.diff() > 0).all())


def test_splits_json_and_params_follow_vhap(actor, head):
    n_cams, n_t = SPEC.n_cameras, SPEC.frames_per_sequence
    dbs = {s: json.loads((actor / f"transforms_{s}.json").read_text()) for s in ("train", "val", "test")}
    for db in dbs.values():
        assert TOP_KEYS <= set(db)
        for frame in db["frames"]:
            assert FRAME_KEYS <= set(frame)
            assert (frame["w"], frame["h"]) == image_size(SPEC.scale)[::-1]
            assert frame["file_path"] == f"images/{frame['timestep_index']:05d}_{frame['camera_index']:02d}.png"
            assert (actor / frame["file_path"]).is_file() and (actor / frame["fg_mask_path"]).is_file()
        assert db["timestep_indices"] == sorted({f["timestep_index"] for f in db["frames"]})
    assert dbs["train"]["timestep_indices"] == dbs["val"]["timestep_indices"] == list(range(n_t))
    assert dbs["test"]["timestep_indices"] == list(range(n_t, 2 * n_t))
    assert dbs["train"]["camera_indices"] == [c for c in range(n_cams) if c != FRONTAL_CAMERA]
    assert dbs["val"]["camera_indices"] == [FRONTAL_CAMERA] and dbs["test"]["camera_indices"] == list(range(n_cams))
    assert len(dbs["train"]["frames"]) == n_t * (n_cams - 1) and len(dbs["test"]["frames"]) == n_t * n_cams

    n_verts = head[1].v_template.shape[0]
    shapes = {"shape": (300,), "expr": (1, 100), "rotation": (1, 3), "neck_pose": (1, 3), "jaw_pose": (1, 3),
              "eyes_pose": (1, 6), "translation": (1, 3), "static_offset": (1, n_verts, 3)}
    for path in [actor / "canonical_flame_param.npz", actor / "flame_param" / "00004.npz"]:
        with np.load(path) as npz:
            assert {k: npz[k].shape for k in npz.files} == shapes
            assert all(npz[k].dtype == np.float32 for k in npz.files)
    with np.load(actor / "canonical_flame_param.npz") as cano, np.load(actor / "flame_param" / "00000.npz") as first:
        np.testing.assert_allclose(cano["jaw_pose"], [[0.3, 0.0, 0.0]], atol=1e-7)
        assert not cano["expr"].any() and not cano["eyes_pose"].any() and not cano["rotation"].any()
        np.testing.assert_array_equal(cano["shape"], first["shape"])
    assert (actor / "sequences_test.txt").read_text().split() == ["EMO-1"]


def test_union_export_of_the_actor_reads_identically(actor):
    union = actor.parent / "UNION_actor_a"
    union.mkdir()
    for split in ("train", "val", "test"):
        db = json.loads((actor / f"transforms_{split}.json").read_text())
        for frame in db["frames"]:
            for key in ("file_path", "fg_mask_path", "flame_param_path"):
                frame[key] = f"../{actor.name}/{frame[key]}"
        (union / f"transforms_{split}.json").write_text(json.dumps(db))
    direct, combined = VhapExport(actor), VhapExport(union)
    for split in ("train", "val", "test"):
        for a, b in zip(direct.split(split), combined.split(split), strict=True):
            assert (a.image_path, a.mask_path, a.flame_param_path) == (b.image_path, b.mask_path, b.flame_param_path)
            assert torch.equal(a.camera.viewmat, b.camera.viewmat) and torch.equal(a.camera.K, b.camera.K)


def test_images_are_antialiased_composites_on_white(actor):
    H, W = image_size(SPEC.scale)
    export = VhapExport(actor)
    frame = export.split("val")[0]
    rgb, mask = export.load_image(frame), export.load_mask(frame)
    assert rgb.shape == (H, W, 3) and mask.shape == (H, W)
    assert torch.allclose(rgb[mask == 0], torch.ones(3))
    assert ((mask > 0.05) & (mask < 0.95)).any()  # soft edges from the supersampling
    assert float(mask.mean()) > 0.3  # head, hair and torso fill much of the frame
    assert mask[-1].mean() > 0.5  # the torso reaches the bottom edge
    sheet = cv2.imread(str(actor / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[0] >= 4 * H


def test_ground_truth_is_more_than_the_tracked_mesh(head, actor):
    _, model, _, _, masks = head
    plan = plan_actor(SPEC, model, masks)
    cam = plan.cameras[FRONTAL_CAMERA]
    tracked = _silhouettes(model, plan.timestep_params(0), [cam], upsample=1)[0]
    fg = VhapExport(actor).load_mask(VhapExport(actor).split("val")[0]) > 0.5
    H = cam.height
    above = torch.zeros_like(fg)
    above[: H // 3] = True
    assert (fg & ~tracked & above).sum() > 10  # hair volume stands out of the tracked scalp
    assert (fg & ~tracked)[-H // 8:].float().mean() > 0.5  # torso below


def test_generation_is_deterministic_per_seed_and_seeds_differ(head, actor):
    _, model, uvs, faces_uv, masks = head

    def frontal_image(spec, t):
        plan = plan_actor(spec, model, masks)
        rgb, _ = ActorRenderer(plan, model, uvs, faces_uv, masks).render(t, [plan.cameras[FRONTAL_CAMERA]])
        return (rgb[0].clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()

    written = cv2.cvtColor(cv2.imread(str(actor / "images/00004_08.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(frontal_image(SPEC, 4), written)
    other = frontal_image(replace(SPEC, seed=2), 4).astype(float)
    assert np.abs(other - written).mean() > 5.0
    assert not torch.equal(plan_actor(replace(SPEC, seed=2), model, masks).params["shape"],
                           plan_actor(SPEC, model, masks).params["shape"])


def test_rerun_keeps_the_dataset_and_an_interrupted_run_leaves_nothing(head, actor, tmp_path, monkeypatch):
    stamp = os.stat(actor / "transforms_test.json").st_mtime_ns
    generate_actor(actor, head[0], SPEC, log=lambda *_: None)
    assert os.stat(actor / "transforms_test.json").st_mtime_ns == stamp

    def crash(self, t, cameras):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic_actor.ActorRenderer, "render", crash)
    with pytest.raises(KeyboardInterrupt):
        generate_actor(tmp_path / "broken", head[0], SPEC, log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


def test_tracking_noise_perturbs_only_the_written_parameters(head):
    _, model, _, _, masks = head
    plan = plan_actor(replace(SPEC, tracking_noise=0.05), model, masks)
    clean = plan_actor(SPEC, model, masks)
    for key in ("expr", "jaw_pose", "rotation"):
        assert torch.equal(plan.params[key], clean.params[key])
        assert not torch.equal(plan.written[key], plan.params[key])
    assert torch.equal(plan.written["shape"], plan.params["shape"])


def test_motion_exercises_every_named_expression_alone_in_training(head):
    _, model, _, _, masks = head
    spec = replace(SPEC, sequences=("EXP-1", "EXP-2", "EXP-3", "EMO-1"), frames_per_sequence=24)
    plan = plan_actor(spec, model, masks)
    expr = plan.params["expr"][plan.split_timesteps("train")]
    named = expr[:, :len(EXPRESSION_NAMES)]
    for i in range(len(EXPRESSION_NAMES)):
        alone = (named[:, i] > 1.0) & ((named.abs().sum(1) - named[:, i].abs()) < 0.2)
        assert alone.any(), EXPRESSION_NAMES[i]
    jaw = plan.params["jaw_pose"][:, 0]
    assert float(jaw.max()) > 0.25 and float(plan.params["expr"][0].abs().max()) == 0.0
    steps = (plan.params["expr"][1:] - plan.params["expr"][:-1]).abs().amax(1)
    boundaries = np.flatnonzero(np.diff(plan.sequence))
    steps[boundaries] = 0  # sequences may start apart
    assert float(steps.max()) < 1.0  # smooth within a sequence


def test_spec_errors_name_the_key():
    with pytest.raises(ValueError, match="synthetic.sequences"):
        replace(SPEC, sequences=("ONLY",)).check()
    with pytest.raises(ValueError, match="synthetic.n_cameras"):
        replace(SPEC, n_cameras=4).check()
    replace(SPEC, n_cameras=1).check()  # a monocular export
    with pytest.raises(ValueError, match="synthetic.union each name is a folder name"):
        replace(SPEC, union=True, sequences=("A", "../B")).check()
    with pytest.raises(ValueError, match="synthetic.hair_fringe"):
        replace(SPEC, hair_fringe=1.5).check()


@pytest.fixture(scope="module")
def union_actor(head, tmp_path_factory):
    """VHAP's union layout, with per-timestep dynamic offsets and teeth-padded offsets."""
    spec = replace(SPEC, n_cameras=10, union=True, dynamic_offset=0.004, teeth_rows=120)
    folder = tmp_path_factory.mktemp("unions") / "actor_u"
    generate_actor(folder, head[0], spec, log=lambda *_: None)
    return folder, spec


def test_union_export_relocates_each_sequence_and_is_posed_exactly(head, union_actor):
    from lib.train.data import ActorData

    folder, spec = union_actor
    _, model, _, _, masks = head
    plan = plan_actor(spec, model, masks)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["actor_u", "actor_u_EMO-1", "actor_u_EXP-1"]
    assert not (folder / "images").exists()
    for seq, first in (("EXP-1", 0), ("EMO-1", spec.frames_per_sequence)):  # each sequence a VHAP export of its own
        own = json.loads((folder.parent / f"actor_u_{seq}" / "transforms.json").read_text())
        assert own["timestep_indices"] == list(range(spec.frames_per_sequence))
    test = json.loads((folder / "transforms_test.json").read_text())["frames"]
    assert test[0]["file_path"] == "../actor_u_EMO-1/images/00000_00.png" and test[0]["timestep_index"] == 3

    n_verts = model.v_template.shape[0]
    with np.load(folder.parent / "actor_u_EXP-1" / "flame_param" / "00001.npz") as npz:
        assert npz["static_offset"].shape == npz["dynamic_offset"].shape == (1, n_verts + 120, 3)
    with np.load(folder / "canonical_flame_param.npz") as npz:
        assert "dynamic_offset" not in npz.files and npz["static_offset"].shape == (1, n_verts + 120, 3)

    export = VhapExport(folder)
    data = ActorData(export, model, torch.device("cpu"))
    dynamic = []
    for t in range(plan.n_timesteps):
        k = plan.sequence[t]
        mean = plan.params["translation"][plan.sequence == k].double().mean(0).float()
        truth = model(**plan.timestep_params(t))[0][0]  # the generator's mesh, in its own world
        without = model(**{a: v for a, v in plan.timestep_params(t).items() if a != "dynamic_offset"})[0][0]
        dynamic.append(float((truth - without).norm(dim=-1).max()))
        head_verts, R, tr, _ = data.driving(t)
        posed = (head_verts @ R.transpose(-1, -2) + tr[:, None])[0]
        torch.testing.assert_close(posed, truth - mean, rtol=0, atol=2e-5)  # relocated by the sequence's mean
        for c in (0, FRONTAL_CAMERA):
            seen = export.camera_at(t, c).project(posed)[0]
            torch.testing.assert_close(seen, plan.cameras[c].project(truth)[0], rtol=0, atol=2e-3)
    assert max(dynamic) > 1e-3 and min(dynamic) > 1e-4, dynamic  # the dynamic offsets matter: millimetres
    last = plan.n_timesteps - 1
    moved = export.camera_at(last, FRONTAL_CAMERA).viewmat[:3, 3] - export.camera_at(0, FRONTAL_CAMERA).viewmat[:3, 3]
    assert float(moved.norm()) > 1e-3  # each sequence has its own camera poses


def test_a_one_camera_export_is_the_frontal_camera_with_an_empty_val_split(head, tmp_path):
    _, model, _, _, masks = head
    spec = replace(SPEC, n_cameras=1)
    generate_actor(tmp_path / "mono", head[0], spec, log=lambda *_: None)
    dbs = {s: json.loads((tmp_path / "mono" / f"transforms_{s}.json").read_text()) for s in ("train", "val", "test")}
    assert dbs["val"]["frames"] == [] and dbs["train"]["camera_indices"] == dbs["test"]["camera_indices"] == [0]
    export = VhapExport(tmp_path / "mono")
    assert export.split("val") == [] and len(export.split("train")) == len(export.split("test")) == 3
    frontal = plan_actor(SPEC, model, masks).cameras[FRONTAL_CAMERA]
    camera = export.split("train")[0].camera
    torch.testing.assert_close(camera.viewmat, frontal.viewmat, rtol=0, atol=1e-5)
    torch.testing.assert_close(camera.K, frontal.K, rtol=0, atol=1e-4)


def test_a_flame_like_head_gets_the_same_images_and_parameters_for_its_own_vertices(head, actor, tmp_path):
    """synthetic.head_mouth: open: the tracked model has no mouth cavity, the images still show it (they are
    rendered from the head as built), and the static offset is written for the tracked model's vertices."""
    from lib.flame.synthetic import generate_head_model

    paths = generate_head_model(tmp_path / "head_open", seed=0, mouth="open")
    files = HeadFiles(paths["flame_model"], paths["uv_obj"], paths["masks"])
    folder = generate_actor(tmp_path / "actor_open", files, SPEC, log=lambda *_: None)
    kept = np.load(tmp_path / "head_open" / "ground_truth" / "kept_vertices.npy")
    n_open = files.load()[0].v_template.shape[0]
    assert n_open == len(kept) < head[1].v_template.shape[0]
    for name in ("images/00000_08.png", "images/00004_03.png"):
        assert np.array_equal(cv2.imread(str(folder / name)), cv2.imread(str(actor / name))), name
    for name in ("flame_param/00002.npz", "canonical_flame_param.npz"):
        with np.load(folder / name) as mine, np.load(actor / name) as full:
            assert mine["static_offset"].shape == (1, n_open, 3)
            np.testing.assert_array_equal(mine["static_offset"], full["static_offset"][:, kept])
            for key in full.files:
                if key != "static_offset":
                    np.testing.assert_array_equal(mine[key], full[key])


# sha256 of every image and fg mask (decoded pixels, in file order) of the SPEC actor, as the generator wrote
# them before synthetic.hair_fringe existed (commit 5555485). A change of torch, numpy or OpenCV may move a
# pixel by one level: then regenerate with that commit on the new install and take its hash.
SPEC_PIXELS_SHA256 = "ea667009b1d884fe32f65e6699fed82028f0aa96bef42bb1aa2ba4c18c5225a4"


def _pixels_sha256(folder) -> str:
    h = hashlib.sha256()
    for sub in ("images", "fg_masks"):
        for path in sorted((folder / sub).glob("*.png")):
            h.update(cv2.imread(str(path), cv2.IMREAD_UNCHANGED).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def soft_actor(head, tmp_path_factory):
    """The SPEC actor with flyaway hair."""
    spec = replace(SPEC, hair_fringe=0.6)
    folder = tmp_path_factory.mktemp("soft") / "actor_soft"
    generate_actor(folder, head[0], spec, log=lambda *_: None)
    return folder, spec


def _fractional(mask):
    return (mask > 0.05) & (mask < 0.95)


def test_without_hair_fringe_the_images_and_masks_are_as_before(actor):
    assert ActorSpec.from_config(load_config(REPO_ROOT / "configs" / "default.yml")).hair_fringe == 0.0
    assert _pixels_sha256(actor) == SPEC_PIXELS_SHA256


def test_hair_fringe_gives_soft_alpha_in_a_band_around_the_hair(head, actor, soft_actor):
    _, model, uvs, faces_uv, masks = head
    folder, spec = soft_actor
    renderer = ActorRenderer(plan_actor(spec, model, masks), model, uvs, faces_uv, masks)
    sharp, soft = VhapExport(actor), VhapExport(folder)
    gained = in_hair = n_sharp = n_soft = 0
    for frame in soft.split("train")[::7] + soft.split("val"):
        same = [f for f in sharp.split("train") + sharp.split("val") if f.image_path.name == frame.image_path.name]
        a_sharp, a_soft = sharp.load_mask(same[0]), soft.load_mask(frame)
        n_sharp, n_soft = n_sharp + int(_fractional(a_sharp).sum()), n_soft + int(_fractional(a_soft).sum())
        # where the flyaway layer projects (at 2x, pooled to the image, one pixel of margin)
        verts = renderer.head_verts(frame.timestep_index)
        layer = renderer.fringe_layer(verts, vertex_normals(verts[None], renderer.faces)[0])
        cam = frame.camera
        K = cam.K * torch.tensor([[2.0], [2.0], [1.0]])
        frags = rasterize_camera(layer[None], renderer.surface.shell_faces, cam.viewmat[None], K[None],
                                 2 * cam.height, 2 * cam.width)
        hair = torch.nn.functional.max_pool2d((frags.pix_to_face >= 0).float()[None], 2)
        hair = torch.nn.functional.max_pool2d(hair, 3, 1, 1)[0, 0] > 0
        new = _fractional(a_soft) & ~_fractional(a_sharp)
        gained, in_hair = gained + int(new.sum()), in_hair + int((new & hair).sum())
    assert n_soft > 1.5 * n_sharp, (n_soft, n_sharp)
    assert in_hair > 0.95 * gained, (in_hair, gained)


def test_soft_hair_images_are_composites_on_white(head, soft_actor):
    """I = F·a + (1 - a) with F in [0, 1]: I >= 1 - a everywhere (and I <= 1), exactly as rendered and
    within the rounding of the two 8-bit files as written."""
    _, model, uvs, faces_uv, masks = head
    folder, spec = soft_actor
    plan = plan_actor(spec, model, masks)
    rgb, cover = ActorRenderer(plan, model, uvs, faces_uv, masks).render(1, plan.cameras)
    assert float((rgb - (1 - cover[..., None])).min()) >= -1e-6 and float(rgb.max()) <= 1 + 1e-6
    assert int(_fractional(cover).sum()) > 0
    export = VhapExport(folder)
    for frame in export.split("test")[:4] + export.split("val")[:2]:
        image, alpha = export.load_image(frame), export.load_mask(frame)
        assert float((image - (1 - alpha[..., None])).min()) >= -1.01 / 255
