"""What a synthetic actor looks like beyond its tracked FLAME mesh: surface, colour and light.

The tracked mesh (the FLAME-format model posed with the written parameters) is only a proxy of
the ground truth that the images show. The ground truth adds what a tracker cannot explain:
    * fine relief: every skin vertex pushed along its normal by +-``DETAIL_DEPTH`` of
      high-frequency 3D noise (the finest structure the model's vertex spacing can carry);
    * hair volume: the scalp duplicated as a shell, offset outwards by up to the actor's hair
      thickness (1-2 cm), falling smoothly to zero at the hairline;
    * a torso: collar, shoulders and chest, fixed in the world (it does not follow the neck).
    * flyaway hair (``synthetic.hair_fringe`` > 0): a layer over the hair shell whose opacity is
      strand noise, so the images show hair the background shines through (``HairFringe``).

Colour lives in a UV texture at the head model's UV layout. Each texel knows its 3D position on
the actor's rest mesh (``rasterize_uv`` + ``interpolate``), so every pattern is a function of 3D
position and the UV seams do not show. The texture holds skin with mottling and pores, eyebrows,
red lips, irises and pupils (painted in the eyeball's rest frame, so they turn with ``eyes_pose``),
a strand-striped hair cap and a dark mouth interior with teeth. The torso's garment is painted
from its world position into its own cylindrical chart. Texture channels: RGB (sRGB, [0, 1]) and a
specular weight.

Shading is Lambertian under ``LIGHTS`` (directions fixed in the world: the head turns under them)
plus ambient and a small Blinn-Phong highlight, computed in linear light. Surfaces are two-sided.

Noise is hashed value noise on an integer lattice: deterministic on every platform and never
periodic. Region anchors (eyes, mouth, hair) come from the model's FLAME_masks regions, so the
texture follows the model it is painted on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F
from scipy.interpolate import PchipInterpolator
from torch import Tensor

from lib.geometry.rasterize import interpolate, rasterize_uv

DETAIL_DEPTH = 0.0008  # m, amplitude of the fine relief along the normal
HAIRLINE_SOFTNESS = 3  # smoothing passes over the scalp indicator: width of the hairline blend
FRINGE_GAP = 0.010  # m, how far flyaway strands stand out of the hair shell at most
# World-fixed lights: (direction towards the light, RGB intensity in linear light).
LIGHTS = (
    ((0.45, 0.45, 0.77), (0.80, 0.76, 0.70)),  # key: upper front, subject's left
    ((-0.75, 0.05, 0.66), (0.26, 0.29, 0.34)),  # fill: front right, cool
    ((0.0, 0.70, -0.71), (0.30, 0.30, 0.30)),  # rim: above and behind
)
AMBIENT = (0.22, 0.22, 0.24)
_SHININESS = 40.0
_GAMMA = 2.2


# ---------------------------------------------------------------- noise


def _hash01(ix: Tensor, iy: Tensor, iz: Tensor, seed: int) -> Tensor:
    """Integer lattice points -> uniform values in [0, 1); int64 throughout, no overflow."""
    h = (ix * 73856093 + iy * 19349663 + iz * 83492791 + seed * 2654435) & 0x7FFFFFFF
    h = ((h ^ (h >> 15)) * 739356907) & 0x7FFFFFFF
    h = ((h ^ (h >> 12)) * 695729465) & 0x7FFFFFFF
    h = h ^ (h >> 15)
    return h.to(torch.float32) / float(1 << 31)


_CORNERS = torch.tensor([[dx, dy, dz] for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)])  # [8, 3]


def value_noise(points: Tensor, frequency: float, seed: int) -> Tensor:
    """Smooth 3D value noise in [0, 1]. points: [N, 3] metres -> [N]; `frequency` in cells per metre."""
    p = points.double() * frequency
    cell = torch.floor(p)
    f = (p - cell).float()
    f = f * f * f * (f * (f * 6 - 15) + 10)  # C2 fade between lattice values
    corners = cell.long()[:, None] + _CORNERS.to(points.device)  # [N, 8, 3]
    values = _hash01(corners[..., 0], corners[..., 1], corners[..., 2], seed)  # [N, 8]
    weights = torch.where(_CORNERS.to(points.device).bool(), f[:, None], 1 - f[:, None]).prod(-1)  # [N, 8]
    return (weights * values).sum(-1)


def fbm(points: Tensor, frequency: float, octaves: int, seed: int, gain: float = 0.5) -> Tensor:
    """Fractal sum of `octaves` value-noise layers, doubling in frequency, normalised to [0, 1]. -> [N]"""
    total, norm, amp = torch.zeros(points.shape[0], device=points.device), 0.0, 1.0
    for o in range(octaves):
        total += amp * value_noise(points, frequency * 2.0**o, seed * 7919 + o * 104729)
        norm += amp
        amp *= gain
    return total / norm


def _smoothstep(edge0: float, edge1: float, x: Tensor) -> Tensor:
    t = ((x - edge0) / (edge1 - edge0)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _mix(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """a [N, C], b [C] or [N, C], t [N] -> [N, C]"""
    return a + (b - a) * t[:, None]


# ---------------------------------------------------------------- the actor's look


@dataclass(frozen=True)
class Palette:
    """An actor's colours, sRGB in [0, 1], and its hair volume."""

    skin: tuple
    hair: tuple
    iris: tuple
    lips: tuple
    garment: tuple
    hair_thickness: float  # m, shell offset on the crown


