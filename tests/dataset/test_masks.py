import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lib.dataset.masks import mask_paths, region_faces, render_masks
from lib.dataset.synthetic_actor import (
    FRONTAL_CAMERA, ActorRenderer, ActorSpec, HeadFiles, generate_actor, image_size, plan_actor,
)
from lib.dataset.vhap import VhapExport
from lib.flame.synthetic import ensure_head_model
from lib.geometry.rasterize import rasterize_camera

SPEC = ActorSpec(seed=3, scale=0.1, n_cameras=16, sequences=("EXP-1", "EMO-1"), frames_per_sequence=3,
                 tracking_noise=0.0)


@pytest.fixture(scope="module")
def actor(tmp_path_factory):
    paths = ensure_head_model(tmp_path_factory.mktemp("head"), seed=0)
    files = HeadFiles(paths["flame_model"], paths["uv_obj"], paths["masks"])
    model, uvs, faces_uv, masks = files.load()
    folder = generate_actor(tmp_path_factory.mktemp("actors") / "actor", files, SPEC, log=lambda *_: None)
    summary = render_masks(VhapExport(folder), model, masks, log=lambda *_: None)
    return folder, summary, model, uvs, faces_uv, masks


@pytest.fixture(scope="module")
def renderer(actor):
    _, _, model, uvs, faces_uv, masks = actor
    return ActorRenderer(plan_actor(SPEC, model, masks), model, uvs, faces_uv, masks)


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def _ground_truth_classes(renderer, masks, t, cameras):
    """What each pixel of the ground truth shows: torso / hair beyond the tracked mesh / face / neck."""
    model = renderer.model
    cams = [renderer.plan.cameras[c] for c in cameras]
    viewmats, Ks = torch.stack([c.viewmat for c in cams]), torch.stack([c.K for c in cams])
    H, W = cams[0].height, cams[0].width
    gt = rasterize_camera(renderer.head_verts(t)[None], renderer.faces, viewmats, Ks, H, W)
    torso = rasterize_camera(renderer.torso.verts[None], renderer.torso.faces, viewmats, Ks, H, W)
    tracked = rasterize_camera(renderer.tracked_verts(t)[None], model.faces, viewmats, Ks, H, W).pix_to_face
    head_seen = gt.depth < torso.depth
    face_id = gt.pix_to_face.clamp(min=0)
    n_model = model.faces.shape[0]
    in_region = lambda name: torch.cat([region_faces(model.faces, masks[name]),  # noqa: E731
                                        torch.zeros(len(renderer.faces) - n_model, dtype=torch.bool)])[face_id]
    return {
        "torso": torch.isfinite(torso.depth) & ~head_seen,
        "hair": head_seen & (face_id >= n_model) & (tracked < 0),
        "face": head_seen & in_region("face"),
        "neck": head_seen & in_region("neck"),
    }


@pytest.mark.parametrize("t", [0, 4])
def test_alpha_removes_torso_and_neck_and_keeps_hair_and_face(actor, renderer, t):
    folder = actor[0]
    cameras = [0, 4, FRONTAL_CAMERA, 12, 15]
    classes = _ground_truth_classes(renderer, actor[5], t, cameras)
    load = lambda sub: torch.stack([torch.from_numpy(_read(folder / sub / f"{t:05d}_{c:02d}.png"))  # noqa: E731
                                    for c in cameras]) / 255.0
    alpha, fg = load("alpha_masks"), load("fg_masks")
    solid = fg > 0.9  # away from anti-aliased edges
    for name, kept in (("torso", False), ("neck", False), ("hair", True), ("face", True)):
        pixels = classes[name] & solid
        assert pixels.sum() > 20, f"too few {name} pixels to judge"
        share = float((alpha[pixels] > 0.5).float().mean())
        if kept:
            assert share > 0.95, f"only {share:.1%} of {name} pixels kept"
        else:
            assert share < 0.03, f"{share:.1%} of {name} pixels kept"
    assert torch.all(alpha <= fg + 1.0 / 255)  # never more than the foreground


