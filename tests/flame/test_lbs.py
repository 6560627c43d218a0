"""FLAME posing (blend shapes, pose correctives, kinematic chain, skinning) against an
independent float64 numpy implementation, and the geometric properties it must have."""

import numpy as np
import pytest
import torch

from lib.flame.model import FlameModel

JAW = 2


def reference_rodrigues(aa: np.ndarray) -> np.ndarray:
    """cos θ I + sin θ [k]x + (1 - cos θ) k kᵀ with the unit axis k (θ > 0 assumed)."""
    theta = np.linalg.norm(aa)
    if theta == 0.0:
        return np.eye(3)
    k = aa / theta
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.cos(theta) * np.eye(3) + np.sin(theta) * kx + (1 - np.cos(theta)) * np.outer(k, k)


def reference_flame(data: dict, n_shape: int, n_expr: int, params: dict) -> tuple:
    """One frame of FLAME in plain numpy, written from the model's definition."""
    shapedirs = np.asarray(data["shapedirs"], np.float64)
    regressor = data["J_regressor"]
    regressor = regressor.toarray() if hasattr(regressor, "toarray") else regressor
    parents = [-1, 0, 1, 1, 1]
    v = data["v_template"].copy()
    v += shapedirs[:, :, :n_shape] @ params["shape"]
    v += shapedirs[:, :, 300:300 + n_expr] @ params["expr"]
    v += params["static_offset"][: len(v)]
    joints = regressor @ v
    pose = np.concatenate([params["rotation"], params["neck_pose"], params["jaw_pose"],
                           params["eyes_pose"]]).reshape(5, 3)
    rots = [reference_rodrigues(p) for p in pose]
    feature = np.concatenate([(r - np.eye(3)).ravel() for r in rots[1:]])
    v_posed = v + np.einsum("vcp,p->vc", data["posedirs"], feature)
    world = []
    for j in range(5):
        local = np.eye(4)
        local[:3, :3] = rots[j]
        local[:3, 3] = joints[j] - (joints[parents[j]] if j else 0.0)
        world.append(local if j == 0 else world[parents[j]] @ local)
    verts = np.zeros_like(v_posed)
    for i, p in enumerate(v_posed):
        for j in range(5):
            to_rest = np.eye(4)
            to_rest[:3, 3] = -joints[j]
            verts[i] += data["weights"][i, j] * (world[j] @ to_rest @ np.append(p, 1.0))[:3]
    verts += params["translation"]
    frames = np.stack(world)
    frames[:, :3, 3] += params["translation"]
    return verts, frames


def random_params(rng, n_shape: int, n_expr: int, n_verts: int, scale: float = 0.3) -> dict:
    return {
        "shape": rng.normal(size=n_shape),
        "expr": rng.normal(size=n_expr),
        "rotation": rng.normal(scale=scale, size=3),
        "neck_pose": rng.normal(scale=scale, size=3),
        "jaw_pose": rng.normal(scale=scale, size=3),
        "eyes_pose": rng.normal(scale=scale, size=6),
        "translation": rng.normal(scale=0.1, size=3),
        "static_offset": rng.normal(scale=0.005, size=(n_verts, 3)),
    }


def batched(params_list: list[dict], dtype=torch.float64) -> dict:
    return {k: torch.tensor(np.stack([p[k] for p in params_list]), dtype=dtype)
            for k in params_list[0]}


@pytest.mark.parametrize("sparse_regressor", [False, True])
def test_forward_matches_numpy_reference_in_batch(write_flame, sparse_regressor):
    path, data = write_flame(seed=1, sparse_regressor=sparse_regressor)
    model = FlameModel.from_file(path, n_shape=300, n_expr=100, dtype=torch.float64)
    rng = np.random.default_rng(2)
    # VHAP's static_offset carries 120 teeth vertices beyond the model's.
    frames = [random_params(rng, 300, 100, 50 + 120) for _ in range(3)]
    verts, transforms = model(**batched(frames))
    for b, params in enumerate(frames):
        ref_verts, ref_frames = reference_flame(data, 300, 100, params)
        np.testing.assert_allclose(verts[b].numpy(), ref_verts, atol=1e-9)
        np.testing.assert_allclose(transforms[b].numpy(), ref_frames, atol=1e-9)


def test_reference_match_holds_in_float32(write_flame):
    path, data = write_flame(seed=3)
    model = FlameModel.from_file(path, n_shape=20, n_expr=10)
    params = random_params(np.random.default_rng(4), 20, 10, 50)
    verts, _ = model(**batched([params], dtype=torch.float32))
    assert verts.dtype == torch.float32
    np.testing.assert_allclose(verts[0].numpy(), reference_flame(data, 20, 10, params)[0],
                               atol=1e-6)


def test_zero_parameters_give_the_template(write_flame):
    path, data = write_flame(seed=5)
    model = FlameModel.from_file(path, dtype=torch.float64)
    verts, transforms = model()
    np.testing.assert_allclose(verts[0].numpy(), data["v_template"], atol=1e-12)
    rest_joints = data["J_regressor"] @ data["v_template"]
    np.testing.assert_allclose(transforms[0, :, :3, 3].numpy(), rest_joints, atol=1e-12)
    np.testing.assert_allclose(transforms[0, :, :3, :3].numpy(),
                               np.broadcast_to(np.eye(3), (5, 3, 3)))