_SKIN_TONES = ((0.93, 0.76, 0.65), (0.87, 0.67, 0.53), (0.76, 0.56, 0.42), (0.58, 0.40, 0.29), (0.42, 0.28, 0.20))
_HAIR_COLOURS = ((0.09, 0.07, 0.06), (0.30, 0.19, 0.11), (0.62, 0.46, 0.26), (0.55, 0.22, 0.10), (0.55, 0.54, 0.52))
_IRIS_COLOURS = ((0.35, 0.20, 0.10), (0.25, 0.42, 0.62), (0.30, 0.45, 0.28), (0.45, 0.33, 0.16))


def actor_palette(rng: np.random.Generator) -> Palette:
    """Colours and hair volume drawn for one actor."""
    tone = np.array(_SKIN_TONES[rng.integers(len(_SKIN_TONES))]) * rng.uniform(0.96, 1.04, 3)
    lips = 0.55 * tone + 0.45 * np.array([0.72, 0.22, 0.24])
    garment = np.array([rng.uniform(0.1, 0.8) for _ in range(3)])
    as_tuple = lambda a: tuple(float(v) for v in np.clip(a, 0.0, 1.0))  # noqa: E731
    return Palette(
        skin=as_tuple(tone),
        hair=as_tuple(np.array(_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))]) * rng.uniform(0.9, 1.1)),
        iris=as_tuple(_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))]),
        lips=as_tuple(lips),
        garment=as_tuple(garment),
        hair_thickness=float(rng.uniform(0.012, 0.02)),
    )


@dataclass(frozen=True)
class HeadAnchors:
    """Where the painted features sit on the rest mesh (metres, model frame)."""

    eye_centres: Tensor  # [2, 3] left (+x), right
    eye_radius: float
    mouth_centre: Tensor  # [3]
    mouth_half_size: tuple  # (half width, half height) of the lips region
    interior_front: float  # z of the mouth interior's front rim (the lips' z without one)
    crown: Tensor  # [3] top of the head


def head_anchors(rest_verts: Tensor, masks: dict[str, np.ndarray]) -> HeadAnchors:
    """Anchors from the FLAME_masks regions of the actor's rest mesh. rest_verts: [V, 3]"""
    eyes = []
    for name in ("left_eyeball", "right_eyeball"):
        eyes.append(rest_verts[torch.as_tensor(masks[name])].mean(0))
    eyes = torch.stack(eyes)
    left = rest_verts[torch.as_tensor(masks["left_eyeball"])]
    radius = float((left - eyes[0]).norm(dim=-1).mean())
    lips = rest_verts[torch.as_tensor(masks["lips"])]
    lo, hi = lips.min(0).values, lips.max(0).values
    centre = torch.stack([0.5 * (lo[0] + hi[0]), 0.5 * (lo[1] + hi[1]), hi[2]])
    crown = rest_verts[rest_verts[:, 1].argmax()]
    interior = mouth_interior(masks)
    front = float(rest_verts[torch.as_tensor(interior), 2].max()) if len(interior) else float(hi[2])
    return HeadAnchors(eyes, radius, centre, (float(hi[0] - lo[0]) / 2, float(hi[1] - lo[1]) / 2), front, crown)


