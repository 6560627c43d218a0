"""Rotation conversions: axis-angle, 3x3 matrices and unit quaternions.

Conventions, for the whole project:
- Quaternions are ordered **wxyz** (scalar first, gsplat's order) and follow the
  Hamilton product, so ``quat_to_matrix(quat_multiply(a, b)) == R(a) @ R(b)``.
- Matrices act on column vectors: ``p' = R @ p``.
- Axis-angle is a 3-vector whose direction is the axis and whose norm is the angle in
  radians (right-handed).

Every function works on any batch shape ``[...]``, device and floating dtype, and is
differentiable everywhere, including at the identity rotation.
"""

import torch
from torch import Tensor

# Below this squared angle the Taylor series are exact to float64 precision
# (the first dropped term is ~theta^4 / 120 < 1e-14).
_SMALL_ANGLE_SQ = 1e-6


def _skew(v: Tensor) -> Tensor:  # [..., 3] -> [..., 3, 3]
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack(
        [zero, -z, y, z, zero, -x, -y, x, zero], dim=-1
    ).reshape(v.shape[:-1] + (3, 3))


def axis_angle_to_matrix(axis_angle: Tensor) -> Tensor:
    """Rodrigues' formula: R = I + A(θ) K + B(θ) K², K = skew(axis_angle).

    axis_angle: Tensor  # [..., 3]
    returns:    Tensor  # [..., 3, 3]

    A = sin θ / θ and B = (1 - cos θ) / θ² are evaluated from θ² through their Taylor
    series near zero, so the value and the gradient at θ = 0 are exact (no ε added to
    the norm, no NaN).
    """
    theta_sq = (axis_angle * axis_angle).sum(-1, keepdim=True)[..., None]  # [..., 1, 1]
    small = theta_sq < _SMALL_ANGLE_SQ
    # The unused branch still enters autograd: keep its input away from sqrt(0).
    theta = torch.sqrt(torch.where(small, torch.ones_like(theta_sq), theta_sq))
    half = 0.5 * theta
    a = torch.where(small, 1.0 - theta_sq / 6.0, torch.sin(theta) / theta)
    # 2 sin²(θ/2) / θ² avoids the cancellation of 1 - cos θ in float32.
    b = torch.where(small, 0.5 - theta_sq / 24.0, 0.5 * (torch.sin(half) / half) ** 2)
    k = _skew(axis_angle)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + a * k + b * (k @ k)


def quat_to_matrix(quat: Tensor) -> Tensor:
    """Rotation matrix of a wxyz quaternion; need not be normalised (uses 2 / |q|²).

    quat:    Tensor  # [..., 4]
    returns: Tensor  # [..., 3, 3]
    """
    w, x, y, z = quat.unbind(-1)
    s = 2.0 / (quat * quat).sum(-1)
    m = [
        1 - s * (y * y + z * z), s * (x * y - w * z), s * (x * z + w * y),
        s * (x * y + w * z), 1 - s * (x * x + z * z), s * (y * z - w * x),
        s * (x * z - w * y), s * (y * z + w * x), 1 - s * (x * x + y * y),
    ]
    return torch.stack(m, dim=-1).reshape(quat.shape[:-1] + (3, 3))


def matrix_to_quat(matrix: Tensor) -> Tensor:
    """Unit wxyz quaternion of a rotation matrix, with w >= 0.

    matrix:  Tensor  # [..., 3, 3]
    returns: Tensor  # [..., 4]

    Each of the four components can anchor the conversion (divide by 4·|that
    component|); the largest one is used so the division is always well conditioned
    (Shepperd's method).
    """
    m = matrix
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # 4w², 4x², 4y², 4z² from the diagonal.
    sq = torch.stack([
        1 + m00 + m11 + m22,
        1 + m00 - m11 - m22,
        1 - m00 + m11 - m22,
        1 - m00 - m11 + m22,
    ], dim=-1)
    d_zy = m[..., 2, 1] - m[..., 1, 2]  # 4wx
    d_xz = m[..., 0, 2] - m[..., 2, 0]  # 4wy
    d_yx = m[..., 1, 0] - m[..., 0, 1]  # 4wz
    s_xy = m[..., 1, 0] + m[..., 0, 1]  # 4xy
    s_xz = m[..., 0, 2] + m[..., 2, 0]  # 4xz
    s_yz = m[..., 1, 2] + m[..., 2, 1]  # 4yz
    # Row i holds 4·q_i·q, so dividing by 2·sqrt(4 q_i²) gives ±q.
    candidates = torch.stack([
        torch.stack([sq[..., 0], d_zy, d_xz, d_yx], -1),
        torch.stack([d_zy, sq[..., 1], s_xy, s_xz], -1),
        torch.stack([d_xz, s_xy, sq[..., 2], s_yz], -1),
        torch.stack([d_yx, s_xz, s_yz, sq[..., 3]], -1),
    ], dim=-2)  # [..., 4, 4]
    # The chosen anchor has 4q_i² >= 1; the clamp only keeps unchosen rows finite.
    denom = 2.0 * torch.sqrt(sq.clamp_min(0.1))[..., None]
    quats = candidates / denom
    best = sq.argmax(-1)[..., None, None].expand(sq.shape[:-1] + (1, 4))
    quat = torch.gather(quats, -2, best).squeeze(-2)
    quat = torch.where(quat[..., :1] < 0, -quat, quat)
    return normalize_quat(quat)


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product a ⊗ b of wxyz quaternions (rotation b first, then a).

    a, b:    Tensor  # [..., 4] (broadcastable)
    returns: Tensor  # [..., 4]
    """
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], dim=-1)


def normalize_quat(quat: Tensor, eps: float = 1e-12) -> Tensor:
    """quat / |quat|, the norm clamped at eps so a zero quaternion gives no NaN.

    quat:    Tensor  # [..., 4]
    returns: Tensor  # [..., 4]
    """
    return quat / torch.linalg.vector_norm(quat, dim=-1, keepdim=True).clamp_min(eps)


def matrix_to_axis_angle(matrix: Tensor) -> Tensor:
    """Axis-angle (angle in [0, π]) of a rotation matrix, through its quaternion.

    matrix:  Tensor  # [..., 3, 3]
    returns: Tensor  # [..., 3]
    """
    quat = matrix_to_quat(matrix)  # w >= 0, so the angle 2·atan2(|v|, w) is <= π
    w, v = quat[..., :1], quat[..., 1:]
    n_sq = (v * v).sum(-1, keepdim=True)
    small = n_sq < _SMALL_ANGLE_SQ
    n = torch.sqrt(torch.where(small, torch.ones_like(n_sq), n_sq))
    # Series of 2·atan2(n, w) / n for small n; the dropped term is O(n⁴).
    series = (2.0 / w) * (1.0 - n_sq / (3.0 * w * w))
    scale = torch.where(small, series, 2.0 * torch.atan2(n, w) / n)
    return v * scale
