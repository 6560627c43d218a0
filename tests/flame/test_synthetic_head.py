import os

import numpy as np
import pytest
import scipy.sparse
import torch

from lib.config import ConfigError
from lib.flame.model import FlameModel
from lib.flame.safe_pickle import load_pickle
from lib.flame.synthetic import (
    EXPRESSION_NAMES, EYE_RADIUS, N_EXPR, N_SHAPE, SHAPE_NAMES, build_head_model, ensure_head_model,
    INFO_FILE, generate_head_model, head_info, model_paths,
)
from lib.geometry.obj_io import read_obj

FLAME_KEYS = {"v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table"}
FLAME_REGIONS = {"eye_region", "neck", "left_eyeball", "right_eyeball", "right_ear", "left_ear",
                 "right_eye_region", "left_eye_region", "forehead", "lips", "nose", "scalp",
                 "boundary", "face"}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    out = tmp_path_factory.mktemp("head")
    paths = generate_head_model(out, seed=0)
    return {
        "paths": paths,
        "flame": load_pickle(paths["flame_model"]),
        "masks": load_pickle(paths["masks"]),
        "obj": read_obj(paths["uv_obj"]),
        "model": build_head_model(seed=0),
        "flame_model": FlameModel.from_file(paths["flame_model"], dtype=torch.float64),
    }


def _pose(head, **params) -> np.ndarray:
    """Posed vertices [V, 3] through the team's FlameModel (float64); params as [3] / [6] arrays."""
    args = {k: torch.as_tensor(np.asarray(v, dtype=np.float64))[None] for k, v in params.items()}
    with torch.no_grad():
        verts, _ = head["flame_model"](**args)
    return verts[0].numpy()


def _boundary_vertices(faces: np.ndarray) -> np.ndarray:
    """Vertices on edges that only one face uses (the mesh's open borders)."""
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    unique, counts = np.unique(edges, axis=0, return_counts=True)
    return np.unique(unique[counts == 1])


def _cross2(u: np.ndarray, w: np.ndarray) -> np.ndarray:  # [2], [..., 2] -> [...]
    return u[0] * w[..., 1] - u[1] * w[..., 0]


def _signed_area(tri: np.ndarray) -> np.ndarray:  # [F, 3, 2] -> [F]
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    return 0.5 * ((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]))


def test_files_hold_exactly_flame_pickle_layout(head):
    data, model = head["flame"], head["model"]
    n_verts = len(model.v_template)
    assert set(data) == FLAME_KEYS
    assert data["v_template"].shape == (n_verts, 3) and data["v_template"].dtype == np.float64
    assert data["f"].dtype == np.uint32 and data["f"].shape[1] == 3
    assert data["shapedirs"].shape == (n_verts, 3, 400)
    assert data["posedirs"].shape == (n_verts, 3, 36)
    assert isinstance(model.J_regressor, scipy.sparse.csc_matrix)  # what the pickle stores, as FLAME's
    assert scipy.sparse.issparse(data["J_regressor"]) and data["J_regressor"].shape == (5, n_verts)
    assert data["weights"].shape == (n_verts, 5)
    np.testing.assert_array_equal(data["kintree_table"], [[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]])
    assert set(head["masks"]) >= FLAME_REGIONS


def test_flame_model_loads_the_file_and_reproduces_the_template_at_rest(head):
    flame = head["flame_model"]
    assert (flame.n_shape, flame.n_expr) == (300, 100)
    np.testing.assert_allclose(_pose(head), head["model"].v_template, atol=1e-12)


def test_mesh_has_flame_like_size_and_head_proportions(head):
    v, f = head["model"].v_template, head["model"].faces
    assert 4000 <= len(v) <= 6500 and 8000 <= len(f) <= 13000
    assert np.array_equal(np.unique(f), np.arange(len(v)))  # no stray vertex
    skin = v[head["model"].parts["skin"]]
    face = v[head["masks"]["face"]]
    assert 0.21 < skin[:, 1].max() - face[:, 1].min() < 0.25  # crown to chin
    assert 0.13 < np.ptp(skin[head["masks"]["scalp"], 0]) < 0.17  # head width
    assert skin[:, 1].min() == pytest.approx(-0.17, abs=1e-3)  # bottom of the neck
    nose_tip = v[head["masks"]["nose"]][:, 2].max()
    assert nose_tip - v[head["masks"]["left_eye_region"]][:, 2].max() > 0.01  # a protruding nose
    ear = head["masks"]["left_ear"]
    beside = np.setdiff1d(head["model"].parts["skin"], ear)
    beside = beside[np.abs(v[beside, 1] - v[ear, 1].mean()) < 0.02]
    assert v[ear, 0].max() - v[beside, 0].max() > 0.005  # the ear sticks out of the head's side


