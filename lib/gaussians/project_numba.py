"""Projection of 3D Gaussians to the image on the CPU in native code (numba), with its gradient.

The same function as gsplat 1.5.3's pure-PyTorch reference (`_quat_scale_to_covar_preci` then
`_fully_fused_projection`, pinhole), written per Gaussian so that 12k Gaussians cost a fraction of
a millisecond instead of some forty small batched torch ops (and as many in the backward pass):

    R = rotmat(q / |q|),  Sigma = R diag(s)^2 R^T           (q wxyz)
    p = R_v m + t_v,      Sigma_c = R_v Sigma R_v^T         (viewmat [R_v t_v; 0 1])
    J = [[fx / z, 0, -fx x' / z^2], [0, fy / z, -fy y' / z^2]],
        x' = z clamp(x / z, -lim_x-, lim_x+) (likewise y'; lim = the image's half-extent + 30%)
    A = J Sigma_c J^T + eps2d I,  conic = (A11, -A01, A00) / det A (det clamped at 1e-10)
    mean2d = K[:2] p / z,  depth = z
    radius = ceil(3.33 sqrt(diag A)), 0 unless near < z < far and the box touches the image.

Computed in float64, returned in the inputs' dtype.
"""

import math

import numpy as np
import torch
from numba import njit
from torch import Tensor

from lib.gaussians.render_numba import run_threads


@njit(cache=True, error_model="numpy", inline="always")
def _mm(a, b, out):
    """out = a b for small matrices, in plain loops into a scratch array (numba's @ goes through
    BLAS and allocates: most of the time at 3x3)."""
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            acc = 0.0
            for k in range(a.shape[1]):
                acc += a[i, k] * b[k, j]
            out[i, j] = acc
    return out


@njit(cache=True, error_model="numpy", inline="always")
def _rotmat(w, x, y, z):
    return (
        1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y),
        2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x),
        2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y),
    )


@njit(cache=True, error_model="numpy", inline="always")
def _unit_quat(quats, n):
    w, x, y, z = (np.float64(quats[n, 0]), np.float64(quats[n, 1]), np.float64(quats[n, 2]),
                  np.float64(quats[n, 3]))
    norm = max(math.sqrt(w * w + x * x + y * y + z * z), 1e-12)  # F.normalize's eps
    return w / norm, x / norm, y / norm, z / norm, norm


@njit(cache=True, error_model="numpy", inline="always")
def _covar(quats, scales, n, m, cov):
    """World covariance Sigma = M M^T, M = R diag(s), into cov and m (3x3 each)."""
    w, x, y, z, _ = _unit_quat(quats, n)
    r = _rotmat(w, x, y, z)
    for i in range(3):
        for j in range(3):
            m[i, j] = r[3 * i + j] * scales[n, j]
    for i in range(3):
        for j in range(3):
            cov[i, j] = m[i, 0] * m[j, 0] + m[i, 1] * m[j, 1] + m[i, 2] * m[j, 2]


@njit(cache=True, error_model="numpy", inline="always")
def _to_camera(viewmats, cam, means, g, cov, tmp, p, cov_c):
    """Gaussian g's mean (into p [3]) and world covariance cov (into cov_c [3, 3]) in camera cam's frame;
    tmp: [3, 3] scratch. -> the camera's rotation [3, 3]"""
    rv = viewmats[cam, :3, :3]
    for i in range(3):
        p[i] = rv[i, 0] * means[g, 0] + rv[i, 1] * means[g, 1] + rv[i, 2] * means[g, 2] + viewmats[cam, i, 3]
    _mm(_mm(rv, cov, tmp), rv.T, cov_c)
    return rv


@njit(cache=True, error_model="numpy", inline="always")
def _lims(Ks, cam, width, height):
    fx, fy, cx, cy = Ks[cam, 0, 0], Ks[cam, 1, 1], Ks[cam, 0, 2], Ks[cam, 1, 2]
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    return (cx / fx + 0.3 * tan_x, (width - cx) / fx + 0.3 * tan_x,
            cy / fy + 0.3 * tan_y, (height - cy) / fy + 0.3 * tan_y)


