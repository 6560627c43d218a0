"""Keep and mouth masks: what they keep, where they are written (outside the dataset) and read, and
how a rerun resumes."""
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lib.dataset.cameras import Camera
from lib.dataset.masks import MaskRegions, frame_masks, mask_paths, region_faces, render_masks
from lib.dataset.synthetic_actor import (
    FRONTAL_CAMERA, ActorRenderer, ActorSpec, HeadFiles, generate_actor, image_size, plan_actor,
)
from lib.dataset.vhap import DatasetError, VhapExport
from lib.flame.synthetic import ensure_head_model
from lib.geometry.rasterize import rasterize_camera
from lib.train.data import ActorData

SPEC = ActorSpec(seed=3, scale=0.1, n_cameras=16, sequences=("EXP-1", "EMO-1"), frames_per_sequence=3,
                 tracking_noise=0.0)
QUIET = lambda *_: None  # noqa: E731


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def _set_read_only(folder: Path, read_only: bool) -> None:
    """chmod a tree read-only (a read-only dataset mount) or back."""
    for p in [folder, *folder.rglob("*")]:
        p.chmod((0o555 if p.is_dir() else 0o444) if read_only else (0o755 if p.is_dir() else 0o644))


@pytest.fixture(scope="module")
def actor(tmp_path_factory):
    """The actor's export, made read-only, and its masks rendered into a folder of their own.
    -> (export folder, summary, model, uvs, faces_uv, regions, masks folder, the export's files before)"""
    paths = ensure_head_model(tmp_path_factory.mktemp("head"), seed=0)
    files = HeadFiles(paths["flame_model"], paths["uv_obj"], paths["masks"])
    model, uvs, faces_uv, masks = files.load()
    folder = generate_actor(tmp_path_factory.mktemp("actors") / "actor", files, SPEC, log=QUIET)
    masks_dir = tmp_path_factory.mktemp("masks")
    before = _files(folder)
    _set_read_only(folder, True)
    try:
        summary = render_masks(VhapExport(folder, masks_dir=masks_dir), model, masks, log=QUIET)
        yield folder, summary, model, uvs, faces_uv, masks, masks_dir, before
    finally:
        _set_read_only(folder, False)


@pytest.fixture(scope="module")
def renderer(actor):
    _, _, model, uvs, faces_uv, masks, _, _ = actor
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
def test_keep_mask_removes_torso_and_neck_and_keeps_hair_and_face(actor, renderer, t):
    folder, masks_dir = actor[0], actor[6]
    cameras = [0, 4, FRONTAL_CAMERA, 12, 15]
    classes = _ground_truth_classes(renderer, actor[5], t, cameras)
    load = lambda sub: torch.stack([torch.from_numpy(_read(sub / f"{t:05d}_{c:02d}.png"))  # noqa: E731
                                    for c in cameras]) / 255.0
    keep, fg = load(masks_dir / folder.name / "keep_masks"), load(folder / "fg_masks")
    solid = fg > 0.9  # away from anti-aliased edges
    for name, kept in (("torso", False), ("neck", False), ("hair", True), ("face", True)):
        pixels = classes[name] & solid
        assert pixels.sum() > 20, f"too few {name} pixels to judge"
        share = float((keep[pixels] > 0.5).float().mean())
        if kept:
            assert share > 0.95, f"only {share:.1%} of {name} pixels kept"
        else:
            assert share < 0.03, f"{share:.1%} of {name} pixels kept"
    assert set(torch.unique(keep).tolist()) <= {0.0, 1.0}  # binary: the foreground's alpha is the export's


def test_mouth_mask_covers_the_lips_and_not_the_eyes(actor):
    folder, _, model, _, _, masks, masks_dir, _ = actor
    plan = plan_actor(SPEC, model, masks)
    mouth = _read(masks_dir / folder.name / "mouth_masks" / f"00000_{FRONTAL_CAMERA:02d}.png") > 0
    with torch.no_grad():
        verts, _ = model(**plan.timestep_params(0))
    camera = plan.cameras[FRONTAL_CAMERA]
    points = torch.stack([verts[0, masks[name]].mean(0) for name in ("lips", "left_eyeball", "right_eyeball")])
    (u_lips, v_lips), *eyes = camera.project(points)[0].long().tolist()
    assert mouth[v_lips, u_lips]
    assert not any(mouth[v, u] for u, v in eyes)
    assert 0.002 < mouth.mean() < 0.1