def test_mouth_mask_covers_the_lips_and_not_the_eyes(actor):
    folder, _, model, _, _, masks = actor
    plan = plan_actor(SPEC, model, masks)
    mouth = _read(folder / "mouth_masks" / f"00000_{FRONTAL_CAMERA:02d}.png") > 0
    with torch.no_grad():
        verts, _ = model(**plan.timestep_params(0))
    camera = plan.cameras[FRONTAL_CAMERA]
    points = torch.stack([verts[0, masks[name]].mean(0) for name in ("lips", "left_eyeball", "right_eyeball")])
    (u_lips, v_lips), *eyes = camera.project(points)[0].long().tolist()
    assert mouth[v_lips, u_lips]
    assert not any(mouth[v, u] for u, v in eyes)
    assert 0.002 < mouth.mean() < 0.1


def test_masks_are_pngs_of_the_image_size_next_to_images(actor):
    folder, summary = actor[:2]
    H, W = image_size(SPEC.scale)
    images = sorted((folder / "images").glob("*.png"))
    assert summary["frames"] == summary["written"] == len(images)
    for image in images:
        paths = mask_paths(image)
        assert paths.alpha.parent == folder / "alpha_masks" and paths.mouth.parent == folder / "mouth_masks"
        alpha, mouth = _read(paths.alpha), _read(paths.mouth)
        assert alpha.shape == mouth.shape == (H, W) and alpha.dtype == mouth.dtype == np.uint8
        assert set(np.unique(mouth)) <= {0, 255}
    assert not list(folder.glob("*_masks/.*"))  # no temporary files left


def test_rerun_skips_finished_frames_and_redoes_missing_ones(actor, monkeypatch):
    folder, _, model, _, _, masks = actor
    monkeypatch.chdir(folder.parent)  # an export named by a relative path, as configs name them
    alpha = folder / "alpha_masks" / "00002_05.png"
    stamp = os.stat(folder / "alpha_masks" / "00001_05.png").st_mtime_ns
    before = alpha.read_bytes()
    alpha.unlink()
    summary = render_masks(VhapExport(Path(folder.name)), model, masks, log=lambda *_: None)
    assert summary["written"] == 1 and summary["skipped"] == summary["frames"] - 1
    assert alpha.read_bytes() == before
    assert os.stat(folder / "alpha_masks" / "00001_05.png").st_mtime_ns == stamp


def test_partial_masks_of_a_killed_run_are_removed_and_runs_take_turns(actor):
    from lib.lock import LockHeld, locked

    folder, _, model, _, _, masks = actor
    partial = folder / "mouth_masks" / ".00001_03.png.k1ll3d.partial"
    partial.write_bytes(b"half a png")
    with locked(folder, "the masks of the export", folder / ".masks.lock", clean=False):
        with pytest.raises(LockHeld, match=f"process {os.getpid()}"):
            render_masks(VhapExport(folder), model, masks, log=lambda *_: None)
    assert partial.exists()
    render_masks(VhapExport(folder), model, masks, log=lambda *_: None)
    assert not partial.exists() and not (folder / ".masks.lock").exists()


def test_mask_paths_follow_the_sequence_of_a_union_export(tmp_path):
    image = tmp_path / "UNION" / ".." / "EXP-1" / "images" / "00012_08.png"
    paths = mask_paths(image)
    assert paths.alpha == tmp_path / "UNION" / ".." / "EXP-1" / "alpha_masks" / "00012_08.png"
    assert paths.mouth.name == "00012_08.png" and paths.mouth.parent.name == "mouth_masks"


def test_missing_region_is_reported(actor):
    folder, _, model, _, _, masks = actor
    with pytest.raises(ValueError, match="'neck'"):
        render_masks(VhapExport(folder), model, {k: v for k, v in masks.items() if k != "neck"})