@njit(nogil=True, cache=True, error_model="numpy")
def _project(lo, hi, means, quats, scales, viewmats, Ks, width, height, eps2d, near, far, radii, means2d, depths,
             conics):
    """Gaussians lo..hi-1 into the outputs."""
    n_cams = viewmats.shape[0]
    m, cov, tmp, cov_c, p = np.empty((3, 3)), np.empty((3, 3)), np.empty((3, 3)), np.empty((3, 3)), np.empty(3)
    for g in range(lo, hi):
        _covar(quats, scales, g, m, cov)
        for cam in range(n_cams):
            rv = _to_camera(viewmats, cam, means, g, cov, tmp, p, cov_c)
            tx, ty, tz = p[0], p[1], p[2]
            lxn, lxp, lyn, lyp = _lims(Ks, cam, width, height)
            txc = tz * min(max(tx / tz, -lxn), lxp)
            tyc = tz * min(max(ty / tz, -lyn), lyp)
            fx, fy = Ks[cam, 0, 0], Ks[cam, 1, 1]
            j00, j02 = fx / tz, -fx * txc / (tz * tz)
            j11, j12 = fy / tz, -fy * tyc / (tz * tz)
            # A = J Sigma_c J^T with J = [[j00, 0, j02], [0, j11, j12]]
            a00 = j00 * (j00 * cov_c[0, 0] + j02 * cov_c[2, 0]) + j02 * (j00 * cov_c[0, 2] + j02 * cov_c[2, 2]) + eps2d
            a01 = j00 * (j11 * cov_c[0, 1] + j12 * cov_c[0, 2]) + j02 * (j11 * cov_c[2, 1] + j12 * cov_c[2, 2])
            a11 = j11 * (j11 * cov_c[1, 1] + j12 * cov_c[2, 1]) + j12 * (j11 * cov_c[1, 2] + j12 * cov_c[2, 2]) + eps2d
            det = max(a00 * a11 - a01 * a01, 1e-10)
            conics[cam, g, 0] = a11 / det
            conics[cam, g, 1] = -a01 / det
            conics[cam, g, 2] = a00 / det
            mx = (Ks[cam, 0, 0] * tx + Ks[cam, 0, 1] * ty + Ks[cam, 0, 2] * tz) / tz
            my = (Ks[cam, 1, 0] * tx + Ks[cam, 1, 1] * ty + Ks[cam, 1, 2] * tz) / tz
            means2d[cam, g, 0] = mx
            means2d[cam, g, 1] = my
            depths[cam, g] = tz
            rx = math.ceil(3.33 * math.sqrt(a00)) if a00 > 0 else 0.0
            ry = math.ceil(3.33 * math.sqrt(a11)) if a11 > 0 else 0.0
            ok = near < tz < far and mx + rx > 0 and mx - rx < width and my + ry > 0 and my - ry < height
            radii[cam, g, 0] = np.int32(rx) if ok else 0
            radii[cam, g, 1] = np.int32(ry) if ok else 0


