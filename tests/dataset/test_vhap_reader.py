import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from lib.dataset.cameras import Camera
from lib.dataset.vhap import DatasetError, VhapExport, read_flame_params, stack_flame_params, take_timesteps

W, H = 64, 48
K = torch.tensor([[80.0, 0.0, 30.5], [0.0, 82.0, 20.25], [0.0, 0.0, 1.0]])  # principal point off-centre
N_VERTS = 5023 + 120  # VHAP's FLAME with teeth


def _cameras(width=W, height=H, k=K) -> list[Camera]:
    eyes = [(0.4, 0.1, 1.4), (0.0, 0.0, 1.5), (-0.4, -0.1, 1.4)]
    return [Camera.look_at(eye, (0.0, 0.0, 0.0), k, width, height, camera_index=i) for i, eye in enumerate(eyes)]


def _flame_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "shape": rng.normal(size=300), "expr": rng.normal(size=(1, 100)), "rotation": rng.normal(size=(1, 3)),
        "neck_pose": rng.normal(size=(1, 3)), "jaw_pose": rng.normal(size=(1, 3)),
        "eyes_pose": rng.normal(size=(1, 6)), "translation": rng.normal(size=(1, 3)),
        "static_offset": rng.normal(size=(1, N_VERTS, 3)) * 1e-3,
    }


def _write_json(path: Path, frames: list[dict], **top) -> None:
    path.write_text(json.dumps({**top, "frames": frames}))


def write_sequence(folder: Path, timesteps=(0, 1), cameras=None, seed=0, image_fn=None) -> dict[Path, np.ndarray]:
    """A VHAP-style export: train = all cameras but the last, val = the last, test = all.

    Returns the RGB uint8 image written for every image path.
    """
    cameras = _cameras() if cameras is None else cameras
    rng = np.random.default_rng(seed)
    images = {}
    frames = []
    for sub in ("images", "fg_masks", "flame_param"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for t in timesteps:
        np.savez(folder / "flame_param" / f"{t:05d}.npz", **_flame_arrays(rng))
        for cam in cameras:
            name = f"{t:05d}_{cam.camera_index:02d}.png"
            rgb = image_fn(cam) if image_fn else rng.integers(0, 256, size=(cam.height, cam.width, 3), dtype=np.uint8)
            mask = rng.integers(0, 256, size=(cam.height, cam.width), dtype=np.uint8)
            for sub, data in (("images", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)), ("fg_masks", mask)):
                cv2.imwrite(str(folder / sub / name), data)
            images[folder / "images" / name] = rgb
            frames.append({"timestep_index": t, "camera_index": cam.camera_index,
                           "file_path": f"images/{name}", "fg_mask_path": f"fg_masks/{name}",
                           "flame_param_path": f"flame_param/{t:05d}.npz", **cam.to_vhap_fields()})
    np.savez(folder / "canonical_flame_param.npz", **_flame_arrays(rng))
    last = cameras[-1].camera_index
    _write_json(folder / "transforms_train.json", [f for f in frames if f["camera_index"] != last])
    _write_json(folder / "transforms_val.json", [f for f in frames if f["camera_index"] == last])
    _write_json(folder / "transforms_test.json", frames)
    return images


@pytest.fixture
def sequence(tmp_path):
    folder = tmp_path / "seqA"
    images = write_sequence(folder)
    return folder, images


