"""Synthetic head model written in the FLAME file format, with a UV layout and region masks.

Stands in for FLAME (whose licence does not allow shipping it) so that the whole pipeline runs on an
embedded synthetic actor through the same code path as a real FLAME model.

Frame (FLAME's): metres, y up, the face looks towards +z, head centre near the origin. "Left" is
the subject's left, +x (FLAME's left eyeball lies at +x).

Geometry
--------
The skin is one parametric grid: azimuth phi around the vertical axis (column k; phi = 0 at the
face, +-pi at the back where the UV seam lies) times a meridian parameter s (row i; s = 0 at the
crown, s = 1 at the open bottom of the neck). Three smooth profiles (face, back, side) give the base
surface; analytic displacement fields add the brows, eye sockets, nose, lips, chin, cheeks and ears.
The crown pole is closed by a triangle fan, the mouth is a slit (the faces between the rows of the
upper and lower lip are left out) with a cup-shaped cavity behind it, and each eye is a separate
closed sphere skinned entirely to its eye joint. The grid, mapped to a rectangle of the unit square,
is also the UV chart of the skin; eyeballs and cavity get their own charts below it. Faces wind
counter-clockwise seen from outside (outward normals by the right-hand rule), as FLAME's do.

Vertex order: skin grid row by row, crown pole, mouth cavity, left eyeball, right eyeball.

Mouth (``mouth``): ``cavity`` writes the head as built. ``open`` writes a FLAME-like head, as real FLAME
is: the cavity's vertices and faces are left out, so an open hole lies between the lips with nothing
behind it; the head as built, cavity and all, is written to ``ground_truth/`` beside it, with the
indices of the kept vertices, for the synthetic actor's images (a photo shows the mouth's inside even
though the tracked mesh has none).

Model
-----
Joints as in FLAME: 0 root, 1 neck, 2 jaw, 3 left eye, 4 right eye. `shapedirs` columns 0-299 are
identity, 300-399 expression; the first `N_SHAPE` and `N_EXPR` of each are filled, the rest are
zero. Shape directions are ordered by decreasing peak displacement; the first ones are named
(`SHAPE_NAMES`), the others smooth random fields. The first expression directions are named,
localised actions (`EXPRESSION_NAMES`), the others smooth random localised fields of the face.
The template, the layout and the named directions are fixed; the seed draws only the random
directions, so every output is a pure function of the seed.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse
from scipy.interpolate import PchipInterpolator

from lib.atomic import atomic_path
from lib.config import ConfigError
from lib.geometry.obj_io import write_obj

FLAME_FILE = "flame2023.pkl"
UV_FILE = "head_template.obj"
MASKS_FILE = "FLAME_masks.pkl"
INFO_FILE = "head.json"  # how the model was made: seed and mouth
GROUND_TRUTH_DIR = "ground_truth"  # mouth 'open': the head as built, and kept_vertices.npy
KEPT_FILE = "kept_vertices.npy"
MOUTHS = ("cavity", "open")

JOINT_NAMES = ("root", "neck", "jaw", "left_eye", "right_eye")
N_SHAPE_SLOTS, N_EXPR_SLOTS = 300, 100  # FLAME 2023 layout of shapedirs' last axis
N_SHAPE, N_EXPR = 60, 60  # filled directions; the remaining slots are zero
SHAPE_NAMES = (
    "head_width", "head_length", "head_height", "jaw_width", "face_length", "nose_length",
    "cheekbones", "chin", "brow_ridge", "nose_width", "eye_spacing", "ear_size", "lip_fullness",
    "forehead_slope",
)
EXPRESSION_NAMES = (
    "smile", "brow_raise", "blink_left", "blink_right", "pucker", "cheek_puff", "mouth_stretch",
    "frown", "sneer", "lip_press",
)
EYE_RADIUS = 0.012

_ROOT_PARENT = 4294967295  # FLAME stores the root's parent as uint32(-1)
_N_AZIMUTH = 84  # grid columns (even: the grid is mirror-symmetric about x = 0)
_N_ROWS = 58  # grid rows below the crown pole
_PICKLE_PROTOCOL = 4  # plain ndarray reconstruction (protocol 5 would pickle arrays as buffers)

# Meridian profiles of the base surface, sampled at the same s: the face (z > 0) and the back
# (z < 0) in the mid-plane, and the side (x > 0), each as (z, y) or (x, y, z).
_PROFILE_S = np.array([0.0, 0.08, 0.16, 0.24, 0.32, 0.40, 0.48, 0.56, 0.64, 0.70, 0.76, 0.82, 0.90, 1.0])
_FRONT_ZY = np.array([
    [0.000, 0.120], [0.045, 0.113], [0.075, 0.093], [0.090, 0.065], [0.096, 0.035], [0.097, 0.005],
    [0.095, -0.025], [0.092, -0.052], [0.087, -0.080], [0.075, -0.102], [0.052, -0.113],
    [0.043, -0.125], [0.042, -0.148], [0.042, -0.170],
])
_BACK_ZY = np.array([
    [0.000, 0.120], [-0.050, 0.112], [-0.082, 0.090], [-0.098, 0.060], [-0.104, 0.030],
    [-0.102, 0.000], [-0.094, -0.030], [-0.080, -0.055], [-0.070, -0.075], [-0.066, -0.090],
    [-0.064, -0.105], [-0.064, -0.120], [-0.064, -0.145], [-0.064, -0.170],
])
_SIDE_XYZ = np.array([
    [0.000, 0.120, 0.000], [0.042, 0.112, 0.000], [0.064, 0.092, 0.000], [0.074, 0.064, 0.000],
    [0.077, 0.035, -0.002], [0.076, 0.005, -0.004], [0.072, -0.025, -0.006], [0.066, -0.050, -0.008],
    [0.060, -0.072, -0.010], [0.056, -0.090, -0.011], [0.053, -0.105, -0.011], [0.052, -0.120, -0.011],
    [0.052, -0.145, -0.011], [0.052, -0.170, -0.011],
])


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """0 at edge0, 1 at edge1, C1 in between (edges in either order); exactly 0/1 outside."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _bump(points: np.ndarray, centre, radii) -> np.ndarray:
    """Wendland C2 bump [N]: 1 at `centre`, exactly 0 outside the ellipsoid of half-axes `radii`.

    A compact support makes every localised field exactly zero away from its region.
    """
    r = np.sqrt((((points - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1))
    return np.where(r < 1.0, (1.0 - r) ** 4 * (4.0 * r + 1.0), 0.0)


def _row_params(n_rows: int) -> np.ndarray:
    """Meridian parameter s of each row, denser over the face where the features are."""
    s = np.linspace(0.0, 1.0, 4001)
    density = 1.0 + 1.4 * np.exp(-(((s - 0.52) / 0.16) ** 2)) - 0.4 * _smoothstep(0.75, 0.9, s)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]))])
    cdf /= cdf[-1]
    return np.interp(np.arange(1, n_rows + 1) / n_rows, cdf, s)