@njit(nogil=True, cache=True, error_model="numpy")
def _project_backward(lo, hi, means, quats, scales, viewmats, Ks, width, height, eps2d, v_means2d, v_depths,
                      v_conics, v_means, v_quats, v_scales, v_view):
    """Reverse mode of _project for Gaussians lo..hi-1. v_view [N, C, 12]: each Gaussian's share
    of d/d viewmat[:3, :4]."""
    n_cams = viewmats.shape[0]
    m_mat, cov, cov_c, v_cov = np.empty((3, 3)), np.empty((3, 3)), np.empty((3, 3)), np.empty((3, 3))
    v_cov_c, v_rv, v_m = np.empty((3, 3)), np.empty((3, 3)), np.empty((3, 3))
    t33, u33 = np.empty((3, 3)), np.empty((3, 3))
    jac, t23, v_jac = np.zeros((2, 3)), np.empty((2, 3)), np.empty((2, 3))
    a, v_a, t32 = np.empty((2, 2)), np.empty((2, 2)), np.empty((3, 2))
    p, v_p, vm, v_r = np.empty(3), np.empty(3), np.empty(3), np.empty(9)
    for g in range(lo, hi):
        _covar(quats, scales, g, m_mat, cov)
        v_cov[:] = 0.0  # d/d Sigma (world), summed over cameras
        vm[:] = 0.0
        for cam in range(n_cams):
            rv = _to_camera(viewmats, cam, means, g, cov, t33, p, cov_c)
            tx, ty, tz = p[0], p[1], p[2]
            lxn, lxp, lyn, lyp = _lims(Ks, cam, width, height)
            ux, uy = tx / tz, ty / tz
            x_in, y_in = -lxn <= ux <= lxp, -lyn <= uy <= lyp  # torch.clamp passes gradient on the bounds
            txc = tz * min(max(ux, -lxn), lxp)
            tyc = tz * min(max(uy, -lyn), lyp)
            fx, fy = Ks[cam, 0, 0], Ks[cam, 1, 1]
            jac[0, 0], jac[0, 2] = fx / tz, -fx * txc / (tz * tz)
            jac[1, 1], jac[1, 2] = fy / tz, -fy * tyc / (tz * tz)
            _mm(_mm(jac, cov_c, t23), jac.T, a)
            a00, a01, a11 = a[0, 0] + eps2d, a[0, 1], a[1, 1] + eps2d
            det_raw = a00 * a11 - a01 * a01
            det = max(det_raw, 1e-10)
            # conic = (a11, -a01, a00) / det; dL/dA as a symmetric 2x2 (off-diagonal split evenly)
            va, vb, vc = v_conics[cam, g, 0], v_conics[cam, g, 1], v_conics[cam, g, 2]
            v_det = -(va * a11 - vb * a01 + vc * a00) / (det * det) if det_raw > 1e-10 else 0.0
            v_a[0, 0] = vc / det + v_det * a11
            v_a[1, 1] = va / det + v_det * a00
            v_a[0, 1] = v_a[1, 0] = 0.5 * (-vb / det - v_det * 2.0 * a01)
            # A = J Sigma_c J^T: dSigma_c = J^T dA J, dJ = 2 dA J Sigma_c
            _mm(_mm(jac.T, v_a, t32), jac, v_cov_c)
            _mm(_mm(v_a, jac, t23), cov_c, v_jac)
            v_jac *= 2.0
            v_p[0], v_p[1], v_p[2] = 0.0, 0.0, v_depths[cam, g]
            # mean2d = K[:2] p / z
            vmx, vmy = v_means2d[cam, g, 0], v_means2d[cam, g, 1]
            for i in range(3):
                v_p[i] += (vmx * Ks[cam, 0, i] + vmy * Ks[cam, 1, i]) / tz
            num_x = Ks[cam, 0, 0] * tx + Ks[cam, 0, 1] * ty + Ks[cam, 0, 2] * tz
            num_y = Ks[cam, 1, 0] * tx + Ks[cam, 1, 1] * ty + Ks[cam, 1, 2] * tz
            v_p[2] -= (vmx * num_x + vmy * num_y) / (tz * tz)
            # J's entries: fx / z, -fx x' / z^2, fy / z, -fy y' / z^2 with x' = z clamp(x / z)
            v_p[2] += -fx / (tz * tz) * v_jac[0, 0] + 2.0 * fx * txc / tz ** 3 * v_jac[0, 2]
            v_p[2] += -fy / (tz * tz) * v_jac[1, 1] + 2.0 * fy * tyc / tz ** 3 * v_jac[1, 2]
            v_txc = -fx / (tz * tz) * v_jac[0, 2]
            v_tyc = -fy / (tz * tz) * v_jac[1, 2]
            if x_in:
                v_p[0] += v_txc  # x' = z (x / z)
            else:
                v_p[2] += v_txc * min(max(ux, -lxn), lxp)
            if y_in:
                v_p[1] += v_tyc
            else:
                v_p[2] += v_tyc * min(max(uy, -lyn), lyp)
            # Sigma_c = R_v Sigma R_v^T, p = R_v m + t_v
            v_cov += _mm(_mm(rv.T, v_cov_c, t33), rv, u33)
            _mm(_mm(v_cov_c, rv, t33), cov.T, v_rv)
            v_rv += _mm(_mm(v_cov_c.T, rv, t33), cov, u33)
            for i in range(3):
                vm[i] += rv[0, i] * v_p[0] + rv[1, i] * v_p[1] + rv[2, i] * v_p[2]
                for j in range(3):
                    v_view[g, cam, 4 * i + j] = v_rv[i, j] + v_p[i] * means[g, j]
                v_view[g, cam, 4 * i + 3] = v_p[i]
        for i in range(3):
            v_means[g, i] = vm[i]
        # Sigma = M M^T, M = R diag(s)
        v_cov += v_cov.T.copy()
        _mm(v_cov, m_mat, v_m)
        w, x, y, z, norm = _unit_quat(quats, g)
        r = _rotmat(w, x, y, z)
        for i in range(3):
            for j in range(3):
                v_r[3 * i + j] = v_m[i, j] * scales[g, j]
        for j in range(3):
            v_scales[g, j] = v_m[0, j] * r[j] + v_m[1, j] * r[3 + j] + v_m[2, j] * r[6 + j]
        v00, v01, v02, v10, v11, v12, v20, v21, v22 = v_r[0], v_r[1], v_r[2], v_r[3], v_r[4], v_r[5], v_r[6], v_r[7], v_r[8]
        vw = 2.0 * (-z * v01 + y * v02 + z * v10 - x * v12 - y * v20 + x * v21)
        vx = 2.0 * (y * v01 + z * v02 + y * v10 - 2.0 * x * v11 - w * v12 + z * v20 + w * v21 - 2.0 * x * v22)
        vy = 2.0 * (-2.0 * y * v00 + x * v01 + w * v02 + x * v10 + z * v12 - w * v20 + z * v21 - 2.0 * y * v22)
        vz = 2.0 * (-2.0 * z * v00 - w * v01 + x * v02 + w * v10 - 2.0 * z * v11 + y * v12 + x * v20 + y * v21)
        # q_hat = q / |q|: dq = (dq_hat - q_hat (q_hat . dq_hat)) / |q|
        dot = w * vw + x * vx + y * vy + z * vz
        v_quats[g, 0] = (vw - w * dot) / norm
        v_quats[g, 1] = (vx - x * dot) / norm
        v_quats[g, 2] = (vy - y * dot) / norm
        v_quats[g, 3] = (vz - z * dot) / norm


