"""Faces that close the mouth of a FLAME-topology head, with their own UV chart (``actor.close_mouth``).

Real FLAME has a hole between the lips and nothing behind it: with the mouth open, no Gaussian can
stand for the teeth, tongue and dark interior a photo shows there, and a mask rasterised from the mesh
looks through the hole at the inside of the head. GEM closes the hole with extra faces; this module
builds them for any mesh that has such a hole, from its topology and template alone:

1. ``boundary_loops``: the mesh's holes, each walked in the direction opposite to its faces' own
   edges (the direction a face closing it must take). FLAME has three or more (neck, mouth, the
   eye sockets); the mouth's is the loop whose vertices lie mostly in the "lips" region.
2. ``close_loop``: the loop is cut at its two corners (the vertices of least and greatest x, the
   corners of the mouth) into the upper and the lower lip's edge, both running corner to corner, and
   the two are zipped into a strip of triangles, each chain advancing in the order of its arc length.
3. The strip gets a chart of its own in the UV layout: the largest empty rectangle of the layout with
   the mouth's aspect (``free_rectangle``), the corners at its mid-height, the upper lip along its top
   and the lower lip along its bottom, each at its arc-length fraction. Its texels become Gaussians
   like any other; they belong to the "lips" and "mouth" regions through their corners.

The faces move with the lips, so the strip opens with the jaw and collapses to a line when the lips
meet (its Gaussians then crowd the lip line; their frames stay proper rotations, ``lib.geometry.uv``).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from lib.errors import ProjectError

ASPECT = 3.0  # width : height of the mouth's UV chart
MARGIN = 2 / 256  # empty UV space kept around the chart (two texels of a 256 map)
MIN_HEIGHT = 0.02  # the smallest chart height accepted (UV units): about 5 texels of a 256 map
OCCUPANCY_SIZE = 512  # resolution of the layout's occupancy grid


class MouthError(ProjectError, ValueError):
    """The mesh has no mouth hole to close, or its UV layout has no room for the mouth's chart."""


@dataclass(frozen=True)
class MouthFaces:
    """Faces closing the mouth, to be appended to the mesh's: ``faces`` [M, 3] vertex indices;
    ``uvs`` [K, 2] new UV coordinates, to be appended to the layout's; ``faces_uv`` [M, 3] indices
    into the appended layout (offset by the layout's own count). Without a layout: faces only."""
    faces: np.ndarray
    uvs: np.ndarray | None
    faces_uv: np.ndarray | None

    def appended(self, faces, uvs, faces_uv):
        """The mesh and layout with these faces appended, as tensors. -> (faces, uvs, faces_uv)"""
        faces, uvs, faces_uv = (torch.as_tensor(np.asarray(a)) for a in (faces, uvs, faces_uv))
        return (torch.cat([faces.long(), torch.as_tensor(self.faces)]),
                torch.cat([uvs.float(), torch.as_tensor(self.uvs, dtype=torch.float32)]),
                torch.cat([faces_uv.long(), torch.as_tensor(self.faces_uv)]))


def boundary_loops(faces: np.ndarray) -> list[np.ndarray]:
    """The closed loops of boundary edges (edges of one face only), each walked opposite to the
    direction its face takes along it. -> loops of vertex indices"""
    faces = np.asarray(faces, dtype=np.int64)
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    present = {(int(a), int(b)) for a, b in directed}
    nxt: dict[int, list[int]] = defaultdict(list)
    for a, b in directed:
        if (int(b), int(a)) not in present:
            nxt[int(b)].append(int(a))  # the hole runs b -> a
    loops = []
    while nxt:
        start = next(iter(nxt))
        loop, v = [start], start
        while True:
            w = nxt[v].pop()
            if not nxt[v]:
                del nxt[v]
            if w == start:
                break
            if w not in nxt:  # an open chain: not a hole (a non-manifold mesh); dropped
                loop = None
                break
            loop.append(w)
            v = w
        if loop is not None and len(loop) >= 3:
            loops.append(np.array(loop, dtype=np.int64))
    return loops