def test_obj_matches_the_pickle_with_separate_uv_indices(head):
    obj, model = head["obj"], head["model"]
    np.testing.assert_allclose(obj["verts"], model.v_template, atol=1e-8)
    np.testing.assert_array_equal(obj["faces"], head["flame"]["f"].astype(np.int64))
    np.testing.assert_array_equal(obj["faces_uv"], model.faces_uv)
    # The back seam splits texture coordinates, not vertices: more vt than v, one 3D surface.
    assert len(obj["uvs"]) > len(obj["verts"])
    assert obj["uvs"].min() >= 0.0 and obj["uvs"].max() <= 1.0


def test_uv_triangles_neither_flip_nor_overlap_and_cover_most_of_the_square(head):
    uvs, faces_uv = head["obj"]["uvs"], head["obj"]["faces_uv"]
    tri = uvs[faces_uv]
    area = _signed_area(tri)
    assert area.min() > 1e-7  # all counter-clockwise, none degenerate
    n = 1024  # count, per sample point of the square, the triangles that contain it
    counts = np.zeros((n, n), dtype=np.int32)
    for (a, b, c) in tri:
        lo = np.floor(np.minimum(np.minimum(a, b), c) * n).astype(int)
        hi = np.ceil(np.maximum(np.maximum(a, b), c) * n).astype(int)
        us, vs = np.meshgrid((np.arange(lo[0], hi[0]) + 0.5) / n, (np.arange(lo[1], hi[1]) + 0.5) / n)
        p = np.stack([us, vs], axis=-1)
        inside = (_cross2(b - a, p - a) > 0) & (_cross2(c - b, p - b) > 0) & (_cross2(a - c, p - c) > 0)
        counts[lo[1]:hi[1], lo[0]:hi[0]] += inside
    union = (counts > 0).mean()
    assert (counts > 1).mean() < 1e-4
    assert union == pytest.approx(area.sum(), rel=0.01)
    assert union >= 0.6


def test_only_open_borders_are_neck_bottom_lip_slit_and_cavity_rim(head):
    model, masks = head["model"], head["masks"]
    border = _boundary_vertices(model.faces)
    assert set(masks["boundary"]) <= set(border)
    assert set(border) <= set(masks["boundary"]) | set(masks["mouth"])
    np.testing.assert_allclose(model.v_template[masks["boundary"], 1], -0.17, atol=1e-3)


def test_faces_point_outward(head):
    model = head["model"]
    v, f, parts = model.v_template, model.faces, model.parts
    tri = v[f]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    in_part = lambda name: np.isin(f[:, 0], parts[name])  # noqa: E731
    skin = in_part("skin")
    inside = np.array([0.0, -0.02, 0.0])
    outward = ((tri[skin].mean(1) - inside) * normal[skin]).sum(1)
    assert (outward > 0).mean() > 0.97
    volume = np.einsum("fi,fi->f", tri[skin, 0] - inside, np.cross(tri[skin, 1] - inside, tri[skin, 2] - inside)).sum() / 6
    assert volume > 0.002  # head and neck, about 3 litres
    for eye in ("left_eyeball", "right_eyeball"):
        centre = v[parts[eye]].mean(0)
        t = tri[in_part(eye)] - centre
        assert np.einsum("fi,fi->f", t[:, 0], np.cross(t[:, 1], t[:, 2])).sum() / 6 > 0.9 * 4 / 3 * np.pi * EYE_RADIUS**3
    # The cavity is seen from the open mouth: its normals face into the cup.
    cavity = in_part("mouth_cavity")
    assert (((tri[cavity].mean(1) - v[parts["mouth_cavity"]].mean(0)) * normal[cavity]).sum(1) < 0).all()


def test_cavity_and_eyeballs_sit_behind_the_skin(head):
    model = head["model"]
    v, parts = model.v_template, model.parts
    skin = v[parts["skin"]]
    for name in ("mouth_cavity", "left_eyeball", "right_eyeball"):
        part = v[parts[name]]
        # No part vertex is further forward than the skin around it (the eye's front may poke out
        # of the socket, but not past the brow and cheek).
        near = np.linalg.norm(skin[None, :, :2] - part[:, None, :2], axis=-1) < 0.02
        assert (part[:, 2] < np.where(near, skin[None, :, 2], -np.inf).max(1)).all(), name