def _azimuths(n_cols: int) -> np.ndarray:
    """Azimuth phi of each column, from -pi (back) through 0 (face), denser over the face."""
    u = -1.0 + 2.0 * np.arange(n_cols) / n_cols
    return np.pi * u - 0.4 * np.sin(np.pi * u)


def _base_surface(phi: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Smooth head-and-neck surface [len(s), len(phi), 3] blended from the three profiles.

    Each coordinate is a quadratic in cos(phi) through the back (cos = -1), side (0) and face (+1)
    profile values, so rows are smooth closed loops and the surface is mirror-symmetric in x.
    """
    prof = lambda table: PchipInterpolator(_PROFILE_S, table, axis=0)(s)  # noqa: E731
    (zf, yf), (zb, yb) = prof(_FRONT_ZY).T, prof(_BACK_ZY).T
    xs, ys, zs = prof(_SIDE_XYZ).T
    c, sn = np.cos(phi)[None], np.sin(phi)[None]

    def blend(front, back, side):
        front, back, side = front[:, None], back[:, None], side[:, None]
        return side + 0.5 * (front - back) * c + (0.5 * (front + back) - side) * c * c

    return np.stack([xs[:, None] * sn, blend(yf, yb, ys), blend(zf, zb, zs)], axis=-1)


def _vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals [V, 3] (zero for vertices in no face)."""
    face_n = np.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
    normals = np.zeros_like(verts)
    for corner in range(3):
        np.add.at(normals, faces[:, corner], face_n)
    return normals / np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)


# Facial landmarks on the face (x, y), for the subject's left side where paired; the mouth height is
# snapped to a grid row so that the lip slit follows one.
_EYE_XY = (0.032, 0.021)
_MOUTH_Y_TARGET = -0.052
_MOUTH_HALF_WIDTH = 0.024
_NASION_Y, _NOSE_TIP_Y, _SUBNASALE_Y = 0.018, -0.022, -0.033
_EAR_YZ = (-0.010, -0.014)  # centre of the ear on the side of the head
_EAR_RADII = (0.031, 0.017)
_EYE_PROTRUSION = 0.0075  # how far the eyeball's front pokes out of the socket floor


@dataclass(frozen=True)
class _Skin:
    verts: np.ndarray  # [R, A, 3] grid, row 0 just below the crown
    pole: np.ndarray  # [3] crown vertex
    phi: np.ndarray  # [A] azimuth of each column
    s: np.ndarray  # [R] meridian parameter of each row
    mouth_row: int  # faces between rows mouth_row and mouth_row + 1 are cut at the slit
    slit_cols: np.ndarray  # [k] columns k whose quad (mouth_row, k) is left out
    mouth_y: float
    eye_centres: np.ndarray  # [2, 3] left (+x), right eyeball centre


def _grid_topology(n_rows: int, n_cols: int, skipped: set[tuple[int, int]] = frozenset()):
    """Triangles of the skin grid (vertex i * n_cols + k, crown pole last) and of its UV chart.

    The grid closes in azimuth; its chart is the unit square with u = k / n_cols and
    v = 1 - (i + 1) / n_rows, column n_cols duplicating column 0's texture coordinates at u = 1 (the
    seam at the back) and the pole at (0.5, 1). Triangles wind counter-clockwise seen from outside
    (rows run down, columns towards +x over the face) and in the chart. Quads (i, k) in `skipped`
    are left out.
    returns faces [F, 3], faces_uv [F, 3], uvs [T, 2]
    """
    pole, pole_uv = n_rows * n_cols, n_rows * (n_cols + 1)
    faces = [[pole, k, (k + 1) % n_cols] for k in range(n_cols)]
    faces_uv = [[pole_uv, k, k + 1] for k in range(n_cols)]
    for i in range(n_rows - 1):
        for k in range(n_cols):
            if (i, k) in skipped:
                continue
            a, b = i * n_cols + k, i * n_cols + (k + 1) % n_cols
            faces += [[a, a + n_cols, b + n_cols], [a, b + n_cols, b]]
            ta, tb = i * (n_cols + 1) + k, i * (n_cols + 1) + k + 1
            faces_uv += [[ta, ta + n_cols + 1, tb + n_cols + 1], [ta, tb + n_cols + 1, tb]]
    u, v = np.arange(n_cols + 1) / n_cols, 1.0 - np.arange(1, n_rows + 1) / n_rows
    grid_uv = np.stack(np.meshgrid(u, v), axis=-1)
    uvs = np.concatenate([grid_uv.reshape(-1, 2), [[0.5, 1.0]]])
    return np.asarray(faces, dtype=np.int64), np.asarray(faces_uv, dtype=np.int64), uvs