def mouth_loop(faces: np.ndarray, regions: dict[str, np.ndarray], region: str = "lips") -> np.ndarray:
    """The hole whose vertices lie mostly in ``region``: the mouth. -> its loop (``boundary_loops``)"""
    if region not in regions:
        raise MouthError(f"the FLAME masks have no '{region}' region (they have {sorted(regions)}), so the "
                         "mouth's hole cannot be found; set actor.close_mouth: false")
    lips = set(np.asarray(regions[region]).tolist())
    scored = [(np.mean([v in lips for v in loop.tolist()]), len(loop), loop) for loop in boundary_loops(faces)]
    scored = [s for s in scored if s[0] >= 0.5]
    if not scored:
        raise MouthError(f"the mesh has no hole between the lips (no boundary loop lies mostly in the '{region}' "
                         "region): its lips are closed already; set actor.close_mouth: false")
    return max(scored, key=lambda s: (s[0], s[1]))[2]


def _arc_fraction(points: np.ndarray) -> np.ndarray:
    steps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(steps)])
    return s / s[-1] if s[-1] > 0 else np.linspace(0.0, 1.0, len(points))


def lip_chains(verts: np.ndarray, loop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The loop cut at its corners (least and greatest x) into two chains from corner to corner, the
    upper lip's first (greater mean y). Each chain holds both corners. -> (upper, lower)"""
    x = verts[loop, 0]
    a = int(np.argmin(x))
    loop = np.roll(loop, -a)  # starts at the corner of least x
    b = int(np.argmax(verts[loop, 0]))
    if b == 0:
        raise MouthError("the mouth's hole has no width in x; is the head in FLAME's frame (x to its left)?")
    first = loop[: b + 1]
    second = np.concatenate([loop[b:], loop[:1]])[::-1]
    if verts[first, 1].mean() >= verts[second, 1].mean():
        return first, second
    return second, first


def zip_chains(verts: np.ndarray, upper: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """Triangles between two chains sharing their first and last vertex, each advancing in the order
    of its arc-length fraction. -> [len(upper) + len(lower) - 4, 3] (unoriented)"""
    su, sl = _arc_fraction(verts[upper]), _arc_fraction(verts[lower])
    i = j = 0
    tris = []
    while i < len(upper) - 1 or j < len(lower) - 1:
        advance_upper = j == len(lower) - 1 or (i < len(upper) - 1 and su[i + 1] <= sl[j + 1])
        if advance_upper:
            tris.append((upper[i], upper[i + 1], lower[j]))
            i += 1
        else:
            tris.append((upper[i], lower[j + 1], lower[j]))
            j += 1
    tris = [t for t in tris if len(set(t)) == 3]  # the first and last touch a shared corner twice
    return np.array(tris, dtype=np.int64)


def free_rectangle(uvs: np.ndarray, faces_uv: np.ndarray, aspect: float = ASPECT,
                   margin: float = MARGIN) -> tuple[float, float, float, float]:
    """The largest empty axis-aligned rectangle of width = aspect x height in [0, 1]² that keeps
    ``margin`` from every UV triangle. -> (u0, v0, u1, v1)"""
    G = OCCUPANCY_SIZE
    # Every pixel a UV triangle touches is occupied (row 0 at v = 1, as lib.geometry.rasterize lays maps out).
    corners = np.asarray(uvs, dtype=np.float64)[np.asarray(faces_uv, dtype=np.int64)]  # [F, 3, 2]
    pixels = np.stack([corners[..., 0] * G, (1.0 - corners[..., 1]) * G], -1)
    occupied = np.zeros((G, G), np.uint8)
    cv2.fillPoly(occupied, list(np.round(pixels * 16).astype(np.int32)), 1, lineType=cv2.LINE_8, shift=4)
    occupied = occupied.astype(bool)
    grow = max(1, int(np.ceil(margin * G)))
    padded = np.pad(occupied, grow)
    dilated = np.zeros_like(occupied)
    for di in range(-grow, grow + 1):
        for dj in range(-grow, grow + 1):
            dilated |= padded[grow + di: grow + di + G, grow + dj: grow + dj + G]
    table = np.pad(dilated.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def fits(h: int):  # the middle one of the free positions of an h-high rectangle, or None
        w = int(round(aspect * h))
        if w > G:
            return None
        sums = table[h:, w:] - table[:-h, w:] - table[h:, :-w] + table[:-h, :-w]  # [G-h+1, G-w+1]
        free = np.argwhere(sums == 0)
        if not len(free):
            return None
        r, c = free[len(free) // 2]
        return (c / G, 1.0 - (r + h) / G, (c + w) / G, 1.0 - r / G)

    best, lo, hi = None, 1, G  # a rectangle that fits still fits when smaller: bisect on its height
    while lo <= hi:
        mid = (lo + hi) // 2
        found = fits(mid)
        if found is None:
            hi = mid - 1
        else:
            best, lo = found, mid + 1
    if best is None or best[3] - best[1] < MIN_HEIGHT:
        raise MouthError(f"the UV layout has no empty rectangle of {aspect:g}:1 at least {MIN_HEIGHT:g} high for "
                         "the mouth's faces; set actor.close_mouth: false or free some UV space")
    return best


def close_loop(verts: np.ndarray, faces: np.ndarray, loop: np.ndarray, uvs: np.ndarray | None = None,
               faces_uv: np.ndarray | None = None) -> MouthFaces:
    """Faces closing one hole (``mouth_loop``), oriented as the faces around it; with the layout (uvs,
    faces_uv), a UV chart of their own in its largest free rectangle (else ``uvs``/``faces_uv`` are None)."""
    verts = np.asarray(verts, dtype=np.float64)
    upper, lower = lip_chains(verts, loop)
    tris = zip_chains(verts, upper, lower)
    existing = {(int(a), int(b)) for f in np.asarray(faces) for a, b in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0]))}
    if any((int(t[k]), int(t[(k + 1) % 3])) in existing for t in tris for k in range(3)):
        tris = tris[:, ::-1].copy()  # a closing face runs along each shared edge against its neighbour
    if uvs is None:
        return MouthFaces(tris, None, None)

    u0, v0, u1, v1 = free_rectangle(uvs, faces_uv)
    inset = 0.5 * MARGIN
    u0, v0, u1, v1 = u0 + inset, v0 + inset, u1 - inset, v1 - inset
    su, sl = _arc_fraction(verts[upper]), _arc_fraction(verts[lower])
    corners = {int(upper[0]), int(upper[-1])}
    # one UV vertex per loop vertex: the corners at mid-height, the upper lip on top, the lower at the bottom
    chart = {}
    for chain, s_chain, v_edge in ((upper, su, v1), (lower, sl, v0)):
        for vertex, s in zip(chain.tolist(), s_chain):
            if vertex not in chart:
                chart[vertex] = (len(chart), (u0 + s * (u1 - u0), 0.5 * (v0 + v1) if vertex in corners else v_edge))
    coords = np.array([uv for _, uv in sorted(chart.values())], dtype=np.float64)
    faces_uv_new = np.array([[len(uvs) + chart[int(v)][0] for v in t] for t in tris], dtype=np.int64)
    return MouthFaces(tris, coords, faces_uv_new)


def mouth_faces(verts, faces, regions: dict[str, np.ndarray], uvs=None, faces_uv=None) -> MouthFaces:
    """The faces closing the mouth of a FLAME-topology mesh (its template ``verts``), with their UV chart
    when the layout is given. Raises MouthError where the mesh has no hole between the lips or the layout
    no room."""
    faces = np.asarray(faces, dtype=np.int64)
    layout = (None, None) if uvs is None else (np.asarray(uvs), np.asarray(faces_uv))
    return close_loop(np.asarray(verts), faces, mouth_loop(faces, regions), *layout)
