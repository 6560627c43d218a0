"""Wavefront OBJ read/write for triangle meshes with a UV layout.

A UV layout keeps its own index space, as FLAME's head_template.obj does: `uvs` [T, 2] are the `vt`
records and `faces_uv` [F, 3] index them per face corner (`f v/vt`). A UV seam duplicates texture
coordinates, never vertices, so T may exceed V while `faces` stays a closed index set over `verts`.
UV coordinates follow OBJ: u right, v up, both in [0, 1] for a texture image of any size.

Only geometry is read: `v`, `vt` and `f`; every other record (normals, groups, materials,
smoothing) is skipped. Polygons with more than three corners are split into a fan (c0, ci, ci+1), which keeps
their winding. Indices in the file are 1-based (negative = relative to the end, as OBJ allows);
the arrays returned and taken here are 0-based.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lib.errors import ProjectError

class ObjFormatError(ProjectError, ValueError):
    """An OBJ file this reader cannot take; the message names the file and the line."""


def write_obj(
    path: str | Path,
    verts: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3] 0-based vertex indices
    uvs: np.ndarray | None = None,  # [T, 2]
    faces_uv: np.ndarray | None = None,  # [F, 3] 0-based indices into uvs
) -> None:
    """Write a triangle mesh, with its UV layout when `uvs` and `faces_uv` are given.

    Coordinates are written with 9 significant digits (below a nanometre for a head in metres).
    """
    verts = np.asarray(verts, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if verts.ndim != 2 or verts.shape[1] != 3:
        raise ValueError(f"verts must be [V, 3], got {verts.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must be [F, 3], got {faces.shape}")
    if (uvs is None) != (faces_uv is None):
        raise ValueError("give both uvs and faces_uv, or neither")
    if faces.size and (faces.min() < 0 or faces.max() >= len(verts)):
        raise ValueError(f"faces index vertices outside [0, {len(verts)})")
    lines = [f"v {x:.9g} {y:.9g} {z:.9g}" for x, y, z in verts.tolist()]
    if uvs is None:
        lines += [f"f {a} {b} {c}" for a, b, c in (faces + 1).tolist()]
    else:
        uvs = np.asarray(uvs, dtype=np.float64)
        faces_uv = np.asarray(faces_uv, dtype=np.int64)
        if uvs.ndim != 2 or uvs.shape[1] != 2:
            raise ValueError(f"uvs must be [T, 2], got {uvs.shape}")
        if faces_uv.shape != faces.shape:
            raise ValueError(f"faces_uv must match faces {faces.shape}, got {faces_uv.shape}")
        if faces_uv.size and (faces_uv.min() < 0 or faces_uv.max() >= len(uvs)):
            raise ValueError(f"faces_uv index uvs outside [0, {len(uvs)})")
        lines += [f"vt {u:.9g} {v:.9g}" for u, v in uvs.tolist()]
        corners = np.stack([faces + 1, faces_uv + 1], axis=-1).reshape(-1, 6).tolist()
        lines += [f"f {a}/{ta} {b}/{tb} {c}/{tc}" for a, ta, b, tb, c, tc in corners]
    Path(path).write_text("\n".join(lines) + "\n")


def read_obj(path: str | Path) -> dict[str, np.ndarray | None]:
    """Read a mesh: dict(verts [V, 3] float64, faces [F, 3] int64, uvs [T, 2] float64 or None,
    faces_uv [F, 3] int64 or None). `uvs`/`faces_uv` are None when the faces carry no `vt` index.

    Raises ObjFormatError (file and line) for malformed records, indices out of range, or faces
    that mix corners with and without texture indices.
    """
    path = Path(path)
    verts: list[list[float]] = []
    uvs: list[list[float]] = []
    faces: list[list[int]] = []
    faces_uv: list[list[int]] = []
    with_uv: bool | None = None

    def fail(lineno: int, what: str) -> ObjFormatError:
        return ObjFormatError(f"{path}:{lineno}: {what}")

    def resolve(token: str, count: int, lineno: int, kind: str) -> int:
        try:
            index = int(token)
        except ValueError:
            raise fail(lineno, f"{kind} index {token!r} is not an integer") from None
        if index == 0:
            raise fail(lineno, f"{kind} index 0 (OBJ indices start at 1)")
        resolved = index - 1 if index > 0 else count + index
        if not 0 <= resolved < count:
            raise fail(lineno, f"{kind} index {index} refers past the {count} {kind} records read so far")
        return resolved

    if not path.is_file():
        raise ObjFormatError(f"{path}: no such file (actor.flame_uv names the head model's template OBJ)")
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for lineno, raw in enumerate(fh, start=1):
            parts = raw.split("#", 1)[0].split()
            if not parts:
                continue
            tag, args = parts[0], parts[1:]
            if tag == "v":
                if len(args) < 3:
                    raise fail(lineno, f"vertex needs 3 coordinates, got {len(args)}")
                try:
                    verts.append([float(a) for a in args[:3]])
                except ValueError:
                    raise fail(lineno, f"vertex coordinates {args[:3]} are not numbers") from None
            elif tag == "vt":
                if len(args) < 2:
                    raise fail(lineno, f"texture coordinate needs u and v, got {len(args)} values")
                try:
                    uvs.append([float(a) for a in args[:2]])
                except ValueError:
                    raise fail(lineno, f"texture coordinates {args[:2]} are not numbers") from None
            elif tag == "f":
                if len(args) < 3:
                    raise fail(lineno, f"face needs at least 3 corners, got {len(args)}")
                corner_v, corner_t = [], []
                for corner in args:
                    fields = corner.split("/")
                    corner_v.append(resolve(fields[0], len(verts), lineno, "vertex"))
                    has_uv = len(fields) > 1 and fields[1] != ""
                    if with_uv is None:
                        with_uv = has_uv
                    elif has_uv != with_uv:
                        raise fail(lineno, "faces mix corners with and without texture indices (v/vt and v)")
                    if has_uv:
                        corner_t.append(resolve(fields[1], len(uvs), lineno, "texture"))
                for i in range(1, len(corner_v) - 1):
                    faces.append([corner_v[0], corner_v[i], corner_v[i + 1]])
                    if with_uv:
                        faces_uv.append([corner_t[0], corner_t[i], corner_t[i + 1]])
    if not verts:
        raise ObjFormatError(f"{path}: no vertices (is this an OBJ file?)")
    for kind, values in (("vertex", verts), ("texture", uvs)):
        if values and not np.isfinite(np.asarray(values)).all():
            raise ObjFormatError(f"{path}: {kind} coordinates hold NaN or infinity; the file is damaged")
    return {
        "verts": np.asarray(verts, dtype=np.float64).reshape(-1, 3),
        "faces": np.asarray(faces, dtype=np.int64).reshape(-1, 3),
        "uvs": np.asarray(uvs, dtype=np.float64).reshape(-1, 2) if with_uv else None,
        "faces_uv": np.asarray(faces_uv, dtype=np.int64).reshape(-1, 3) if with_uv else None,
    }
