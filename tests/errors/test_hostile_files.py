"""Every file type the pipeline reads is checked when it is loaded: a damaged or hostile file (NaN,
indices out of range, parts that do not fit together, the wrong kind of value) raises the module's own
ProjectError naming the file, never a traceback from deep inside the computation."""
import json
import pickle

import numpy as np
import pytest
import torch

from lib.dataset.vhap import DatasetError, VhapExport
from lib.errors import ProjectError
from lib.flame.model import FlameFormatError, FlameModel, load_regions
from lib.geometry.obj_io import ObjFormatError, read_obj
from lib.models.avatar import load_canonical_mesh
from lib.models.gem import GaussianEigenModel, GaussianSet, GemError
from lib.models.mesh_pca import MeshPCA, MeshPcaError


def _flame_dict(n_verts: int = 20) -> dict:
    rng = np.random.default_rng(0)
    weights = rng.random((n_verts, 5))
    return {"v_template": rng.normal(size=(n_verts, 3)), "f": rng.integers(0, n_verts, (30, 3)),
            "shapedirs": rng.normal(size=(n_verts, 3, 400)), "posedirs": rng.normal(size=(n_verts, 3, 36)),
            "J_regressor": rng.random((5, n_verts)), "weights": weights / weights.sum(1, keepdims=True),
            "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]])}


@pytest.mark.parametrize("damage, message", [
    (lambda d: d["v_template"].__setitem__((3, 1), np.nan), "'v_template' holds 1 non-finite"),
    (lambda d: d["shapedirs"].__setitem__((0, 0, 305), np.inf), "'shapedirs' holds 1 non-finite"),
    (lambda d: d["f"].__setitem__((2, 0), 999), "'f' indexes vertices outside"),
])
def test_a_damaged_flame_model_is_refused_naming_the_array(tmp_path, damage, message):
    data = _flame_dict()
    damage(data)
    path = tmp_path / "flame.pkl"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(FlameFormatError, match=message) as err:
        FlameModel.from_file(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("regions, message", [
    ({"face": np.array([0, 5, 25])}, "region 'face' indexes vertices outside"),
    ({"face": np.array([0.5, 1.5])}, "not a name with a 1-D array of vertex indices"),
    ([1, 2, 3], "not a dict of region name"),
])
def test_region_masks_must_index_the_model(tmp_path, regions, message):
    path = tmp_path / "FLAME_masks.pkl"
    path.write_bytes(pickle.dumps(regions))
    with pytest.raises(FlameFormatError, match=message):
        load_regions(path, n_verts=20)


def test_an_obj_with_non_finite_coordinates_is_refused(tmp_path):
    path = tmp_path / "head.obj"
    path.write_text("v 0 0 0\nv 1 0 nan\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(ObjFormatError, match="head.obj: vertex coordinates hold NaN"):
        read_obj(path)


def _gem(tmp_path) -> tuple[GaussianEigenModel, dict]:
    g = torch.Generator().manual_seed(0)
    T, N = 5, 30
    model = GaussianEigenModel.fit(GaussianSet(
        means=torch.randn(T, N, 3, generator=g), quats=torch.randn(T, N, 4, generator=g),
        scales=0.01 + 0.01 * torch.rand(T, N, 3, generator=g), opacities=torch.rand(T, N, generator=g),
        colors=torch.rand(N, 3, generator=g).expand(T, N, 3)), {"positions": 2, "rotations": 2, "scales": 2,
                                                               "opacities": 2})
    path = model.save(tmp_path / "gem.pt")
    return model, torch.load(path, weights_only=True)


def test_a_gem_file_with_nan_in_a_basis_is_refused_naming_the_tensor(tmp_path):
    _, state = _gem(tmp_path)
    state["blocks"]["positions"][0]["basis"][1, 7] = float("nan")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(GemError, match=r"bad\.pt: 'blocks\.positions\.0\.basis' holds 1 non-finite"):
        GaussianEigenModel.load(tmp_path / "bad.pt")


def test_a_gem_file_whose_parts_do_not_fit_is_refused(tmp_path):
    _, state = _gem(tmp_path)
    state["blocks"]["scales"][0]["mean"] = state["blocks"]["scales"][0]["mean"][:-3]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(GemError, match=r"bad\.pt is incomplete .*mismatched shapes"):
        GaussianEigenModel.load(tmp_path / "bad.pt")


def test_mesh_pca_and_canonical_mesh_files_are_checked(tmp_path):
    pca = MeshPCA.fit(torch.randn(6, 10, 3), 3)
    pca.save(tmp_path / "pca.npz")
    with np.load(tmp_path / "pca.npz") as f:
        arrays = dict(f)
    np.savez(tmp_path / "short.npz", **{**arrays, "variances": arrays["variances"][:2]})
    with pytest.raises(MeshPcaError, match="short.npz holds .* which do not fit together"):
        MeshPCA.load(tmp_path / "short.npz")
    arrays["mean"][4] = np.inf
    np.savez(tmp_path / "inf.npz", **arrays)
    with pytest.raises(MeshPcaError, match="inf.npz: 'mean' holds 1 non-finite"):
        MeshPCA.load(tmp_path / "inf.npz")
    (tmp_path / "canonical.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(MeshPcaError, match="cannot read the canonical mesh .*canonical.npz"):
        load_canonical_mesh(tmp_path / "canonical.npz")


@pytest.mark.parametrize("frame, message", [
    (["not", "an", "object"], "frame 0 is a list"),
    ({"w": "wide"}, "must be numbers"),
    ({"cx": float("nan")}, "cx not finite"),
    ({"h": 0}, "h = 0"),
    ({"file_path": 7}, "'file_path' must be a relative path"),
    ({"camera_index": "front"}, "must be integers"),
])
def test_a_hostile_transforms_frame_is_refused_naming_file_and_frame(tmp_path, frame, message):
    good = {"file_path": "images/00000_00.png", "flame_param_path": "flame_param/00000.npz", "timestep_index": 0,
            "camera_index": 0, "transform_matrix": np.eye(4).tolist(), "fl_x": 100.0, "fl_y": 100.0, "cx": 50.0,
            "cy": 40.0, "w": 100, "h": 80}
    entry = frame if isinstance(frame, list) else {**good, **frame}
    for split in ("train", "val", "test"):
        (tmp_path / f"transforms_{split}.json").write_text(json.dumps({"frames": [entry]}))
    with pytest.raises(DatasetError, match=message) as err:
        VhapExport(tmp_path).split("train")
    assert "transforms_train.json, frame 0" in str(err.value) and issubclass(DatasetError, ProjectError)