def mouth_interior(masks: dict[str, np.ndarray]) -> np.ndarray:
    """Vertices of the mouth interior: the 'mouth' region minus the lips (none without 'mouth')."""
    if "mouth" not in masks:
        return np.zeros(0, dtype=np.int64)
    return np.setdiff1d(masks["mouth"], masks["lips"])


def vertex_adjacency(faces: Tensor, n_verts: int) -> scipy.sparse.csr_matrix:
    """Row-normalised vertex adjacency [V, V] of a triangle mesh."""
    f = faces.cpu().numpy()
    rows = np.concatenate([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0]])
    cols = np.concatenate([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2]])
    adj = scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_verts, n_verts))
    adj.data[:] = 1.0
    degree = np.maximum(np.asarray(adj.sum(1)).ravel(), 1.0)
    return scipy.sparse.diags(1.0 / degree) @ adj


def hair_weight(faces: Tensor, n_verts: int, masks: dict[str, np.ndarray]) -> Tensor:
    """[V] 1 deep in the scalp, 0 off it, a smooth ramp across the hairline (0.5 on it)."""
    w = np.zeros(n_verts)
    w[masks["scalp"]] = 1.0
    adj = vertex_adjacency(faces, n_verts)
    for _ in range(HAIRLINE_SOFTNESS):
        w = 0.5 * w + 0.5 * (adj @ w)
    return torch.as_tensor(w, dtype=torch.float32)


@dataclass(frozen=True)
class GroundTruthSurface:
    """Per-vertex quantities that turn the tracked mesh into the ground-truth surface."""

    detail: Tensor  # [V] offset along the normal (m), zero off the skin
    shell_verts: Tensor  # [S] long, vertices of the hair shell (into the model's vertices)
    shell_faces: Tensor  # [Fs, 3] long, into shell_verts
    shell_faces_uv: Tensor  # [Fs, 3] long, into the model's uvs
    shell_height: Tensor  # [S] offset of each shell vertex along the normal (m)


def ground_truth_surface(rest_verts: Tensor, faces: Tensor, faces_uv: Tensor, masks: dict[str, np.ndarray],
                         palette: Palette, seed: int) -> GroundTruthSurface:
    """Relief and hair shell of one actor. rest_verts: [V, 3]; faces, faces_uv: [F, 3]"""
    n_verts = rest_verts.shape[0]
    skin = torch.ones(n_verts, dtype=torch.bool)
    for name in ("left_eyeball", "right_eyeball"):
        skin[torch.as_tensor(masks[name])] = False
    skin[torch.as_tensor(mouth_interior(masks))] = False  # the interior keeps its shape
    relief = 2.0 * fbm(rest_verts, 180.0, 3, seed + 11) - 1.0
    detail = DETAIL_DEPTH * relief / relief.abs().max().clamp(min=1e-6) * skin

    hair = hair_weight(faces, n_verts, masks)
    in_shell = hair > 0.02
    face_in = in_shell[faces].all(dim=1)
    shell_verts = torch.unique(faces[face_in])
    remap = torch.full((n_verts,), -1, dtype=torch.long)
    remap[shell_verts] = torch.arange(len(shell_verts))
    volume = 0.75 + 0.5 * fbm(rest_verts[shell_verts], 12.0, 2, seed + 13)  # uneven, fuller on top
    height = palette.hair_thickness * _smoothstep(0.5, 1.0, hair[shell_verts]) * volume
    return GroundTruthSurface(detail, shell_verts, remap[faces[face_in]], faces_uv[face_in], height)


@dataclass(frozen=True)
class HairFringe:
    """Flyaway hair: a see-through layer over the hair shell, standing up to ``FRINGE_GAP`` further out.

    Its vertices are the shell's (``GroundTruthSurface.shell_verts``), pushed along the shell's normal, so
    it moves with the head; its opacity (``fringe_opacity``) is read at each point's rest position."""

    height: Tensor  # [S] offset beyond the shell along the shell's normal (m)
    rest_points: Tensor  # [S, 3] rest-mesh position of each vertex: where its strands are read
    hair: Tensor  # [S] hair weight of each vertex (``hair_weight``)
    crown: Tensor  # [3] top of the rest head: the strands' whorl
    strength: float  # largest opacity (synthetic.hair_fringe)
    seed: int