def test_shape_and_expression_directions_fill_flame_columns(head):
    dirs = head["flame"]["shapedirs"]
    peak = np.linalg.norm(dirs, axis=1).max(0)  # [400]
    shape, expr = peak[:300], peak[300:]
    assert (shape > 0).sum() == N_SHAPE >= 50 and (expr > 0).sum() == N_EXPR >= 50
    assert (shape[:N_SHAPE] > 0).all() and (expr[:N_EXPR] > 0).all()
    assert np.all(np.diff(shape[:N_SHAPE]) <= 1e-12)  # decreasing magnitude
    assert 0.008 <= shape[0] <= 0.012 and 0.001 <= shape[N_SHAPE - 1] <= 0.004
    assert ((expr[:10] >= 0.005) & (expr[:10] <= 0.010)).all()
    assert len(SHAPE_NAMES) < N_SHAPE and len(EXPRESSION_NAMES) == 10


def test_identity_moves_eyeballs_rigidly_with_their_sockets(head):
    model = head["model"]
    for name in ("left_eyeball", "right_eyeball"):
        d = model.shapedirs[model.parts[name]][..., :N_SHAPE]  # [n, 3, K]
        np.testing.assert_allclose(d, np.broadcast_to(d[:1], d.shape), atol=1e-15)
    eye_spacing = model.shapedirs[..., SHAPE_NAMES.index("eye_spacing")]
    assert eye_spacing[model.parts["left_eyeball"][0], 0] > 0 > eye_spacing[model.parts["right_eyeball"][0], 0]


def test_skinning_weights_are_convex(head):
    w = head["flame"]["weights"]
    assert w.min() >= 0.0
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)


