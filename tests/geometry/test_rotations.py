"""Rotation conversions against scipy, wxyz order, and exact behaviour at the identity."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from lib.geometry.rotations import (
    axis_angle_to_matrix,
    matrix_to_axis_angle,
    matrix_to_quat,
    normalize_quat,
    quat_multiply,
    quat_to_matrix,
)


def random_axis_angles(n: int, seed: int = 0) -> np.ndarray:
    """Angles spread over (0, π), plus tiny and near-π ones."""
    rng = np.random.default_rng(seed)
    axes = rng.normal(size=(n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = rng.uniform(0, np.pi, size=n)
    angles[:4] = [1e-9, 1e-5, 1e-3, np.pi - 1e-6]
    return axes * angles[:, None]


def test_axis_angle_to_matrix_matches_scipy_in_any_batch_shape():
    aa = random_axis_angles(24)
    expected = Rotation.from_rotvec(aa).as_matrix()
    got = axis_angle_to_matrix(torch.tensor(aa).reshape(2, 3, 4, 3))
    assert got.shape == (2, 3, 4, 3, 3)
    np.testing.assert_allclose(got.reshape(-1, 3, 3).numpy(), expected, atol=1e-14)


def test_axis_angle_to_matrix_float32_is_accurate_at_small_angles():
    aa = random_axis_angles(24) * np.logspace(-8, 0, 24)[:, None]
    got = axis_angle_to_matrix(torch.tensor(aa, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), Rotation.from_rotvec(aa).as_matrix(), atol=2e-7)


def test_axis_angle_to_matrix_is_differentiable_at_zero():
    zero = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(axis_angle_to_matrix, zero)  # [3, 3, 3]
    # dR/da_i at the identity is the cross-product matrix of e_i.
    expected = np.stack([np.array([[0, -e[2], e[1]], [e[2], 0, -e[0]], [-e[1], e[0], 0]])
                         for e in np.eye(3)], axis=-1)
    np.testing.assert_allclose(jac.numpy(), expected, atol=1e-15)
    for point in (torch.zeros(2, 3), torch.full((2, 3), 1e-5), torch.full((2, 3), 0.7)):
        assert torch.autograd.gradcheck(axis_angle_to_matrix,
                                        point.double().requires_grad_(True))


def test_quaternions_are_wxyz_and_match_scipy():
    aa = random_axis_angles(32, seed=1)
    matrices = torch.tensor(Rotation.from_rotvec(aa).as_matrix())
    quat = matrix_to_quat(matrices)
    xyzw = Rotation.from_rotvec(aa).as_quat()
    expected = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)
    expected *= np.sign(expected[:, :1] + 1e-300)  # scipy's sign is arbitrary; ours has w >= 0
    np.testing.assert_allclose(quat.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(quat_to_matrix(quat).numpy(), matrices.numpy(), atol=1e-12)


def test_matrix_to_quat_is_stable_near_half_turns():
    # w ≈ 0: the conversion must anchor on x, y or z instead of dividing by ~0.
    for axis in np.eye(3):
        rot = Rotation.from_rotvec(axis * (np.pi - 1e-7)).as_matrix()
        quat = matrix_to_quat(torch.tensor(rot, dtype=torch.float32))
        np.testing.assert_allclose(quat_to_matrix(quat).numpy(), rot, atol=1e-6)
        assert torch.isfinite(quat).all()


def test_matrix_to_quat_gradient_is_finite_everywhere():
    rots = torch.tensor(Rotation.from_rotvec(random_axis_angles(16, seed=2)).as_matrix())
    rots = torch.cat([rots, torch.eye(3, dtype=torch.float64)[None]]).requires_grad_(True)
    matrix_to_quat(rots).sum().backward()
    assert torch.isfinite(rots.grad).all()


def test_quat_multiply_composes_rotations_a_after_b():
    rng = np.random.default_rng(3)
    a, b = (normalize_quat(torch.tensor(rng.normal(size=(10, 4)))) for _ in range(2))
    torch.testing.assert_close(quat_to_matrix(quat_multiply(a, b)),
                               quat_to_matrix(a) @ quat_to_matrix(b))


def test_quat_to_matrix_ignores_quaternion_scale():
    q = torch.tensor([[0.3, -0.2, 0.9, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(quat_to_matrix(7.5 * q), quat_to_matrix(normalize_quat(q)))
    rot = quat_to_matrix(7.5 * q)[0]
    torch.testing.assert_close(rot @ rot.T, torch.eye(3, dtype=torch.float64))


def test_normalize_quat_keeps_zero_finite():
    q = torch.zeros(2, 4, requires_grad=True)
    out = normalize_quat(q)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    np.testing.assert_allclose(
        torch.linalg.vector_norm(normalize_quat(torch.tensor([[1.0, 2, 3, 4]])), dim=-1), 1.0)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_matrix_to_axis_angle_inverts_axis_angle_to_matrix(dtype, atol):
    aa = torch.tensor(random_axis_angles(64, seed=4), dtype=dtype)
    back = matrix_to_axis_angle(axis_angle_to_matrix(aa))
    np.testing.assert_allclose(back.double().numpy(), aa.double().numpy(), atol=atol)
    identity = torch.eye(3, dtype=dtype, requires_grad=True)
    matrix_to_axis_angle(identity).sum().backward()
    assert torch.isfinite(identity.grad).all()