def test_global_rotation_turns_the_head_rigidly_about_the_rest_root_joint(write_flame):
    # With only `rotation` and `translation`, every joint frame is G_0 composed with
    # identity rotations, the pose correctives vanish (they depend on joints 1-4 only),
    # and every vertex moves by R (v - J0) + J0 + t.
    path, data = write_flame(seed=6)
    model = FlameModel.from_file(path, dtype=torch.float64)
    aa = np.array([0.3, -1.1, 0.4])
    t = np.array([0.01, -0.2, 0.5])
    verts, transforms = model(rotation=torch.tensor(aa)[None], translation=torch.tensor(t)[None])
    rot = reference_rodrigues(aa)
    root = data["J_regressor"][0] @ data["v_template"]
    expected = (data["v_template"] - root) @ rot.T + root + t
    np.testing.assert_allclose(verts[0].numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(transforms[0, 0, :3, :3].numpy(), rot, atol=1e-12)
    np.testing.assert_allclose(transforms[0, 0, :3, 3].numpy(), root + t, atol=1e-12)
    # Rigid: pairwise distances kept.
    before = np.linalg.norm(data["v_template"][:, None] - data["v_template"][None], axis=-1)
    after = (verts[0, :, None] - verts[0, None]).norm(dim=-1).numpy()
    np.testing.assert_allclose(after, before, atol=1e-12)


def test_jaw_rotation_moves_only_jaw_weighted_vertices(write_flame):
    path, data = write_flame(seed=7, posedirs_scale=0.0)  # skinning only
    model = FlameModel.from_file(path, dtype=torch.float64)
    rest, _ = model()
    opened, transforms = model(jaw_pose=torch.tensor([[0.35, 0.0, 0.0]], dtype=torch.float64))
    moved = (opened - rest)[0].norm(dim=-1).numpy()
    jaw_weight = data["weights"][:, JAW]
    assert (jaw_weight == 0).sum() > 5 and (jaw_weight > 0).sum() > 5
    np.testing.assert_array_less(moved[jaw_weight == 0], 1e-12)
    assert (moved[jaw_weight > 0] > 1e-6).all()
    # The jaw turns about its own rest joint, which therefore stays put.
    rest_jaw = data["J_regressor"][JAW] @ data["v_template"]
    np.testing.assert_allclose(transforms[0, JAW, :3, 3].numpy(), rest_jaw, atol=1e-12)


def test_jaw_pose_correctives_move_vertices_through_posedirs(write_flame):
    path, data = write_flame(seed=7)
    model = FlameModel.from_file(path, dtype=torch.float64)
    no_correctives = FlameModel.from_file(write_flame(seed=7, posedirs_scale=0.0)[0],
                                          dtype=torch.float64)
    jaw = torch.tensor([[0.35, 0.0, 0.0]], dtype=torch.float64)
    difference = model(jaw_pose=jaw)[0] - no_correctives(jaw_pose=jaw)[0]
    assert difference[0, data["weights"][:, JAW] == 0].abs().max() > 1e-4


def test_shape_and_expression_are_linear_at_zero_pose(write_flame):
    path, data = write_flame(seed=8)
    model = FlameModel.from_file(path, n_shape=300, n_expr=100, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    s1, s2 = torch.randn(2, 1, 300, generator=gen, dtype=torch.float64)
    e1, e2 = torch.randn(2, 1, 100, generator=gen, dtype=torch.float64)
    template = torch.tensor(data["v_template"])[None]

    def offset(shape, expr):
        return model(shape=shape, expr=expr)[0] - template

    torch.testing.assert_close(offset(2 * s1 - 0.5 * s2, 3 * e1 + e2),
                               2 * offset(s1, 0 * e1) - 0.5 * offset(s2, 0 * e1)
                               + 3 * offset(0 * s1, e1) + offset(0 * s1, e2))
    # Expression coefficient k drives shapedirs column 300 + k.
    unit = torch.zeros(1, 100, dtype=torch.float64)
    unit[0, 7] = 1.0
    torch.testing.assert_close(offset(None, unit)[0], torch.tensor(data["shapedirs"][:, :, 307]))


def test_gradients_reach_every_parameter(write_flame):
    path, _ = write_flame(seed=9)
    model = FlameModel.from_file(path, n_shape=300, n_expr=100, dtype=torch.float64)
    params = batched([random_params(np.random.default_rng(10), 300, 100, 170)])
    # Also at exactly zero rotations, where a naive Rodrigues divides by zero.
    params["neck_pose"].zero_()
    for value in params.values():
        value.requires_grad_(True)
    verts, transforms = model(**params)
    gen = torch.Generator().manual_seed(1)
    loss = (verts * torch.randn(verts.shape, generator=gen, dtype=torch.float64)).sum() \
        + (transforms * torch.randn(transforms.shape, generator=gen, dtype=torch.float64)).sum()
    loss.backward()
    for name, value in params.items():
        assert torch.isfinite(value.grad).all(), name
        assert value.grad.abs().sum() > 0, name
    # Offsets of the teeth vertices beyond the model's are ignored.
    assert params["static_offset"].grad[:, 50:].abs().sum() == 0