def test_joint_regressor_reproduces_the_joints_from_convex_weights(head):
    model = head["model"]
    reg = head["flame"]["J_regressor"].toarray()
    assert reg.min() >= 0.0
    np.testing.assert_allclose(reg.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(reg @ model.v_template, model.joints, atol=1e-10)
    root, neck, jaw, left_eye, right_eye = model.joints
    for j, eye in ((3, "left_eyeball"), (4, "right_eyeball")):
        assert set(np.flatnonzero(reg[j])) == set(model.parts[eye])
        np.testing.assert_allclose(np.linalg.norm(model.v_template[model.parts[eye]] - model.joints[j], axis=1),
                                   EYE_RADIUS, rtol=1e-9)
    assert left_eye[0] > 0.02 and right_eye[0] < -0.02
    assert root[1] < neck[1] < jaw[1] < left_eye[1]
    lips = model.v_template[head["masks"]["lips"]]
    assert abs(jaw[0]) < 1e-9 and jaw[2] < lips[:, 2].min() - 0.05 and jaw[1] > lips[:, 1].max() - 0.02


def _lip_midpoints(head):
    model = head["model"]
    v = model.v_template
    lips = np.intersect1d(head["masks"]["lips"], _boundary_vertices(model.faces))
    mid = lips[np.abs(v[lips, 0]) < 1e-9]
    assert len(mid) == 2
    return mid[np.argsort(-v[mid, 1])]  # upper, lower


def test_jaw_rotation_opens_the_mouth_and_leaves_the_cranium(head):
    upper, lower = _lip_midpoints(head)
    rest = _pose(head)
    opened = _pose(head, jaw_pose=[0.3, 0.0, 0.0])
    assert np.linalg.norm(rest[upper] - rest[lower]) < 0.002
    assert np.linalg.norm(opened[upper] - opened[lower]) > 0.02
    masks = head["masks"]
    cranium = np.concatenate([masks["scalp"], masks["forehead"], masks["eye_region"], masks["nose"],
                              masks["left_eyeball"], masks["right_eyeball"]])
    np.testing.assert_allclose(opened[cranium], rest[cranium], atol=1e-12)
    assert np.abs(opened[masks["face"]] - rest[masks["face"]]).max() > 0.02


def test_eye_rotation_turns_only_its_eyeball_rigidly(head):
    model = head["model"]
    left, right = model.parts["left_eyeball"], model.parts["right_eyeball"]
    rest = _pose(head)
    turned = _pose(head, eyes_pose=[0.0, 0.4, 0.0, 0.0, 0.0, 0.0])
    moved = np.linalg.norm(turned - rest, axis=1)
    assert moved[left].max() > 0.004
    assert moved[np.setdiff1d(np.arange(len(rest)), left)].max() < 1e-12
    pairwise = lambda p: np.linalg.norm(p[:, None] - p[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(pairwise(turned[left]), pairwise(rest[left]), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(turned[left] - model.joints[3], axis=1), EYE_RADIUS, rtol=1e-9)
    assert right.size and moved[right].max() == 0.0


@pytest.mark.parametrize("name", EXPRESSION_NAMES)
def test_named_expression_is_localised(head, name):
    model, masks = head["model"], head["masks"]
    v = model.v_template
    d = model.shapedirs[..., 300 + EXPRESSION_NAMES.index(name)]
    moved = np.flatnonzero(np.linalg.norm(d, axis=1) > 0.0)
    assert set(moved) <= set(masks["face"])  # never scalp, ears, neck, eyeballs
    eye_y = model.joints[3, 1]
    if name.startswith("blink"):
        side = "left" if name.endswith("left") else "right"
        assert set(moved) <= set(masks[f"{side}_eye_region"])
        assert d[moved, 1].mean() < 0  # the upper lid region comes down
    elif name in ("brow_raise", "frown"):
        assert v[moved, 1].min() > eye_y - 0.01 and not set(moved) & set(masks["lips"])
        assert np.sign(d[moved, 1].mean()) == (1 if name == "brow_raise" else -1)
    else:  # actions of the mouth, cheeks and nose
        assert v[moved, 1].max() < eye_y
        assert not set(moved) & (set(masks["eye_region"]) | set(masks["forehead"]))
    expected = {"smile": (1, 1), "sneer": (1, 1), "pucker": (2, 1), "lip_press": (2, -1)}
    if name in expected:
        axis, sign = expected[name]
        assert np.sign(d[moved, axis].mean()) == sign


def test_pose_correctives_are_small_and_absent_for_the_eyes(head):
    posedirs = head["flame"]["posedirs"]
    assert 0.0 < np.abs(posedirs).max() < 0.005
    assert np.abs(posedirs[..., 18:]).max() == 0.0  # eye joints
    assert np.abs(posedirs[..., :9]).max() > 0 and np.abs(posedirs[..., 9:18]).max() > 0


def test_masks_cover_their_regions(head):
    model, masks = head["model"], head["masks"]
    v = model.v_template
    for name in ("left_eyeball", "right_eyeball"):
        np.testing.assert_array_equal(masks[name], model.parts[name])
        joint = 3 if name.startswith("left") else 4
        np.testing.assert_array_equal(np.flatnonzero(model.weights[:, joint] == 1.0), model.parts[name])
    np.testing.assert_array_equal(masks["boundary"], np.intersect1d(_boundary_vertices(model.faces),
                                                                     np.flatnonzero(v[:, 1] < -0.16)))
    assert not set(masks["neck"]) & set(masks["face"])
    assert set(masks["boundary"]) <= set(masks["neck"])
    assert v[masks["neck"], 1].mean() < v[masks["face"], 1].min()
    assert v[masks["scalp"], 1].mean() > v[masks["face"], 1].mean()
    assert v[masks["scalp"], 2].mean() < v[masks["face"], 2].mean()
    for side, sign in (("left", 1), ("right", -1)):
        for region in (f"{side}_ear", f"{side}_eye_region"):
            assert (np.sign(v[masks[region], 0]) == sign).all(), region
    assert set(masks["eye_region"]) == set(masks["left_eye_region"]) | set(masks["right_eye_region"])
    for region in ("lips", "nose", "eye_region", "forehead"):
        assert set(masks[region]) <= set(masks["face"]), region
    assert set(masks["mouth"]) == set(masks["lips"]) | set(model.parts["mouth_cavity"])
    assert not set(masks["scalp"]) & (set(masks["face"]) | set(masks["neck"]) | set(masks["left_ear"]))


def test_generation_is_deterministic_per_seed(head, tmp_path):
    again = generate_head_model(tmp_path / "again", seed=0)
    for key, path in head["paths"].items():
        assert path.read_bytes() == again[key].read_bytes(), key
    other = build_head_model(seed=1)
    np.testing.assert_array_equal(other.v_template, head["model"].v_template)
    assert not np.array_equal(other.shapedirs, head["model"].shapedirs)


def test_ensure_generates_missing_files_only(tmp_path):
    out = tmp_path / "head"
    paths = ensure_head_model(out, seed=0)
    assert paths == model_paths(out) and all(p.is_file() for p in paths.values())
    stamps = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    ensure_head_model(out, seed=0)
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == stamps  # nothing rewritten
    paths["masks"].unlink()
    ensure_head_model(out, seed=0)
    assert paths["masks"].is_file()
    assert sorted(os.listdir(out)) == sorted([p.name for p in paths.values()] + [INFO_FILE])  # no temporary left
    assert head_info(out) == {"seed": 0, "mouth": "cavity"}
    with pytest.raises(ConfigError, match="synthetic.head_mouth"):  # the other mouth is another folder
        ensure_head_model(out, seed=0, mouth="open")