def hair_fringe(rest_verts: Tensor, faces: Tensor, masks: dict[str, np.ndarray], surface: GroundTruthSurface,
                strength: float, seed: int) -> HairFringe:
    """The actor's flyaway layer. rest_verts: [V, 3]; faces: [F, 3]"""
    s = surface.shell_verts
    hair = hair_weight(faces, rest_verts.shape[0], masks)[s]
    points = rest_verts[s]
    # uneven, as strands lift in tufts; zero at the hairline, where the shell meets the skin
    lift = 0.4 + 0.6 * fbm(points, 30.0, 2, seed + 17)
    height = FRINGE_GAP * _smoothstep(0.5, 1.0, hair) * lift
    return HairFringe(height, points, hair, rest_verts[rest_verts[:, 1].argmax()], strength, seed)


def fringe_opacity(fringe: HairFringe, points: Tensor, hair: Tensor) -> Tensor:
    """Opacity in [0, fringe.strength] of the flyaway layer at rest points [P, 3] with hair weights [P]:
    thin strands (the hair texture's stripes, thresholded) over clear gaps, none off the scalp. -> [P]"""
    strands = _hair_strands(points, fringe.crown, fringe.seed + 19)
    return fringe.strength * _smoothstep(0.45, 0.7, strands) * _smoothstep(0.5, 0.85, hair)


def _hair_strands(points: Tensor, crown: Tensor, seed: int) -> Tensor:
    """Strand stripes [N] in [0, 1]: fine across the strands, long along them (strands run down
    and away from a whorl at the crown)."""
    d = points - crown
    azimuth = torch.atan2(d[:, 0], d[:, 2] + 0.03)
    polar = torch.atan2(torch.sqrt(d[:, 0] ** 2 + (d[:, 2] + 0.03) ** 2), -d[:, 1] + 0.01)
    ring = torch.stack([torch.cos(azimuth), torch.sin(azimuth), 0.6 * polar], dim=-1)
    return 0.65 * fbm(ring, 90.0, 3, seed) + 0.35 * fbm(ring * torch.tensor([1.0, 1.0, 0.2]), 500.0, 2, seed + 1)