def test_masks_are_pngs_of_the_image_size_in_the_masks_folder_and_none_in_the_dataset(actor):
    folder, summary, *_, masks_dir, before = actor
    H, W = image_size(SPEC.scale)
    images = sorted((folder / "images").glob("*.png"))
    assert summary["frames"] == summary["written"] == len(images)
    for image in images:
        paths = mask_paths(image, folder, masks_dir)
        assert paths.keep == masks_dir / folder.name / "keep_masks" / image.name
        assert paths.mouth == masks_dir / folder.name / "mouth_masks" / image.name
        keep, mouth = _read(paths.keep), _read(paths.mouth)
        assert keep.shape == mouth.shape == (H, W) and keep.dtype == mouth.dtype == np.uint8
        assert set(np.unique(mouth)) <= {0, 255} and set(np.unique(keep)) <= {0, 255}
    # chmod keeps a non-root writer out of the dataset; as root, nothing new may appear in it either
    assert _files(folder) == before
    assert not [p for p in masks_dir.rglob(".*")]  # no temporary files or lock left


def test_a_second_run_skips_every_frame_and_a_rerun_redoes_missing_ones(actor, monkeypatch):
    folder, _, model, _, _, masks, masks_dir, _ = actor
    assert render_masks(VhapExport(folder, masks_dir=masks_dir), model, masks, log=QUIET)["written"] == 0
    monkeypatch.chdir(folder.parent)  # an export named by a relative path, as configs name them
    keep = masks_dir / folder.name / "keep_masks" / "00002_05.png"
    stamp = os.stat(masks_dir / folder.name / "keep_masks" / "00001_05.png").st_mtime_ns
    before = keep.read_bytes()
    keep.unlink()
    summary = render_masks(VhapExport(Path(folder.name), masks_dir=masks_dir), model, masks, log=QUIET)
    assert summary["written"] == 1 and summary["skipped"] == summary["frames"] - 1
    assert keep.read_bytes() == before
    assert os.stat(masks_dir / folder.name / "keep_masks" / "00001_05.png").st_mtime_ns == stamp


def _make_older_than_its_flame_parameters(mask: Path, frame) -> None:
    """As if the frame had been re-tracked after its mask was made."""
    earlier = os.stat(frame.flame_param_path).st_mtime_ns - 10**9
    os.utime(mask, ns=(earlier, earlier))


def test_masks_older_than_their_flame_parameters_are_rendered_again(actor):
    folder, _, model, _, _, masks, masks_dir, _ = actor
    export = VhapExport(folder, masks_dir=masks_dir)
    frame = export.split("train")[0]
    mouth = mask_paths(frame.image_path, folder, masks_dir).mouth
    _make_older_than_its_flame_parameters(mouth, frame)
    assert render_masks(export, model, masks, log=QUIET)["written"] == 1
    assert os.stat(mouth).st_mtime_ns >= os.stat(frame.flame_param_path).st_mtime_ns


def test_partial_masks_of_a_killed_run_are_removed_and_runs_take_turns(actor):
    from lib.lock import LockHeld, locked

    folder, _, model, _, _, masks, masks_dir, _ = actor
    partial = masks_dir / folder.name / "mouth_masks" / ".00001_03.png.k1ll3d.partial"
    partial.write_bytes(b"half a png")
    with locked(masks_dir, "the masks folder", masks_dir / ".masks.lock", clean=False):
        with pytest.raises(LockHeld, match=f"process {os.getpid()}"):
            render_masks(VhapExport(folder, masks_dir=masks_dir), model, masks, log=QUIET)
    assert partial.exists()
    render_masks(VhapExport(folder, masks_dir=masks_dir), model, masks, log=QUIET)
    assert not partial.exists() and not (masks_dir / ".masks.lock").exists()