def _nose_height(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """How far the nose stands out of the face [m]: a ridge from the nasion widening to the tip,
    with a steep underside down to the subnasale."""
    t = np.clip((_NASION_Y - y) / (_NASION_Y - _NOSE_TIP_Y), 0.0, 1.0)
    height = np.where(
        y > _NASION_Y, 0.004 * _smoothstep(_NASION_Y + 0.014, _NASION_Y, y),
        np.where(y >= _NOSE_TIP_Y, 0.004 + 0.014 * t**1.6,
                 0.018 * _smoothstep(_SUBNASALE_Y, _NOSE_TIP_Y + 0.001, y)),
    )
    half_width = 0.006 + 0.009 * t
    return height * _bump(x[..., None], 0.0, 1.7 * half_width[..., None])


def _ear_radius(y: np.ndarray, z: np.ndarray, offset=(0.0, 0.0), radii=_EAR_RADII) -> np.ndarray:
    """Elliptic radius in the ear's plane (the side of the head), the ear tilted 15 degrees back;
    < 1 on the ear. `offset` moves the ellipse's centre along the ear's own (up, forward) axes."""
    tilt = np.deg2rad(15.0)
    dy, dz = y - _EAR_YZ[0], z - _EAR_YZ[1]
    up, fwd = np.cos(tilt) * dy - np.sin(tilt) * dz, np.sin(tilt) * dy + np.cos(tilt) * dz
    return np.sqrt(((up - offset[0]) / radii[0]) ** 2 + ((fwd - offset[1]) / radii[1]) ** 2)


def _front_point(grid: np.ndarray, phi: np.ndarray, xy) -> np.ndarray:
    """The point [3] of the face part of a skin grid [R, A, 3] seen at frontal position (x, y):
    inverse-distance mean of the four grid vertices nearest in x, y."""
    d = np.linalg.norm(grid[..., :2] - np.asarray(xy), axis=-1) + np.where(np.cos(phi) > 0, 0.0, 1.0)[None]
    near = np.argsort(d, axis=None, kind="stable")[:4]
    w = 1.0 / (d.flat[near] + 1e-6)
    return (grid.reshape(-1, 3)[near] * w[:, None]).sum(0) / w.sum()


def _build_skin() -> _Skin:
    """The skin grid: base surface plus facial features, lips closed onto the slit line."""
    phi, s = _azimuths(_N_AZIMUTH), _row_params(_N_ROWS)
    base = _base_surface(phi, s)
    pole = np.array([0.0, _FRONT_ZY[0, 1], 0.0])
    flat = np.concatenate([base.reshape(-1, 3), pole[None]])
    normals = _vertex_normals(flat, _grid_topology(_N_ROWS, _N_AZIMUTH)[0])[:-1].reshape(base.shape)

    front_col = _N_AZIMUTH // 2  # phi = 0
    mouth_row = int(np.flatnonzero(base[:, front_col, 1] > _MOUTH_Y_TARGET)[-1])
    mouth_y = float(base[mouth_row : mouth_row + 2, front_col, 1].mean())

    x, y = base[..., 0], base[..., 1]
    xy, axy = base[..., :2], np.stack([np.abs(x), y], axis=-1)  # axy: mirrored onto the left side
    front = _smoothstep(0.0, 0.35, np.cos(phi))[None, :]
    ez = np.array([0.0, 0.0, 1.0])
    along = lambda amount, direction: amount[..., None] * direction  # noqa: E731
    disp = np.zeros_like(base)

    # Brow ridge, cheekbones and cheeks; eye sockets, almond-shaped hollows the eyeballs will fill.
    disp += along(0.004 * _bump(axy, (0.030, 0.040), (0.030, 0.012)) * front, ez)
    disp += along(0.004 * _bump(axy, (0.050, 0.000), (0.022, 0.016)) * front, normals)
    disp += along(0.003 * _bump(axy, (0.042, -0.030), (0.025, 0.025)) * front, normals)
    disp -= along(0.012 * _bump(axy, _EYE_XY, (0.025, 0.016)) * front, normals)

    disp += along(_nose_height(x, y) * front, ez)
    alae = 0.006 * _bump(axy, (0.014, _NOSE_TIP_Y - 0.006), (0.009, 0.008)) * front
    disp += along(alae, 0.6 * ez + 0.4 * normals)

    # Lips either side of the slit, the corners tucked in; chin and the groove above it.
    disp += along(0.005 * _bump(xy, (0.0, mouth_y + 0.006), (0.027, 0.011)) * front, ez)
    disp += along(0.006 * _bump(xy, (0.0, mouth_y - 0.008), (0.025, 0.011)) * front, ez)
    disp -= along(0.002 * _bump(axy, (0.027, mouth_y), (0.008, 0.010)) * front, normals)
    disp += along(0.006 * _bump(xy, (0.0, -0.088), (0.024, 0.017)) * front, ez)
    disp -= along(0.002 * _bump(xy, (0.0, mouth_y - 0.021), (0.022, 0.006)) * front, ez)

    # Ears: flaps on the sides with a hollow (concha) in front of the canal.
    side = _smoothstep(0.3, 0.6, np.abs(np.sin(phi)))[None, :]
    z = base[..., 2]
    ear = 0.016 * _smoothstep(1.0, 0.55, _ear_radius(y, z)) - 0.008 * _smoothstep(
        1.0, 0.3, _ear_radius(y, z, offset=(-0.006, -0.002), radii=(0.012, 0.008)))
    disp += along(ear * side, normals)

    verts = base + disp
    # Close the lips: pull the two slit rows onto the mouth line, their outer neighbours half as much.
    taper = _smoothstep(_MOUTH_HALF_WIDTH + 0.010, _MOUTH_HALF_WIDTH - 0.006, np.abs(x)) * front
    for row, outer, target in ((mouth_row, mouth_row - 1, mouth_y + 0.0005),
                               (mouth_row + 1, mouth_row + 2, mouth_y - 0.0005)):
        shift = (target - verts[row, :, 1]) * taper[row]
        verts[row, :, 1] += shift
        verts[outer, :, 1] += 0.5 * shift

    mid_x = 0.5 * (verts[mouth_row, :, 0] + np.roll(verts[mouth_row, :, 0], -1))
    slit_cols = np.flatnonzero((np.abs(mid_x) < _MOUTH_HALF_WIDTH) & (np.cos(phi) > 0))

    # Eyeball centres: the eye's front pokes out of the socket floor; the right eye mirrors the left.
    floor = _front_point(verts, phi, _EYE_XY)
    centre = np.array([_EYE_XY[0], _EYE_XY[1], floor[2] - EYE_RADIUS + _EYE_PROTRUSION])
    eye_centres = np.stack([centre, centre * np.array([-1.0, 1.0, 1.0])])
    return _Skin(verts, pole, phi, s, mouth_row, slit_cols, mouth_y, eye_centres)


def _lat_long_patch(n_lon: int, thetas: np.ndarray, closed: bool):
    """Latitude-longitude patch of the unit sphere around the +z pole.

    Vertices: the pole, rings at polar angles `thetas` (n_lon each), and the -z pole when `closed`.
    Faces wind counter-clockwise seen from outside. The UV chart is the unit square: u = longitude
    (the seam's texture coordinates are duplicated, not its vertices), v = 1 - theta / theta_max.
    returns verts [N, 3], faces [F, 3], uvs [T, 2], faces_uv [F, 3]
    """
    psi = 2.0 * np.pi * np.arange(n_lon) / n_lon
    rings = np.stack([np.sin(thetas)[:, None] * np.cos(psi), np.sin(thetas)[:, None] * np.sin(psi),
                      np.repeat(np.cos(thetas)[:, None], n_lon, axis=1)], axis=-1).reshape(-1, 3)
    verts = [np.array([[0.0, 0.0, 1.0]]), rings] + ([np.array([[0.0, 0.0, -1.0]])] if closed else [])
    theta_max = np.pi if closed else thetas[-1]
    ring_uv = np.stack(np.meshgrid(np.arange(n_lon + 1) / n_lon, 1.0 - thetas / theta_max), axis=-1)
    uvs = [np.array([[0.5, 1.0]]), ring_uv.reshape(-1, 2)] + ([np.array([[0.5, 0.0]])] if closed else [])

    v_idx = lambda j, l: 1 + j * n_lon + l % n_lon  # noqa: E731
    t_idx = lambda j, l: 1 + j * (n_lon + 1) + l  # noqa: E731
    faces, faces_uv = [], []
    for l in range(n_lon):
        faces.append([0, v_idx(0, l), v_idx(0, l + 1)])
        faces_uv.append([0, t_idx(0, l), t_idx(0, l + 1)])
        for j in range(len(thetas) - 1):
            for idx, out in ((v_idx, faces), (t_idx, faces_uv)):
                a, b, c, d = idx(j, l), idx(j + 1, l), idx(j + 1, l + 1), idx(j, l + 1)
                out.extend([[a, b, c], [a, c, d]])
        if closed:
            last = len(thetas) - 1
            faces.append([v_idx(last, l), 1 + len(thetas) * n_lon, v_idx(last, l + 1)])
            faces_uv.append([t_idx(last, l), 1 + len(thetas) * (n_lon + 1), t_idx(last, l + 1)])
    return (np.concatenate(verts), np.asarray(faces, dtype=np.int64),
            np.concatenate(uvs), np.asarray(faces_uv, dtype=np.int64))


# Where each part's UV chart lies in the unit square: (u0, v0, u1, v1).
_ATLAS = {
    "skin": (0.01, 0.23, 0.99, 0.99),
    "left_eyeball": (0.01, 0.01, 0.33, 0.21),
    "right_eyeball": (0.34, 0.01, 0.66, 0.21),
    "mouth_cavity": (0.67, 0.01, 0.99, 0.21),
}
_EYE_N_LON, _EYE_N_RINGS = 16, 9
_CAVITY_N_LON, _CAVITY_N_RINGS = 16, 4
_CAVITY_RADII = np.array([0.020, 0.013, 0.030])  # half width, half height, depth
_CAVITY_INSET = 0.007  # rim behind the lips' meeting line
_CAVITY_WRAP = 0.008  # how much further back the rim lies at its sides


@dataclass(frozen=True)
class _Geometry:
    verts: np.ndarray  # [V, 3]
    faces: np.ndarray  # [F, 3]
    uvs: np.ndarray  # [T, 2]
    faces_uv: np.ndarray  # [F, 3]
    parts: dict  # part name -> vertex indices: skin (grid + pole), mouth_cavity, left/right_eyeball
    skin: _Skin


def _build_geometry() -> _Geometry:
    skin = _build_skin()
    n_rows, n_cols = skin.verts.shape[:2]
    skipped = {(skin.mouth_row, int(k)) for k in skin.slit_cols}
    skin_faces, skin_faces_uv, skin_uvs = _grid_topology(n_rows, n_cols, skipped)
    skin_verts = np.concatenate([skin.verts.reshape(-1, 3), skin.pole[None]])
    pieces = [("skin", skin_verts, skin_faces, skin_uvs, skin_faces_uv)]

    # The cavity is a half-ellipsoid cup opening forwards behind the slit; mirroring the patch in z
    # turns its normals inwards, towards the open mouth, the side a viewer sees.
    cup, cup_faces, cup_uvs, cup_faces_uv = _lat_long_patch(
        _CAVITY_N_LON, np.linspace(0.0, 0.5 * np.pi, _CAVITY_N_RINGS + 1)[1:], closed=False)
    front_col = n_cols // 2
    rim = np.array([0.0, skin.mouth_y, skin.verts[skin.mouth_row, front_col, 2] - _CAVITY_INSET])
    cup = cup * np.array([1.0, 1.0, -1.0]) * _CAVITY_RADII
    cup[:, 2] -= _CAVITY_WRAP * (cup[:, 0] / _CAVITY_RADII[0]) ** 2  # bend back with the face at the corners
    pieces.append(("mouth_cavity", cup + rim, cup_faces, cup_uvs, cup_faces_uv))

    ball, ball_faces, ball_uvs, ball_faces_uv = _lat_long_patch(
        _EYE_N_LON, np.linspace(0.0, np.pi, _EYE_N_RINGS + 2)[1:-1], closed=True)
    for name, centre in zip(("left_eyeball", "right_eyeball"), skin.eye_centres):
        pieces.append((name, ball * EYE_RADIUS + centre, ball_faces, ball_uvs, ball_faces_uv))

    verts, faces, uvs, faces_uv, parts = [], [], [], [], {}
    n_verts = n_uvs = 0
    for name, p_verts, p_faces, p_uvs, p_faces_uv in pieces:
        u0, v0, u1, v1 = _ATLAS[name]
        parts[name] = np.arange(n_verts, n_verts + len(p_verts))
        verts.append(p_verts)
        faces.append(p_faces + n_verts)
        uvs.append(np.array([u0, v0]) + p_uvs * np.array([u1 - u0, v1 - v0]))
        faces_uv.append(p_faces_uv + n_uvs)
        n_verts, n_uvs = n_verts + len(p_verts), n_uvs + len(p_uvs)
    return _Geometry(np.concatenate(verts), np.concatenate(faces), np.concatenate(uvs),
                     np.concatenate(faces_uv), parts, skin)


@dataclass(frozen=True)
class HeadModel:
    """The synthetic head in memory: FLAME's fields, the UV layout and the region masks."""

    v_template: np.ndarray  # [V, 3]
    faces: np.ndarray  # [F, 3] int64
    shapedirs: np.ndarray  # [V, 3, 400]: identity 0..299, expression 300..399
    posedirs: np.ndarray  # [V, 3, 36]: feature 9·(j-1) + 3·row + col of (R_j - I), j = 1..4
    J_regressor: scipy.sparse.csc_matrix  # [5, V], rows convex weights
    weights: np.ndarray  # [V, 5] skinning weights, rows sum to 1
    parents: np.ndarray  # [5] int64, -1 for the root
    joints: np.ndarray  # [5, 3] rest joint positions (= J_regressor @ v_template)
    uvs: np.ndarray  # [T, 2]
    faces_uv: np.ndarray  # [F, 3] int64
    masks: dict  # FLAME region name -> vertex indices (int64)
    parts: dict  # mesh part -> vertex indices: skin, mouth_cavity, left_eyeball, right_eyeball


@dataclass(frozen=True)
class _Frame:
    """Per-vertex quantities of the template that the fields below are written in."""

    pos: np.ndarray  # [V, 3]
    normal: np.ndarray  # [V, 3]
    phi: np.ndarray  # [V] skin azimuth (0 off the skin)
    s: np.ndarray  # [V] skin meridian parameter (0 off the skin)
    row: np.ndarray  # [V] skin grid row (-1 for the pole and off the skin)
    front: np.ndarray  # [V] weight: 1 over the face, 0 from the sides back and off the skin
    is_skin: np.ndarray  # [V] bool
    geo: _Geometry

    def point(self, xy) -> np.ndarray:
        """Point [3] of the template's face at frontal position (x, y)."""
        return _front_point(self.geo.skin.verts, self.geo.skin.phi, xy)


def _frame(geo: _Geometry) -> _Frame:
    n_verts, skin = len(geo.verts), geo.parts["skin"]
    n_rows, n_cols = geo.skin.verts.shape[:2]
    grid = slice(0, n_rows * n_cols)  # the skin grid comes first, the crown pole right after it
    phi, s, row = np.zeros(n_verts), np.zeros(n_verts), np.full(n_verts, -1)
    phi[grid] = np.tile(geo.skin.phi, n_rows)
    s[grid] = np.repeat(geo.skin.s, n_cols)
    row[grid] = np.repeat(np.arange(n_rows), n_cols)
    is_skin = np.zeros(n_verts, dtype=bool)
    is_skin[skin] = True
    front = np.where(is_skin, _smoothstep(0.0, 0.35, np.cos(phi)), 0.0)
    return _Frame(geo.verts, _vertex_normals(geo.verts, geo.faces), phi, s, row, front, is_skin, geo)


def _joint_positions(geo: _Geometry) -> np.ndarray:
    """Rest joints [5, 3]: root low in the neck, neck joint at the skull base, jaw hinge between
    the ears behind the mouth, eyes at the eyeball centres."""
    neck_z = 0.5 * (_FRONT_ZY[-1, 0] + _BACK_ZY[-1, 0])
    return np.array([
        [0.0, -0.135, neck_z],
        [0.0, -0.070, -0.015],
        [0.0, -0.018, 0.000],
        geo.skin.eye_centres[0],
        geo.skin.eye_centres[1],
    ])


def _convex_weights(points: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Weights [N] >= 0 summing to 1 with weights @ points == target: the least change from
    uniform weights that meets the target (the target must lie well inside the points' hull)."""
    A = np.concatenate([points.T, np.ones((1, len(points)))])  # [4, N]
    b = np.concatenate([target, [1.0]])
    w0 = np.full(len(points), 1.0 / len(points))
    w = w0 + A.T @ np.linalg.solve(A @ A.T, b - A @ w0)
    if w.min() < 0.0:
        raise RuntimeError(f"joint {target} is too far from its vertices' centroid for convex weights")
    return w


def _joint_regressor(fr: _Frame, joints: np.ndarray) -> scipy.sparse.csc_matrix:
    """[5, V] convex combinations reproducing `joints` on the template: rings of neck vertices for
    root and neck, skin at both jaw hinges for the jaw, the eyeball vertices for the eyes."""
    pos, skin = fr.pos, fr.is_skin
    near_y = lambda y, half: np.flatnonzero(skin & (np.abs(pos[:, 1] - y) < half))  # noqa: E731
    jaw = joints[2]
    groups = [
        near_y(joints[0, 1], 0.008),
        near_y(joints[1, 1], 0.006),
        np.flatnonzero(skin & (np.abs(pos[:, 1] - jaw[1]) < 0.012) & (np.abs(pos[:, 2] - jaw[2]) < 0.012)),
        fr.geo.parts["left_eyeball"],
        fr.geo.parts["right_eyeball"],
    ]
    reg = np.zeros((len(joints), len(pos)))
    for j, idx in enumerate(groups):
        reg[j, idx] = _convex_weights(pos[idx], joints[j])
    return scipy.sparse.csc_matrix(reg)


def _skinning_weights(fr: _Frame, joints: np.ndarray) -> np.ndarray:
    """[V, 5]: the jaw carries the lower lip, chin and lower cheeks with a smooth falloff (the
    lower lip rows fully, the upper lip rows not at all, so the slit opens); the rest of the head
    follows the neck joint, blending into the root down the neck; eyeballs follow their eye."""
    pos, parts, skin = fr.pos, fr.geo.parts, fr.geo.skin
    x, y, z = pos.T
    lip_rows = _smoothstep(_MOUTH_HALF_WIDTH + 0.010, _MOUTH_HALF_WIDTH - 0.004, np.abs(x)) * fr.front
    below_slit = (fr.row > skin.mouth_row).astype(float)
    cheek = _smoothstep(skin.mouth_y + 0.004, skin.mouth_y - 0.012, y)
    jaw = (lip_rows * below_slit + (1.0 - lip_rows) * cheek) \
        * _smoothstep(joints[2, 2] - 0.015, joints[2, 2] + 0.020, z) * _smoothstep(-0.135, -0.105, y)
    jaw = np.where(fr.is_skin, jaw, 0.0)
    cavity = parts["mouth_cavity"]
    jaw[cavity] = _smoothstep(skin.mouth_y + 0.003, skin.mouth_y - 0.003, y[cavity])

    weights = np.zeros((len(pos), len(JOINT_NAMES)))
    root = _smoothstep(-0.100, -0.165, y) * (1.0 - jaw)
    weights[:, 0], weights[:, 1], weights[:, 2] = root, 1.0 - jaw - root, jaw
    for j, name in ((3, "left_eyeball"), (4, "right_eyeball")):
        weights[parts[name]] = 0.0
        weights[parts[name], j] = 1.0
    return weights


def _pose_correctives(fr: _Frame, weights: np.ndarray) -> np.ndarray:
    """[V, 3, 36] small skin corrections, linear in (R - I) of the neck and jaw (none for the eyes):
    bending the neck bulges the skin of the compressed side; opening the jaw draws the stretched
    cheeks in. A rotation by angle a about an axis puts +-sin(a) into two antisymmetric entries of
    R - I, so each field is split evenly over both: [2,1]/[1,2] pitch (x), [0,2]/[2,0] yaw (y),
    [1,0]/[0,1] roll (z)."""
    posedirs = np.zeros((len(fr.pos), 3, 36))
    y = fr.pos[:, 1]
    neck_band = np.where(fr.is_skin, _bump(y[:, None], -0.105, 0.045), 0.0)
    pitch = (0.004 * neck_band * np.cos(fr.phi))[:, None] * fr.normal  # chin down: throat bulges
    lateral = (-0.003 * neck_band * np.sin(fr.phi))[:, None] * fr.normal  # the -x side bulges
    stretch = (-0.004 * 4.0 * weights[:, 2] * (1.0 - weights[:, 2]) * fr.is_skin)[:, None] * fr.normal
    entries = {(1, 2, 1): pitch, (1, 0, 2): lateral, (1, 1, 0): lateral, (2, 2, 1): stretch}
    for (joint, r, c), field in entries.items():
        posedirs[:, :, 9 * (joint - 1) + 3 * r + c] += 0.5 * field
        posedirs[:, :, 9 * (joint - 1) + 3 * c + r] -= 0.5 * field
    return posedirs


def _peak_normalised(field: np.ndarray, peak: float) -> np.ndarray:
    """`field` [V, 3] scaled so that its largest vertex displacement is `peak` metres."""
    return field * (peak / np.linalg.norm(field, axis=-1).max())


def _follow_skin(fr: _Frame, field: np.ndarray) -> np.ndarray:
    """Give the eyeballs and the mouth cavity the mean displacement of the skin around them, so
    they translate rigidly with their socket / the lips and keep their shape."""
    parts, skin = fr.geo.parts, fr.geo.skin
    anchors = (
        ("left_eyeball", fr.point(_EYE_XY), (0.025, 0.020, 0.020)),
        ("right_eyeball", fr.point((-_EYE_XY[0], _EYE_XY[1])), (0.025, 0.020, 0.020)),
        ("mouth_cavity", fr.point((0.0, skin.mouth_y)), (0.030, 0.020, 0.030)),
    )
    field = field.copy()
    for name, centre, radii in anchors:
        w = _bump(fr.pos, centre, radii) * fr.is_skin
        field[parts[name]] = (w[:, None] * field).sum(0) / w.sum()
    return field


def _shape_directions(fr: _Frame, rng: np.random.Generator) -> np.ndarray:
    """[V, 3, N_SHAPE] identity directions, peak displacement falling from 10 to 2 mm: the named
    proportions first (SHAPE_NAMES), then smooth random fields along the normal."""
    x, y, z = fr.pos.T
    mouth_y = fr.geo.skin.mouth_y
    xy, axy = fr.pos[:, :2], np.stack([np.abs(x), y], axis=-1)
    zero = np.zeros_like(x)
    front, n = fr.front, fr.normal
    head = _smoothstep(-0.14, -0.07, y)
    above_neck = _smoothstep(-0.135, -0.105, y)
    jaw = _smoothstep(mouth_y + 0.02, mouth_y - 0.01, y) * above_neck * _smoothstep(-0.03, 0.0, z)
    lower_face = _smoothstep(0.0, mouth_y - 0.02, y) * above_neck * _smoothstep(-0.02, 0.03, z)
    lips = _bump(xy, (0.0, mouth_y + 0.006), (0.027, 0.011)) \
        + _bump(xy, (0.0, mouth_y - 0.008), (0.025, 0.011))
    ear_centre = np.stack([np.sign(x) * 0.075, np.full_like(x, _EAR_YZ[0]), np.full_like(x, _EAR_YZ[1])], -1)
    ears = _smoothstep(1.3, 0.9, _ear_radius(y, z)) * _smoothstep(0.3, 0.6, np.abs(np.sin(fr.phi)))
    vec = lambda a, b, c: np.stack([a, b, c], axis=-1)  # noqa: E731
    named = [
        vec(x * head, zero, zero),  # head_width
        vec(zero, zero, (z + 0.005) * head),  # head_length
        vec(zero, y * _smoothstep(-0.02, 0.05, y), zero),  # head_height
        vec(x * jaw, zero, zero),  # jaw_width
        vec(zero, -lower_face, zero),  # face_length
        vec(zero, zero, _nose_height(x, y) * front),  # nose_length
        (_bump(axy, (0.050, 0.000), (0.026, 0.020)) * front)[:, None] * n,  # cheekbones
        (_bump(xy, (0.0, -0.088), (0.026, 0.020)) * front)[:, None] * np.array([0.0, -0.3, 1.0]),  # chin
        vec(zero, zero, _bump(axy, (0.030, 0.040), (0.032, 0.014)) * front),  # brow_ridge
        vec(x * _bump(xy, (0.0, -0.018), (0.030, 0.030)) * front, zero, zero),  # nose_width
        vec(np.sign(x) * _bump(axy, _EYE_XY, (0.030, 0.025)) * front, zero, zero),  # eye_spacing
        (fr.pos - ear_centre) * ears[:, None],  # ear_size
        vec(zero, zero, lips * front),  # lip_fullness
        vec(zero, zero, -_smoothstep(0.035, 0.08, y) * _smoothstep(0.12, 0.09, y) * front),  # forehead_slope
    ]
    skin_idx = np.flatnonzero(fr.is_skin)
    fields = [np.where(fr.is_skin[:, None], f, 0.0) for f in named]
    while len(fields) < N_SHAPE:
        centres = fr.pos[rng.choice(skin_idx, size=3)]
        sigma = rng.uniform(0.03, 0.07, size=3)
        amp = rng.normal(size=3)
        g = np.exp(-((fr.pos[:, None] - centres) ** 2).sum(-1) / (2 * sigma**2)) @ amp
        fields.append((g * fr.is_skin)[:, None] * n)
    peaks = np.linspace(0.010, 0.002, N_SHAPE)
    return np.stack([_peak_normalised(_follow_skin(fr, f), p) for f, p in zip(fields, peaks)], axis=-1)


def _expression_directions(fr: _Frame, rng: np.random.Generator) -> np.ndarray:
    """[V, 3, N_EXPR] expression directions: the named localised actions (EXPRESSION_NAMES, 5-8 mm
    peak), then random localised face fields with peaks falling from 5 to 1.5 mm. Each is a sum of
    compact bumps, exactly zero outside its region; eyeballs and cavity do not move."""
    x, y = fr.pos[:, 0], fr.pos[:, 1]
    mouth_y = fr.geo.skin.mouth_y
    pos, n = fr.pos, fr.normal
    depth = 0.03  # bumps reach this far into the head from the face, sparing the back and the ears

    def blob(xy, radii, direction):
        return _bump(pos, fr.point(xy), (*radii, depth))[:, None] * np.asarray(direction, dtype=float)

    def pair(xy, radii, direction):  # the action on the subject's left (+x) and its mirror image
        mirror = np.array([-1.0, 1.0, 1.0])
        mirrored = blob(np.array(xy) * mirror[:2], radii, np.asarray(direction) * mirror)
        return blob(xy, radii, direction) + mirrored

    lips = _bump(pos, fr.point((0.0, mouth_y)), (0.030, 0.022, depth))[:, None]
    zero, one = np.zeros_like(x), np.ones_like(x)
    vec = lambda a, b, c: np.stack([a, b, c], axis=-1)  # noqa: E731
    # Both inner brows draw towards the midline; their sideways pull fades there so they never cross.
    inner_brows = (_bump(pos, fr.point((0.016, 0.036)), (0.020, 0.016, depth))
                   + _bump(pos, fr.point((-0.016, 0.036)), (0.020, 0.016, depth)))[:, None]
    corner = (0.026, mouth_y)
    named = [
        pair(corner, (0.022, 0.020), (0.45, 0.80, -0.30))
        + pair((0.040, mouth_y + 0.025), (0.020, 0.018), (0.0, 0.5, 0.25)),  # smile
        pair((0.030, 0.042), (0.030, 0.022), (0.0, 1.0, 0.1)),  # brow_raise
        blob((_EYE_XY[0], _EYE_XY[1] + 0.009), (0.020, 0.011), (0.0, -0.8, 0.6)),  # blink_left
        blob((-_EYE_XY[0], _EYE_XY[1] + 0.009), (0.020, 0.011), (0.0, -0.8, 0.6)),  # blink_right
        lips * vec(-0.5 * x / 0.03, zero, one),  # pucker
        (_bump(pos, fr.point((0.042, mouth_y + 0.008)), (0.032, 0.030, depth))
         + _bump(pos, fr.point((-0.042, mouth_y + 0.008)), (0.032, 0.030, depth)))[:, None] * n,  # cheek_puff
        pair(corner, (0.018, 0.018), (1.0, -0.35, -0.2)),  # mouth_stretch
        inner_brows * vec(-0.5 * np.clip(x / 0.016, -1.0, 1.0), -one, 0.2 * one),  # frown
        pair((0.016, -0.024), (0.013, 0.020), (0.0, 1.0, 0.3)),  # sneer
        lips * vec(zero, -0.6 * (y - mouth_y) / 0.02, -0.6 * one),  # lip_press
    ]
    peaks = [0.008, 0.008, 0.006, 0.006, 0.007, 0.006, 0.007, 0.006, 0.005, 0.005]
    dirs = [_peak_normalised(f * fr.is_skin[:, None], p) for f, p in zip(named, peaks)]

    face = np.flatnonzero(fr.is_skin & (fr.front > 0.9) & (y > -0.095) & (y < 0.065))
    for peak in np.linspace(0.005, 0.0015, N_EXPR - len(named)):
        field = np.zeros_like(pos)
        for centre in pos[rng.choice(face, size=2)]:
            radius = rng.uniform(0.012, 0.025)
            direction = rng.normal(size=3)
            field += _bump(pos, centre, (radius, radius, radius))[:, None] * direction
        dirs.append(_peak_normalised(field * fr.is_skin[:, None], peak))
    return np.stack(dirs, axis=-1)


def _region_masks(fr: _Frame) -> dict[str, np.ndarray]:
    """FLAME's region names on this geometry: vertex indices (sorted int64) per region."""
    x, y, z = fr.pos.T
    skin, parts, mouth_y = fr.is_skin, fr.geo.parts, fr.geo.skin.mouth_y
    on_face = skin & (np.cos(fr.phi) > 0.0)
    c = np.cos(fr.phi)
    # The neck starts below the jaw line: under the chin at the front, at the nape at the back.
    neck = skin & (fr.s > 0.71 + 0.07 * c) & (fr.row >= 0)
    ears = skin & (_ear_radius(y, z) < 1.25) & (np.abs(np.sin(fr.phi)) > 0.3)
    face = skin & (c > 0.15) & (y < 0.078) & ~neck & ~ears
    ellipse = lambda cx, cy, rx, ry: ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1.0  # noqa: E731
    left_eye = on_face & ellipse(_EYE_XY[0], _EYE_XY[1], 0.030, 0.025)
    right_eye = on_face & ellipse(-_EYE_XY[0], _EYE_XY[1], 0.030, 0.025)
    lips = on_face & ellipse(0.0, mouth_y, 0.032, 0.018)
    masks = {
        "eye_region": left_eye | right_eye,
        "neck": neck,
        "left_eyeball": np.isin(np.arange(len(x)), parts["left_eyeball"]),
        "right_eyeball": np.isin(np.arange(len(x)), parts["right_eyeball"]),
        "right_ear": ears & (x < 0),
        "left_ear": ears & (x > 0),
        "right_eye_region": right_eye,
        "left_eye_region": left_eye,
        "forehead": face & (y > 0.046),
        "lips": lips,
        "nose": on_face & ellipse(0.0, -0.008, 0.022, 0.032),
        # Where hair grows: above the hairline, and over the back and upper sides down to the neck.
        "scalp": skin & ~face & ~neck & ~ears & ((y > 0.02) | (c < -0.2)),
        "boundary": fr.row == fr.geo.skin.verts.shape[0] - 1,
        "face": face,
        "mouth": lips | np.isin(np.arange(len(x)), parts["mouth_cavity"]),
    }
    return {name: np.flatnonzero(m).astype(np.int64) for name, m in masks.items()}


def build_head_model(seed: int = 0) -> HeadModel:
    """The synthetic head model in memory; depends only on `seed` (which draws the random shape and
    expression directions)."""
    rng = np.random.default_rng(seed)
    geo = _build_geometry()
    fr = _frame(geo)
    joints = _joint_positions(geo)
    weights = _skinning_weights(fr, joints)
    shapedirs = np.zeros((len(geo.verts), 3, N_SHAPE_SLOTS + N_EXPR_SLOTS))
    shapedirs[..., :N_SHAPE] = _shape_directions(fr, rng)
    shapedirs[..., N_SHAPE_SLOTS : N_SHAPE_SLOTS + N_EXPR] = _expression_directions(fr, rng)
    return HeadModel(
        v_template=geo.verts,
        faces=geo.faces,
        shapedirs=shapedirs,
        posedirs=_pose_correctives(fr, weights),
        J_regressor=_joint_regressor(fr, joints),
        weights=weights,
        parents=np.array([-1, 0, 1, 1, 1], dtype=np.int64),
        joints=joints,
        uvs=geo.uvs,
        faces_uv=geo.faces_uv,
        masks=_region_masks(fr),
        parts=geo.parts,
    )


def flame_dict(model: HeadModel) -> dict[str, np.ndarray | scipy.sparse.csc_matrix]:
    """The model as FLAME's pickle holds it (chumpy arrays replaced by plain numpy)."""
    parents = np.where(model.parents < 0, _ROOT_PARENT, model.parents).astype(np.int64)
    return {
        "v_template": model.v_template.astype(np.float64),
        "f": model.faces.astype(np.uint32),
        "shapedirs": model.shapedirs.astype(np.float64),
        "posedirs": model.posedirs.astype(np.float64),
        "J_regressor": model.J_regressor,
        "weights": model.weights.astype(np.float64),
        "kintree_table": np.stack([parents, np.arange(len(parents), dtype=np.int64)]),
    }


def without_cavity(model: HeadModel) -> tuple[HeadModel, np.ndarray]:
    """The FLAME-like head: the mouth cavity's vertices and faces left out, every field reindexed (the
    joint regressor never reads the cavity, so the joints and every kept vertex pose exactly as before).
    -> (model, indices of the kept vertices in the full model)"""
    n = len(model.v_template)
    keep = np.ones(n, dtype=bool)
    keep[model.parts["mouth_cavity"]] = False
    if model.J_regressor[:, ~keep].count_nonzero():
        raise RuntimeError("the joint regressor reads the mouth cavity: removing it would move the joints")
    kept = np.flatnonzero(keep)
    new_index = np.full(n, -1, dtype=np.int64)
    new_index[kept] = np.arange(len(kept))
    face_kept = keep[model.faces].all(1)
    reindex = lambda ids: new_index[np.asarray(ids)[keep[np.asarray(ids)]]]  # noqa: E731
    return HeadModel(
        v_template=model.v_template[kept],
        faces=new_index[model.faces[face_kept]],
        shapedirs=model.shapedirs[kept],
        posedirs=model.posedirs[kept],
        J_regressor=scipy.sparse.csc_matrix(model.J_regressor[:, kept]),
        weights=model.weights[kept],
        parents=model.parents,
        joints=model.joints,
        uvs=model.uvs,
        faces_uv=model.faces_uv[face_kept],
        masks={name: reindex(ids) for name, ids in model.masks.items()},
        parts={name: reindex(ids) for name, ids in model.parts.items() if name != "mouth_cavity"},
    ), kept


def model_paths(out_dir: str | Path) -> dict[str, Path]:
    """The files of a generated model: 'flame_model' (FLAME pickle), 'uv_obj' (template with UVs),
    'masks' (FLAME_masks-style pickle)."""
    out_dir = Path(out_dir)
    return {"flame_model": out_dir / FLAME_FILE, "uv_obj": out_dir / UV_FILE, "masks": out_dir / MASKS_FILE}


def _write_model(model: HeadModel, out_dir: Path) -> dict[str, Path]:
    paths = model_paths(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, content in (("flame_model", flame_dict(model)), ("masks", model.masks)):
        with atomic_path(paths[key]) as tmp, open(tmp, "wb") as fh:
            pickle.dump(content, fh, protocol=_PICKLE_PROTOCOL)
    with atomic_path(paths["uv_obj"], suffix=".obj") as tmp:
        write_obj(tmp, model.v_template, model.faces, model.uvs, model.faces_uv)
    return paths


def generate_head_model(out_dir: str | Path, seed: int = 0, mouth: str = "cavity") -> dict[str, Path]:
    """Write the model's three files into `out_dir` (created if needed) and return their paths; with
    mouth 'open', the FLAME-like head there and the head as built in ``ground_truth/``.

    Each file is written atomically (``lib.atomic``), and ``head.json`` last, so an interrupted run
    leaves only whole files (and `ensure_head_model` regenerates whatever is missing).
    """
    if mouth not in MOUTHS:
        raise ValueError(f"mouth '{mouth}': one of {MOUTHS}")
    out_dir = Path(out_dir)
    model = build_head_model(seed)
    if mouth == "open":
        written, kept = without_cavity(model)
        _write_model(model, out_dir / GROUND_TRUTH_DIR)
        with atomic_path(out_dir / GROUND_TRUTH_DIR / KEPT_FILE, suffix=".npy") as tmp:
            np.save(tmp, kept)
        model = written
    paths = _write_model(model, out_dir)
    with atomic_path(out_dir / INFO_FILE) as tmp:
        Path(tmp).write_text(json.dumps({"seed": seed, "mouth": mouth}) + "\n")
    return paths


def head_info(out_dir: str | Path) -> dict | None:
    """How the model in `out_dir` was made ({"seed", "mouth"}), or None without a head.json (a model
    written before it existed: mouth 'cavity')."""
    path = Path(out_dir) / INFO_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def ensure_head_model(out_dir: str | Path, seed: int = 0, mouth: str = "cavity") -> dict[str, Path]:
    """Paths of the model in `out_dir`, generating it first when any of its files is missing.

    Existing files are trusted as they are (delete the folder to regenerate with another seed); a folder
    holding the other mouth is an error, as its files would silently stand for the wrong head.
    """
    if head_model_complete(out_dir, mouth):
        return model_paths(out_dir)
    return generate_head_model(out_dir, seed, mouth)


def head_model_complete(out_dir: str | Path, mouth: str) -> bool:
    """Whether every file of the head model with this mouth is in `out_dir` (False: it must be made).
    A folder holding the other mouth is an error, as its files would silently stand for the wrong head."""
    if not all(path.is_file() for path in model_paths(out_dir).values()):
        return False
    info = head_info(out_dir) or {"mouth": "cavity"}
    if info.get("mouth", "cavity") != mouth:
        raise ConfigError(f"{out_dir} holds the synthetic head with mouth '{info.get('mouth')}', the config asks "
                          f"for '{mouth}' (synthetic.head_mouth): point synthetic.head_dir at another folder")
    return mouth != "open" or (Path(out_dir) / GROUND_TRUTH_DIR / KEPT_FILE).is_file()