def texture_colours(points: Tensor, hair: Tensor, eyeball: Tensor, interior: Tensor,
                    anchors: HeadAnchors, palette: Palette, seed: int) -> Tensor:
    """Colour of the rest surface at `points` [N, 3] given the region weights [N] (hair ramp,
    eyeball 0/1, mouth interior 0/1). -> [N, 4]: sRGB and a specular weight."""
    x, y, z = points.unbind(-1)
    t = lambda c: torch.tensor(c, dtype=torch.float32)  # noqa: E731
    n = points.shape[0]

    # Skin: base tone, blotchy mottling, redder cheeks, nose and ears, and pores.
    mottle = fbm(points, 25.0, 4, seed + 1)
    colour = t(palette.skin).expand(n, 3) * (0.90 + 0.2 * mottle)[:, None]
    redness = 0.3 * fbm(points, 60.0, 2, seed + 2)
    for cx in (0.05, -0.05):
        redness += 0.35 * torch.exp(-((x - cx) ** 2 + (y + 0.005) ** 2) / (2 * 0.018**2))
    redness = redness * (z > 0.0)
    colour = _mix(colour, colour * t((1.05, 0.82, 0.80)), redness.clamp(0, 1))
    pores = _smoothstep(0.6, 0.85, value_noise(points, 1500.0, seed + 3))
    grain = fbm(points, 400.0, 2, seed + 10)
    colour = colour * (1.0 - 0.07 * pores - 0.06 * grain)[:, None]
    spec = torch.full((n,), 0.12) * (1.0 - 0.5 * pores)

    # Lips: upper lip thinner, a cupid's bow, fine vertical furrows.
    mc, (hw, hh) = anchors.mouth_centre, anchors.mouth_half_size
    rx = (x - mc[0]) / (0.80 * hw)
    up = y > mc[1]
    bow = 0.25 * hh * torch.exp(-(rx / 0.25) ** 2)
    ry = torch.where(up, (y - mc[1] + bow) / (0.55 * hh), (y - mc[1]) / (0.70 * hh))
    lip = _smoothstep(1.05, 0.85, rx**2 + ry**2) * (z > mc[2] - 0.02)
    furrows = 0.85 + 0.15 * value_noise(points * t((1.0, 0.1, 1.0)), 1500.0, seed + 4)
    colour = _mix(colour, t(palette.lips) * furrows[:, None], lip)
    spec = spec + 0.25 * lip

    # Eyebrows: arcs above the eyes, built of short slanted strokes.
    r = anchors.eye_radius
    brows = torch.zeros(n)
    for centre, side in zip(anchors.eye_centres, (1.0, -1.0)):
        u = side * (x - centre[0]) / r  # across the face, + towards the temple
        arc = centre[1] + 1.55 * r + 0.35 * r * (1.0 - ((u - 0.3) / 1.8) ** 2)
        half = r * (0.30 - 0.07 * u).clamp(0.10, 0.35)
        band = _smoothstep(1.0, 0.6, (y - arc).abs() / half) * _smoothstep(2.2, 1.8, u) * _smoothstep(-1.6, -1.3, u)
        brows = torch.maximum(brows, band * (z > centre[2] - 0.005))
    strokes = fbm(points * t((1.0, 0.25, 1.0)), 700.0, 2, seed + 5)
    brow_ink = brows * (0.55 + 0.6 * strokes).clamp(0, 1)
    colour = _mix(colour, t(palette.hair) * 0.9, brow_ink.clamp(0, 1))

    # Hair: strand stripes, a ragged hairline.
    strands = _hair_strands(points, anchors.crown, seed + 6)
    ragged = hair + 0.25 * (fbm(points, 150.0, 2, seed + 7) - 0.5)
    cover = _smoothstep(0.42, 0.58, ragged)
    hair_rgb = t(palette.hair) * (0.55 + 0.75 * strands)[:, None]
    colour = _mix(colour, hair_rgb, cover)
    spec = spec * (1 - cover) + 0.2 * cover * strands

    # Mouth interior: dark red, darker deep inside; teeth along the upper and lower front rim.
    depth = (anchors.interior_front - z).clamp(min=0.0)
    gum = t((0.55, 0.20, 0.20)) * torch.exp(-depth / 0.03)[:, None]
    teeth = (_smoothstep(0.009, 0.006, depth) * _smoothstep(0.003, 0.005, (y - mc[1]).abs())
             * _smoothstep(0.8 * hw, 0.6 * hw, (x - mc[0]).abs()))
    gaps = 0.85 + 0.15 * torch.cos((x - mc[0]) / 0.004 * np.pi).abs()
    inner = _mix(gum, t((0.93, 0.90, 0.82)) * gaps[:, None], teeth)
    colour = _mix(colour, inner, interior)
    spec = spec * (1 - interior) + 0.3 * teeth * interior

    # Eyes, in each eyeball's rest frame (looking along +z): sclera, iris fibres, limbus, pupil.
    eye_rgb = torch.zeros(n, 3)
    for centre in anchors.eye_centres:
        d = points - centre
        mine = (d.norm(dim=-1) < 1.5 * r).float()
        dn = d / d.norm(dim=-1, keepdim=True).clamp(min=1e-9)
        theta = torch.acos(dn[:, 2].clamp(-1, 1))
        psi = torch.atan2(dn[:, 1], dn[:, 0])
        fibres = fbm(torch.stack([torch.cos(psi) * 8, torch.sin(psi) * 8, theta * 3], dim=-1), 3.0, 3, seed + 8)
        sclera = t((0.94, 0.91, 0.88)) * (0.93 + 0.07 * fbm(points, 400.0, 2, seed + 9))[:, None]
        iris = t(palette.iris) * (0.6 + 0.8 * fibres)[:, None]
        rgb = _mix(sclera.expand(n, 3), iris, _smoothstep(0.56, 0.52, theta))
        rgb = rgb * (1.0 - 0.6 * _smoothstep(0.44, 0.53, theta) * _smoothstep(0.58, 0.53, theta))[:, None]
        rgb = _mix(rgb, t((0.02, 0.02, 0.02)), _smoothstep(0.22, 0.19, theta))
        eye_rgb = eye_rgb + rgb * mine[:, None]
    colour = _mix(colour, eye_rgb, eyeball)
    spec = spec * (1 - eyeball) + 0.9 * eyeball
    return torch.cat([colour.clamp(0, 1), spec.clamp(0, 1)[:, None]], dim=-1)