def test_mask_paths_follow_the_sequence_of_a_union_export(tmp_path):
    masks_dir = tmp_path / "masks"
    image = tmp_path / "UNION" / ".." / "EXP-1" / "images" / "00012_08.png"
    paths = mask_paths(image, tmp_path / "UNION", masks_dir)
    assert paths.keep == masks_dir / "EXP-1" / "keep_masks" / "00012_08.png"
    assert paths.mouth == masks_dir / "EXP-1" / "mouth_masks" / "00012_08.png"
    # the sequence read directly has the same masks
    assert mask_paths(tmp_path / "EXP-1" / "images" / "00012_08.png", tmp_path / "EXP-1", masks_dir) == paths
    with pytest.raises(DatasetError, match="outside"):
        mask_paths(tmp_path / ".." / "elsewhere" / "images" / "0.png", tmp_path / "UNION", masks_dir)
    with pytest.raises(ValueError, match="no masks folder"):
        mask_paths(image, tmp_path / "UNION", None)


def _union(sequences: list[Path], union: Path, frames_per_split: int) -> None:
    """A union export of ``sequences`` as VHAP's combine_nerf_datasets.py writes it ('../<sequence>/'
    paths, timesteps renumbered), with the first few frames of each split of each sequence."""
    union.mkdir()
    for split in ("train", "val", "test"):
        frames, offset = [], 0
        for seq in sequences:
            db = json.loads((seq / f"transforms_{split}.json").read_text())
            for f in db["frames"][:frames_per_split]:
                for key in ("file_path", "fg_mask_path", "flame_param_path"):
                    f[key] = f"../{seq.name}/{f[key]}"
                frames.append({**f, "timestep_index": f["timestep_index"] + offset})
            offset += 100
        (union / f"transforms_{split}.json").write_text(json.dumps({**db, "frames": frames}))


def test_a_union_export_keeps_its_sequences_apart_and_the_reader_finds_their_masks(actor, tmp_path):
    folder, _, model, _, _, masks, _, _ = actor
    sequences = [tmp_path / "seqA", tmp_path / "seqB"]
    for seq in sequences:
        shutil.copytree(folder, seq)
        _set_read_only(seq, False)
    _union(sequences, tmp_path / "UNION", frames_per_split=2)
    dataset = lambda: _files(tmp_path / "seqA") | _files(tmp_path / "seqB") | _files(tmp_path / "UNION")  # noqa: E731
    before = dataset()
    masks_dir = tmp_path / "experiments" / "masks"
    export = VhapExport(tmp_path / "UNION", masks_dir=masks_dir)
    summary = render_masks(export, model, masks, log=QUIET)
    assert summary["written"] == summary["frames"] == 2 * 3 * 2
    assert sorted(p.name for p in masks_dir.iterdir()) == ["seqA", "seqB"]
    for seq in ("seqA", "seqB"):
        assert len(list((masks_dir / seq / "keep_masks").glob("*.png"))) == 6
        assert len(list((masks_dir / seq / "mouth_masks").glob("*.png"))) == 6
    assert dataset() == before  # nothing written into the sequences or the union export
    # the same frames of two copies of one sequence: the same masks
    for a in (masks_dir / "seqA" / "keep_masks").glob("*.png"):
        assert a.read_bytes() == (masks_dir / "seqB" / "keep_masks" / a.name).read_bytes()

    data = ActorData(export, model, torch.device("cpu"))
    frame = [f for f in export.split("train") if "seqB" in f.image_path.parts][0]
    sample = data.sample(frame)
    for stored, read in (("keep_masks", sample.keep), ("mouth_masks", sample.mouth)):
        assert torch.equal(read, torch.from_numpy(_read(masks_dir / "seqB" / stored / frame.image_path.name)) / 255.0)
    assert torch.equal(sample.fg, torch.from_numpy(_read(frame.mask_path)) / 255.0)  # the export's own alpha
    assert render_masks(export, model, masks, log=QUIET)["written"] == 0