def test_frames_carry_paths_cameras_and_pixels_as_written(sequence):
    folder, images = sequence
    export = VhapExport(folder)
    train = export.split("train")
    assert [(f.timestep_index, f.camera_index) for f in train] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [f.camera_index for f in export.split("val")] == [2, 2]
    frame = train[3]
    assert frame.image_path == folder / "images" / "00001_01.png"
    assert frame.mask_path == folder / "fg_masks" / "00001_01.png"
    assert frame.flame_param_path == folder / "flame_param" / "00001.npz"
    written = _cameras()[1]
    torch.testing.assert_close(frame.camera.viewmat, written.viewmat, atol=1e-6, rtol=0)
    torch.testing.assert_close(frame.camera.K, written.K)

    rgb = export.load_image(frame)
    assert rgb.shape == (H, W, 3) and rgb.dtype == torch.float32
    torch.testing.assert_close(rgb, torch.from_numpy(images[frame.image_path]).float() / 255)
    mask = export.load_mask(frame)
    assert mask.shape == (H, W) and 0 <= mask.min() and mask.max() <= 1


def test_principal_point_off_centre_survives_the_cy_flip(tmp_path):
    # Fields as VHAP writes them: cy counted from the bottom edge (OpenCV cy = 12 -> 48 - 12 = 36).
    c2w = np.eye(4)
    c2w[2, 3] = 2.0
    cv2.imwrite(str(tmp_path / "img.png"), np.zeros((H, W, 3), np.uint8))
    frame = {"timestep_index": 0, "camera_index": 0, "file_path": "img.png", "flame_param_path": "p.npz",
             "transform_matrix": c2w.tolist(), "fl_x": 90.0, "fl_y": 91.0, "cx": 20.0, "cy": 36.0, "w": W, "h": H}
    _write_json(tmp_path / "transforms_train.json", [frame])
    cam = VhapExport(tmp_path).split("train")[0].camera
    torch.testing.assert_close(cam.K, torch.tensor([[90.0, 0.0, 20.0], [0.0, 91.0, 12.0], [0.0, 0.0, 1.0]]))
    # Writing it back (the synthetic actor's path) restores the stored value.
    assert cam.to_vhap_fields()["cy"] == pytest.approx(36.0)
    # Above the optical axis in the world is above the principal point in the image.
    uv, _ = cam.project(torch.tensor([[0.0, 0.1, 0.0]]))
    torch.testing.assert_close(uv, torch.tensor([[20.0, 12.0 - 91.0 * 0.1 / 2]]))


def test_top_level_intrinsics_fill_in_and_frames_override(tmp_path):
    cv2.imwrite(str(tmp_path / "img.png"), np.zeros((H, W, 3), np.uint8))
    base = {"timestep_index": 0, "camera_index": 0, "file_path": "img.png", "flame_param_path": "p.npz",
            "transform_matrix": np.eye(4).tolist()}
    top = {"fl_x": 50.0, "fl_y": 50.0, "cx": 32.0, "cy": 24.0, "w": W, "h": H}
    _write_json(tmp_path / "transforms_train.json", [base, {**base, "camera_index": 1, "fl_x": 70.0}], **top)
    a, b = VhapExport(tmp_path).split("train")
    assert a.camera.K[0, 0] == 50.0 and b.camera.K[0, 0] == 70.0
    assert b.camera.K[1, 1] == 50.0 and (b.camera.width, b.camera.height) == (W, H)