def build_texture(rest_verts: Tensor, faces: Tensor, uvs: Tensor, faces_uv: Tensor,
                  masks: dict[str, np.ndarray], palette: Palette, size: int, seed: int) -> Tensor:
    """The actor's UV texture [size, size, 4] (sRGB + specular weight), row 0 at v = 1.

    Texels outside every UV chart are filled from their neighbours so that bilinear lookups at
    chart borders do not bleed in black.
    """
    n_verts = rest_verts.shape[0]
    frags = rasterize_uv(uvs, faces_uv, size)
    covered = frags.pix_to_face[0] >= 0
    eyeball = torch.zeros(n_verts)
    for name in ("left_eyeball", "right_eyeball"):
        eyeball[torch.as_tensor(masks[name])] = 1.0
    interior = torch.zeros(n_verts)
    interior[torch.as_tensor(mouth_interior(masks))] = 1.0
    hair = hair_weight(faces, n_verts, masks)
    attrs = torch.cat([rest_verts, hair[:, None], eyeball[:, None], interior[:, None]], -1)
    texel = interpolate(frags, attrs, faces)[0][covered]  # [N, 6]
    # Faces wholly on one part carry 0/1 exactly; the eyes and mouth interior are whole parts.
    region = lambda c: (texel[:, c] > 0.999).float()  # noqa: E731
    colours = texture_colours(texel[:, :3], texel[:, 3], region(4), region(5),
                              head_anchors(rest_verts, masks), palette, seed)
    texture = torch.zeros(size, size, 4)
    texture[covered] = colours
    return _fill_gutters(texture, covered)


def _fill_gutters(texture: Tensor, covered: Tensor, passes: int = 6) -> Tensor:
    """Grow the charts' colours into `passes` texels of the empty space around them."""
    img = texture.permute(2, 0, 1)[None]
    w = covered.float()[None, None]
    for _ in range(passes):
        total = F.avg_pool2d(img * w, 3, 1, 1)
        count = F.avg_pool2d(w, 3, 1, 1)
        grown = total / count.clamp(min=1e-6)
        img = torch.where(w > 0, img, grown)
        w = (count > 0).float()
    return img[0].permute(1, 2, 0).contiguous()


# ---------------------------------------------------------------- torso

# Rows of the garment, top to bottom: (y, half width, half depth, centre z, superellipse exponent).
_TORSO_ROWS = np.array([
    [-0.146, 0.065, 0.063, -0.012, 2.0],
    [-0.172, 0.069, 0.067, -0.012, 2.0],
    [-0.192, 0.095, 0.078, -0.016, 2.3],
    [-0.212, 0.140, 0.090, -0.020, 2.8],
    [-0.238, 0.180, 0.100, -0.022, 3.2],
    [-0.280, 0.200, 0.108, -0.022, 3.5],
    [-0.400, 0.205, 0.112, -0.020, 3.5],
    [-0.600, 0.200, 0.112, -0.020, 3.5],
])


@dataclass(frozen=True)
class Torso:
    """Collar, shoulders and chest around the model's neck; world frame, outward winding."""

    verts: Tensor  # [N, 3]
    faces: Tensor  # [F, 3] long
    uvs: Tensor  # [T, 2] a cylinder chart: u around, v down the body
    faces_uv: Tensor  # [F, 3] long


def torso_mesh(width_scale: float = 1.0, n_rows: int = 26, n_cols: int = 64) -> Torso:
    """The garment as a grid of superellipse rows (round at the collar, boxy at the shoulders)."""
    y = np.concatenate([np.linspace(_TORSO_ROWS[0, 0], -0.30, n_rows - 4), np.linspace(-0.34, -0.60, 4)])
    half_w, half_d, cz, expo = PchipInterpolator(-_TORSO_ROWS[:, 0], _TORSO_ROWS[:, 1:], axis=0)(-y).T
    half_w = half_w * np.where(y < -0.185, width_scale, 1.0)
    phi = 2 * np.pi * np.arange(n_cols) / n_cols
    c, s = np.cos(phi)[None], np.sin(phi)[None]
    e = 2.0 / expo[:, None]
    verts = np.stack([half_w[:, None] * np.sign(s) * np.abs(s) ** e,
                      np.repeat(y[:, None], n_cols, 1),
                      cz[:, None] + half_d[:, None] * np.sign(c) * np.abs(c) ** e], axis=-1).reshape(-1, 3)
    faces, faces_uv = [], []
    for i in range(n_rows - 1):
        for k in range(n_cols):
            a, b = i * n_cols + k, i * n_cols + (k + 1) % n_cols
            ta, tb = i * (n_cols + 1) + k, i * (n_cols + 1) + k + 1
            faces += [[a, a + n_cols, b + n_cols], [a, b + n_cols, b]]
            faces_uv += [[ta, ta + n_cols + 1, tb + n_cols + 1], [ta, tb + n_cols + 1, tb]]
    uvs = np.stack(np.meshgrid(np.arange(n_cols + 1) / n_cols, 1.0 - np.arange(n_rows) / (n_rows - 1)), -1)
    t = lambda a, dt=torch.float32: torch.as_tensor(np.asarray(a), dtype=dt)  # noqa: E731
    return Torso(t(verts), t(faces, torch.long), t(uvs.reshape(-1, 2)), t(faces_uv, torch.long))