@pytest.mark.parametrize("where", ["masks folder", "next to the images"])
def test_alpha_masks_of_an_earlier_version_are_never_read_and_keep_masks_are_written(actor, tmp_path, where):
    folder, _, model, _, _, masks, masks_dir, _ = actor
    export_dir = tmp_path / folder.name
    shutil.copytree(folder, export_dir)
    _set_read_only(export_dir, False)
    new_dir = tmp_path / "masks"
    old_parent = new_dir / folder.name if where == "masks folder" else export_dir
    for sub in ("alpha_masks", "mouth_masks"):  # the old format (fg x keep), made after the data (mtimes kept)
        shutil.copytree(masks_dir / folder.name / "mouth_masks", old_parent / sub)
    export = VhapExport(export_dir, masks_dir=new_dir)
    frame = export.split("val")[0]
    old = old_parent / "alpha_masks" / frame.image_path.name
    with pytest.raises(DatasetError, match=f"keep mask .* not found.*{old.name} is an alpha mask of an earlier version"):
        ActorData(export, model, torch.device("cpu")).sample(frame)
    summary = render_masks(export, model, masks, log=QUIET)
    assert summary["written"] == summary["frames"]  # the old masks count for nothing
    paths = mask_paths(frame.image_path, export_dir, new_dir)
    assert paths.keep.read_bytes() == (masks_dir / folder.name / "keep_masks" / frame.image_path.name).read_bytes()
    assert paths.mouth.read_bytes() == (masks_dir / folder.name / "mouth_masks" / frame.image_path.name).read_bytes()
    sample = ActorData(export, model, torch.device("cpu")).sample(frame)
    assert torch.equal(sample.keep, torch.from_numpy(_read(paths.keep)) / 255.0)


def _lips_before_a_neck(neck_depth: float) -> tuple[torch.Tensor, MaskRegions, Camera]:
    """Square rings at depth 2 as FLAME has them around its open mouth: face (vertices 0-3 its open
    outer rim), lips (4-7), the mouth's rim (8-11), and a neck triangle (12-14) at ``neck_depth``,
    seen along +z by a 40 x 40 camera (pixel column 20 + 10 x at depth 2)."""
    square = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    rings = [torch.cat([size * square, torch.full((4, 1), 2.0)], 1) for size in (1.6, 1.0, 0.4)]
    neck = torch.tensor([[-12.0, -12.0, neck_depth], [12.0, -12.0, neck_depth], [0.0, 12.0, neck_depth]])
    verts = torch.cat([*rings, neck])
    faces = [f for a, b in ((0, 4), (4, 8)) for i in range(4)
             for f in ((a + i, a + (i + 1) % 4, b + (i + 1) % 4), (a + i, b + (i + 1) % 4, b + i))]
    regions = MaskRegions.from_masks(torch.tensor(faces + [(12, 13, 14)]), len(verts),
                                     {"neck": [12, 13, 14], "lips": list(range(4, 12))})
    K = torch.tensor([[20.0, 0.0, 20.0], [0.0, 20.0, 20.0], [0.0, 0.0, 1.0]])
    return verts, regions, Camera(torch.eye(4), K, 40, 40)


@pytest.mark.parametrize("neck_depth", [4.0, 1.0])
def test_the_front_most_face_labels_a_pixel_even_through_an_open_mouth(neck_depth):
    verts, regions, camera = _lips_before_a_neck(neck_depth)
    keep, mouth = frame_masks(verts, torch.eye(4).repeat(2, 1, 1), regions, [camera])
    keep, mouth = keep[0, 20], mouth[0, 20]  # the middle row
    inside, lips, face, beyond = 20, 27, 32, 38  # columns: the open mouth, the lips, the face, only the neck
    assert not keep[beyond]
    if neck_depth > 2:  # the neck behind: seen through the open mouth, it must not decide the label
        assert keep[inside] and mouth[inside]
        assert keep[lips] and mouth[lips] and keep[face] and not mouth[face]
    else:  # the neck in front of the face and the mouth: removed wherever it covers them
        assert not keep[inside] and not keep[lips] and not keep[face] and not mouth[inside]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masks_rendered_on_cuda_match_the_cpu_ones(actor, tmp_path):
    folder, _, model, _, _, masks, masks_dir, _ = actor
    try:
        summary = render_masks(VhapExport(folder, masks_dir=tmp_path), model.to("cuda"), masks, log=QUIET)
    finally:
        model.to("cpu")
    assert summary["written"] == summary["frames"]
    for sub in ("keep_masks", "mouth_masks"):
        for cpu in (masks_dir / folder.name / sub).glob("*.png"):
            a, b = _read(cpu).astype(int), _read(tmp_path / folder.name / sub / cpu.name).astype(int)
            assert (np.abs(a - b) > 1).mean() < 2e-3, cpu.name  # a pixel centre on a face edge may flip


def test_missing_region_is_reported(actor):
    folder, _, model, _, _, masks, masks_dir, _ = actor
    with pytest.raises(ValueError, match="'neck'"):
        render_masks(VhapExport(folder, masks_dir=masks_dir), model, {k: v for k, v in masks.items() if k != "neck"})