def _ranges(n: int) -> list[tuple[int, int]]:
    """[0, n) in one range per thread (every Gaussian costs the same)."""
    k = max(1, min(torch.get_num_threads(), n))
    bounds = [n * i // k for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _f64(t: Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).contiguous().numpy()


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, viewmats, Ks, width, height, eps2d, near, far):
        n_cams, n = viewmats.shape[0], means.shape[0]
        radii = np.zeros((n_cams, n, 2), np.int32)
        means2d, conics = np.empty((n_cams, n, 2)), np.empty((n_cams, n, 3))
        depths = np.empty((n_cams, n))
        args = [_f64(t) for t in (means, quats, scales, viewmats, Ks)]
        run_threads(lambda r: _project(*r, *args, width, height, eps2d, near, far, radii, means2d, depths, conics),
                    _ranges(n))
        ctx.save_for_backward(means, quats, scales, viewmats, Ks)
        ctx.settings = (width, height, eps2d)
        dtype = means.dtype
        radii = torch.from_numpy(radii)
        ctx.mark_non_differentiable(radii)
        return radii, *(torch.from_numpy(a).to(dtype) for a in (means2d, depths, conics))

    @staticmethod
    def backward(ctx, _v_radii, v_means2d, v_depths, v_conics):
        means, quats, scales, viewmats, Ks = ctx.saved_tensors
        width, height, eps2d = ctx.settings
        n_cams, n = viewmats.shape[0], means.shape[0]
        v_means, v_quats, v_scales = np.empty((n, 3)), np.empty((n, 4)), np.empty((n, 3))
        v_view = np.zeros((n, n_cams, 12))
        args = [_f64(t) for t in (means, quats, scales, viewmats, Ks, v_means2d, v_depths, v_conics)]
        run_threads(lambda r: _project_backward(*r, *args[:5], width, height, eps2d, *args[5:], v_means, v_quats,
                                                v_scales, v_view), _ranges(n))
        dtype = means.dtype
        v_viewmats = None
        if ctx.needs_input_grad[3]:
            v_viewmats = torch.zeros(n_cams, 4, 4, dtype=dtype)
            v_viewmats[:, :3, :] = torch.from_numpy(v_view.sum(0)).reshape(n_cams, 3, 4).to(dtype)
        grads = (torch.from_numpy(a).to(dtype) for a in (v_means, v_quats, v_scales))
        return *grads, v_viewmats, None, None, None, None, None, None


def project(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] wxyz
    scales: Tensor,  # [N, 3] linear
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3] (no gradient)
    width: int,
    height: int,
    eps2d: float,
    near: float,
    far: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> radii [C, N, 2] int, means2d [C, N, 2], depths [C, N], conics [C, N, 3] (as render_cpu.project)."""
    return _Project.apply(means, quats, scales, viewmats, Ks, width, height, eps2d, near, far)