def garment_colour(points: Tensor, palette: Palette, seed: int) -> Tensor:
    """Garment at world points [N, 3]: knit ribs, folds, a collar band. -> [N, 4] sRGB + specular"""
    base = torch.tensor(palette.garment, dtype=torch.float32)
    ribs = 0.9 + 0.1 * torch.cos(torch.atan2(points[:, 0], points[:, 2] + 0.012) * 90.0)
    folds = 0.8 + 0.35 * fbm(points * torch.tensor([1.0, 0.4, 1.0]), 20.0, 3, seed + 21)
    collar = _smoothstep(-0.180, -0.170, points[:, 1])
    tone = torch.where(collar > 0, 0.8 + 0.2 * ribs, ribs) * folds
    spec = torch.full((points.shape[0], 1), 0.04)
    return torch.cat([(base * tone[:, None]).clamp(0, 1), spec], dim=-1)


def torso_texture(torso: Torso, palette: Palette, size: int, seed: int) -> Tensor:
    """The garment painted into the torso's chart. -> [size, size, 4] (sRGB + specular weight)"""
    frags = rasterize_uv(torso.uvs, torso.faces_uv, size)
    covered = frags.pix_to_face[0] >= 0
    points = interpolate(frags, torso.verts, torso.faces)[0][covered]
    texture = torch.zeros(size, size, 4)
    texture[covered] = garment_colour(points, palette, seed)
    return _fill_gutters(texture, covered)


# ---------------------------------------------------------------- shading


def shade(face: Tensor, bary: Tensor, cam_centre: Tensor, faces: Tensor, verts: Tensor, normals: Tensor,
          faces_uv: Tensor, uvs: Tensor, texture: Tensor) -> Tensor:
    """Lit sRGB colour of visible surface points of one textured mesh.

    face [P] (face index), bary [P, 3] and cam_centre [P, 3] per point; faces, faces_uv [F, 3];
    verts, normals [V, 3] world; uvs [T, 2]; texture [S, S, 4] (row 0 at v = 1). -> [P, 3]
    """
    corner = faces[face]
    b = bary[..., None]
    point = (b * verts[corner]).sum(1)
    normal = F.normalize((b * normals[corner]).sum(1), dim=-1, eps=1e-12)
    view = F.normalize(cam_centre - point, dim=-1)
    normal = normal * torch.where((normal * view).sum(-1, keepdim=True) < 0, -1.0, 1.0)  # two-sided
    uv = (b * uvs[faces_uv[face]]).sum(1)
    grid = torch.stack([uv[:, 0] * 2 - 1, 1 - uv[:, 1] * 2], dim=-1)
    sampled = F.grid_sample(texture.permute(2, 0, 1)[None], grid[None, None], mode="bilinear",
                            padding_mode="border", align_corners=False)[0, :, 0].T  # [P, 4]
    linear = sampled[:, :3].clamp(0, 1) ** _GAMMA
    light = torch.tensor(AMBIENT).expand_as(linear)
    for direction, intensity in LIGHTS:
        d = F.normalize(torch.tensor(direction), dim=0)
        light = light + torch.tensor(intensity) * (normal @ d).clamp(min=0)[:, None]
    key = F.normalize(torch.tensor(LIGHTS[0][0]), dim=0)
    highlight = (normal * F.normalize(key + view, dim=-1)).sum(-1).clamp(min=0) ** _SHININESS
    lit = linear * light + (0.6 * sampled[:, 3] * highlight)[:, None]
    return lit.clamp(0, 1) ** (1.0 / _GAMMA)