@pytest.mark.parametrize("size", [(64, 48), (65, 49)])
def test_downsampled_image_and_camera_agree_on_a_world_point(tmp_path, size):
    width, height = size
    point = torch.tensor([[0.12, -0.05, 0.02]])  # lands near the bottom-right, where a wrong scale shows most
    k = torch.tensor([[80.0, 0.0, 30.0], [0.0, 80.0, 22.0], [0.0, 0.0, 1.0]])
    cam = Camera.look_at((0.0, 0.0, 0.4), (0.0, 0.0, 0.0), k, width, height)

    def blob(c: Camera) -> np.ndarray:
        u, v = c.project(point)[0][0].tolist()
        jj, ii = np.meshgrid(np.arange(c.width) + 0.5, np.arange(c.height) + 0.5)
        g = np.exp(-((jj - u) ** 2 + (ii - v) ** 2) / (2 * 2.0 ** 2))
        return np.repeat((g * 255).round().astype(np.uint8)[..., None], 3, axis=2)

    write_sequence(tmp_path, timesteps=(0,), cameras=[cam], image_fn=blob)
    assert cam.project(point)[0][0, 0] > 0.8 * width

    export = VhapExport(tmp_path, ds_rate=2)
    frame = export.split("val")[0]
    image = export.load_image(frame)[..., 0].double()
    assert image.shape == (height // 2, width // 2)
    jj, ii = torch.meshgrid(torch.arange(image.shape[1]) + 0.5, torch.arange(image.shape[0]) + 0.5, indexing="xy")
    centroid = torch.stack([(image * jj).sum(), (image * ii).sum()]) / image.sum()
    uv, _ = frame.camera.project(point.double())
    assert torch.linalg.norm(centroid - uv[0]) < 0.05  # measured < 0.01; a 1/ds scale is 0.55 off at 65x49


def test_union_export_reads_like_its_sequences(tmp_path):
    write_sequence(tmp_path / "seqA", timesteps=(0, 1), seed=1)
    write_sequence(tmp_path / "seqB", timesteps=(0, 1), seed=2)
    union = tmp_path / "UNION"
    union.mkdir()
    # As VHAP's combine_nerf_datasets.py does: prefix '../<sequence>/', renumber timesteps.
    for split in ("train", "val", "test"):
        frames = []
        for offset, seq in ((0, "seqA"), (2, "seqB")):
            for f in json.loads((tmp_path / seq / f"transforms_{split}.json").read_text())["frames"]:
                for key in ("file_path", "fg_mask_path", "flame_param_path"):
                    f[key] = f"../{seq}/{f[key]}"
                frames.append({**f, "timestep_index": f["timestep_index"] + offset})
        _write_json(union / f"transforms_{split}.json", frames)

    direct = VhapExport(tmp_path / "seqA")
    combined = VhapExport(union)
    for split in ("train", "val", "test"):
        a = direct.split(split)
        b = [f for f in combined.split(split) if f.timestep_index < 2]
        assert len(a) == len(b) > 0
        for fa, fb in zip(a, b):
            assert (fa.timestep_index, fa.camera_index, fa.image_path, fa.mask_path, fa.flame_param_path) == \
                   (fb.timestep_index, fb.camera_index, fb.image_path, fb.mask_path, fb.flame_param_path)
            torch.testing.assert_close(fa.camera.viewmat, fb.camera.viewmat)
            torch.testing.assert_close(fa.camera.K, fb.camera.K)
        torch.testing.assert_close(direct.load_image(a[-1]), combined.load_image(b[-1]))
        torch.testing.assert_close(direct.load_flame(a[-1])["expr"], combined.load_flame(b[-1])["expr"])

    timesteps = combined.timesteps("train")
    assert [t for t, _ in timesteps] == [0, 1, 2, 3]
    assert timesteps[3][1] == tmp_path / "seqB" / "flame_param" / "00001.npz"
    assert [c.camera_index for c in combined.cameras("test")] == [0, 1, 2]


def test_timesteps_naming_two_flame_files_are_refused(sequence):
    folder, _ = sequence
    path = folder / "transforms_train.json"
    content = json.loads(path.read_text())
    content["frames"][1]["flame_param_path"] = "flame_param/00001.npz"  # timestep 0, camera 1
    path.write_text(json.dumps(content))
    with pytest.raises(DatasetError, match="timestep 0 names two FLAME files"):
        VhapExport(folder).timesteps("train")


def test_flame_params_come_back_batched_with_teeth_offsets_kept(sequence):
    folder, _ = sequence
    export = VhapExport(folder)
    params = export.load_flame(export.split("train")[0])
    expected = {"shape": (1, 300), "expr": (1, 100), "rotation": (1, 3), "neck_pose": (1, 3),
                "jaw_pose": (1, 3), "eyes_pose": (1, 6), "translation": (1, 3), "static_offset": (1, N_VERTS, 3),
                "dynamic_offset": None}
    assert {k: None if v is None else tuple(v.shape) for k, v in params.items()} == expected
    assert all(v.dtype == torch.float32 for v in params.values() if v is not None)
    stored = np.load(folder / "flame_param" / "00000.npz")
    np.testing.assert_allclose(params["static_offset"].numpy(), stored["static_offset"], rtol=1e-6)
    np.testing.assert_allclose(params["shape"][0].numpy(), stored["shape"], rtol=1e-6)

    assert export.load_flame("flame_param/00001.npz")["expr"].shape == (1, 100)
    assert export.load_canonical_flame()["static_offset"].shape == (1, N_VERTS, 3)


def test_flame_file_without_static_offset_gives_none(tmp_path):
    arrays = _flame_arrays(np.random.default_rng(0))
    del arrays["static_offset"]
    np.savez(tmp_path / "p.npz", **arrays)
    assert VhapExport(tmp_path).load_flame(tmp_path / "p.npz")["static_offset"] is None


@pytest.mark.parametrize("offsets", ["same", "different", "mixed"])
def test_a_static_offset_every_file_shares_is_stacked_once(tmp_path, offsets):
    rng = np.random.default_rng(3)
    shared = _flame_arrays(rng)["static_offset"]
    paths = []
    for t in range(4):
        arrays = _flame_arrays(rng)
        if offsets == "same":
            arrays["static_offset"] = shared
        elif offsets == "mixed" and t == 2:
            del arrays["static_offset"]
        paths.append(tmp_path / f"{t}.npz")
        np.savez(paths[-1], **arrays)
    if offsets == "mixed":
        with pytest.raises(DatasetError, match="some FLAME parameter files .* have a 'static_offset' and others not"):
            stack_flame_params(paths)
        return
    params = stack_flame_params(paths)
    assert params["expr"].shape == (4, 100)
    assert params["static_offset"].shape == ((1 if offsets == "same" else 4), N_VERTS, 3)
    rows = take_timesteps(params, torch.tensor([3, 1]))
    torch.testing.assert_close(rows["expr"], params["expr"][[3, 1]])
    expected = [np.load(paths[t])["static_offset"] for t in (3, 1)]
    for i, offset in enumerate(expected):
        torch.testing.assert_close(rows["static_offset"][0 if offsets == "same" else i], torch.from_numpy(offset[0]).float())


@pytest.mark.parametrize("dynamic", ["every file", "mixed"])
def test_dynamic_offsets_are_read_per_timestep(tmp_path, dynamic):
    rng = np.random.default_rng(4)
    paths = []
    for t in range(4):
        arrays = _flame_arrays(rng)
        if dynamic == "every file" or t != 2:
            arrays["dynamic_offset"] = rng.normal(size=(1, N_VERTS, 3)) * 1e-3  # VHAP: [1, V + teeth, 3] per timestep
        paths.append(tmp_path / f"{t}.npz")
        np.savez(paths[-1], **arrays)
    if dynamic == "mixed":
        with pytest.raises(DatasetError, match="some FLAME parameter files .* have a 'dynamic_offset' and others not"):
            stack_flame_params(paths)
        return
    assert read_flame_params(paths[0])["dynamic_offset"].shape == (1, N_VERTS, 3)
    params = stack_flame_params(paths)
    assert params["dynamic_offset"].shape == (4, N_VERTS, 3)
    rows = take_timesteps(params, torch.tensor([3, 1]))
    for i, t in enumerate((3, 1)):
        torch.testing.assert_close(rows["dynamic_offset"][i], torch.from_numpy(np.load(paths[t])["dynamic_offset"][0]).float())


@pytest.mark.parametrize("key", ["static_offset", "dynamic_offset"])
def test_offsets_with_fewer_rows_than_the_model_has_vertices_name_the_file(tmp_path, key):
    arrays = _flame_arrays(np.random.default_rng(5))
    arrays[key] = np.zeros((1, 5000, 3))
    np.savez(tmp_path / "p.npz", **arrays)
    assert read_flame_params(tmp_path / "p.npz", n_verts=5000)[key].shape == (1, 5000, 3)
    with pytest.raises(DatasetError, match=rf"p.npz: '{key}' has 5000 vertex rows but .*5023 vertices.*actor.flame_model"):
        read_flame_params(tmp_path / "p.npz", n_verts=5023)


def test_a_one_camera_export_has_an_empty_val_split_that_is_reported(tmp_path):
    """VHAP's union leaves one camera out for val; with a single camera the val split has no frames."""
    folder = tmp_path / "mono"
    write_sequence(folder, cameras=_cameras()[1:2])
    _write_json(folder / "transforms_train.json", json.loads((folder / "transforms_test.json").read_text())["frames"])
    _write_json(folder / "transforms_val.json", [])
    export = VhapExport(folder)
    assert export.split("val") == [] and len(export.split("train")) == 2 and export.timesteps("val") == []
    lines = []
    assert export.empty_split("val", "no val curve", lines.append) and not export.empty_split("train", "-", lines.append)
    assert lines == [f"val split is empty in {folder / 'transforms_val.json'}: no val curve"]
    _write_json(folder / "transforms_train.json", [])
    with pytest.raises(DatasetError, match="transforms_train.json lists no frames"):
        VhapExport(folder).split("train")


def test_camera_at_takes_the_camera_from_the_sequence_of_the_timestep(tmp_path):
    """A union of two sequences whose cameras VHAP's export relocated differently (by each sequence's mean
    head translation): a render of a timestep of B (no ground truth) must use B's camera, not A's."""
    shifted = [Camera(c.viewmat @ torch.tensor([[1.0, 0, 0, 0.004], [0, 1, 0, -0.003], [0, 0, 1, 0.002], [0, 0, 0, 1]]),
                      c.K, c.width, c.height, c.camera_index) for c in _cameras()]
    write_sequence(tmp_path / "seqA", timesteps=(0, 1), seed=1)
    write_sequence(tmp_path / "seqB", timesteps=(0, 1), seed=2, cameras=shifted)
    union = tmp_path / "UNION"
    union.mkdir()
    for split, seqs in (("train", ("seqA",)), ("val", ("seqA",)), ("test", ("seqB",))):
        frames = []
        for seq in seqs:
            for f in json.loads((tmp_path / seq / f"transforms_{split}.json").read_text())["frames"]:
                for key in ("file_path", "fg_mask_path", "flame_param_path"):
                    f[key] = f"../{seq}/{f[key]}"
                frames.append({**f, "timestep_index": f["timestep_index"] + (2 if seq == "seqB" else 0)})
        _write_json(union / f"transforms_{split}.json", frames)
    export = VhapExport(union)
    assert {f.sequence for f in export.split("train")} == {tmp_path / "seqA"}
    assert {f.sequence for f in export.split("test")} == {tmp_path / "seqB"}
    for t, cameras in ((1, _cameras()), (3, shifted)):
        for c in (0, 2):  # camera 2: val in A, test in B
            torch.testing.assert_close(export.camera_at(t, c).viewmat, cameras[c].viewmat)
    assert not torch.allclose(export.camera_at(3, 0).viewmat, export.camera_at(1, 0).viewmat)
    with pytest.raises(DatasetError, match="actor.identity_timestep = 7 is not a timestep"):
        export.camera_at(7, 0)
    with pytest.raises(DatasetError, match=r"test.camera = 5 is not a camera of sequence .*seqB.* \(it has \[0, 1, 2\]\)"):
        export.camera_at(3, 5)


def test_from_config_applies_ds_rate_and_names_the_masks_folder_outside_the_export(sequence, tmp_path):
    folder, _ = sequence
    cfg = SimpleNamespace(actor=SimpleNamespace(data_dir=str(folder), n_shape=0, n_expr=0, name="a",
                                                experiments_dir=str(tmp_path / "experiments")),
                          run=SimpleNamespace(name="default"),
                          data=SimpleNamespace(ds_rate=2, masks_dir=""))
    export = VhapExport.from_config(cfg)
    frame = export.split("train")[0]
    assert (frame.camera.width, frame.camera.height) == (W // 2, H // 2)
    assert export.load_image(frame).shape == (H // 2, W // 2, 3)
    assert export.masks_dir == tmp_path / "experiments" / "a" / "masks"
    cfg.data.masks_dir = str(tmp_path / "elsewhere")
    assert VhapExport.from_config(cfg).masks_dir == tmp_path / "elsewhere"


# ---- broken exports: each error names the file ----

def test_truncated_png_names_the_file(sequence):
    folder, _ = sequence
    export = VhapExport(folder)
    frame = export.split("train")[0]
    data = frame.image_path.read_bytes()
    frame.image_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="truncated") as err:
        export.load_image(frame)
    assert str(frame.image_path) in str(err.value)


def test_image_of_the_wrong_size_names_the_file(sequence):
    folder, _ = sequence
    export = VhapExport(folder)
    frame = export.split("train")[0]
    cv2.imwrite(str(frame.image_path), np.zeros((H + 2, W, 3), np.uint8))
    with pytest.raises(DatasetError, match="does not match") as err:
        export.load_image(frame)
    assert str(frame.image_path) in str(err.value)


def test_missing_npz_names_the_file(sequence):
    folder, _ = sequence
    export = VhapExport(folder)
    frame = export.split("train")[0]
    frame.flame_param_path.unlink()
    with pytest.raises(DatasetError, match="not found") as err:
        export.load_flame(frame)
    assert str(frame.flame_param_path) in str(err.value)


def test_npz_without_a_key_or_with_a_wrong_shape_names_file_and_key(tmp_path):
    arrays = _flame_arrays(np.random.default_rng(0))
    np.savez(tmp_path / "no_jaw.npz", **{k: v for k, v in arrays.items() if k != "jaw_pose"})
    np.savez(tmp_path / "flat_eyes.npz", **{**arrays, "eyes_pose": arrays["eyes_pose"][0]})
    export = VhapExport(tmp_path)
    with pytest.raises(DatasetError, match="no 'jaw_pose'") as err:
        export.load_flame("no_jaw.npz")
    assert str(tmp_path / "no_jaw.npz") in str(err.value)
    with pytest.raises(DatasetError, match=r"'eyes_pose' has shape \(6,\), expected \(1, 6\)") as err:
        export.load_flame("flat_eyes.npz")
    assert str(tmp_path / "flat_eyes.npz") in str(err.value)


def test_frame_without_transform_matrix_names_json_frame_and_key(sequence):
    folder, _ = sequence
    path = folder / "transforms_train.json"
    content = json.loads(path.read_text())
    del content["frames"][1]["transform_matrix"]
    path.write_text(json.dumps(content))
    with pytest.raises(DatasetError, match="frame 1 has no 'transform_matrix'") as err:
        VhapExport(folder).split("train")
    assert str(path) in str(err.value)


def test_missing_json_names_the_file(tmp_path):
    with pytest.raises(DatasetError, match="transforms_val.json not found"):
        VhapExport(tmp_path).split("val")


def test_scaled_pose_is_refused(sequence):
    folder, _ = sequence
    path = folder / "transforms_test.json"
    content = json.loads(path.read_text())
    content["frames"][0]["transform_matrix"] = (np.diag([2.0, 2.0, 2.0, 1.0])).tolist()
    path.write_text(json.dumps(content))
    with pytest.raises(DatasetError, match="frame 0: transform_matrix is not a rotation"):
        VhapExport(folder).split("test")
