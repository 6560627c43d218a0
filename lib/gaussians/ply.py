"""Gaussians to and from the standard 3D Gaussian Splatting PLY file.

Layout (binary little endian, one float32 vertex per Gaussian, in this order):
  x y z                    mean
  nx ny nz                 zeros (unused normals)
  f_dc_0..2                SH degree-0 coefficient per channel; for RGB colours
                           (rgb - 0.5) / C0 with C0 = 0.28209479177387814
  f_rest_0..3(K-1)-1       higher SH coefficients, channel-major: all of R, then G, then B
  opacity                  logit(opacity)
  scale_0..2               log(scale)
  rot_0..3                 quaternion w, x, y, z
Read back, a file without f_rest_* gives RGB colours [N, 3] (degree-0 SH coefficients
[N, 1, 3] therefore come back as the RGB they render as) and one with them SH
coefficients [N, K, 3]. Values that the file stores directly (means, quaternions, SH
coefficients) come back bit for bit; RGB, opacity and scale go through float64 on the
way and are exact to float32 rounding.
"""

from pathlib import Path

import numpy as np
import torch

from lib.atomic import write_bytes
from lib.errors import ProjectError
from lib.gaussians.gaussians import Gaussians


class PlyFormatError(ProjectError, ValueError):
    """A PLY file this reader cannot take; the message names the file."""


SH_C0 = 0.28209479177387814

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "<i2", "int16": "<i2", "ushort": "<u2", "uint16": "<u2",
    "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4",
    "float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8",
}  # fmt: skip


def write_ply(
    path: str | Path,
    means: torch.Tensor,  # [N, 3]
    quats: torch.Tensor,  # [N, 4] wxyz
    scales: torch.Tensor,  # [N, 3] linear
    opacities: torch.Tensor,  # [N] in [0, 1]
    colors: torch.Tensor,  # [N, 3] RGB or [N, K, 3] SH coefficients
) -> None:
    """Write Gaussians to `path` atomically (a temporary file renamed into place)."""
    path = Path(path)
    tensors = (means, quats, scales, opacities, colors)
    g = Gaussians(*(t.detach() for t in tensors)).to(device="cpu", dtype=torch.float64)
    n = len(g)
    if g.colors.dim() == 2:
        dc, rest = (g.colors - 0.5) / SH_C0, torch.zeros(n, 0, dtype=torch.float64)
    else:
        dc, rest = g.colors[:, 0, :], g.colors[:, 1:, :].transpose(1, 2).reshape(n, -1)
    columns = {
        **{k: g.means[:, i] for i, k in enumerate("xyz")},
        **{k: torch.zeros(n, dtype=torch.float64) for k in ("nx", "ny", "nz")},
        **{f"f_dc_{i}": dc[:, i] for i in range(3)},
        **{f"f_rest_{i}": rest[:, i] for i in range(rest.shape[1])},
        "opacity": torch.logit(g.opacities),
        **{f"scale_{i}": torch.log(g.scales[:, i]) for i in range(3)},
        **{f"rot_{i}": g.quats[:, i] for i in range(4)},
    }
    vertices = np.empty(n, dtype=[(name, "<f4") for name in columns])
    for name, values in columns.items():
        vertices[name] = values.numpy()
    header = "ply\nformat binary_little_endian 1.0\n" f"element vertex {n}\n"
    header += "".join(f"property float {name}\n" for name in columns) + "end_header\n"

    write_bytes(path, header.encode("ascii") + vertices.tobytes())


def read_ply(path: str | Path) -> Gaussians:
    """Read a 3DGS PLY file written by us or by the 3DGS family of tools (float32 CPU tensors)."""
    path = Path(path)
    if not path.is_file():
        raise PlyFormatError(f"{path}: no such file")
    with open(path, "rb") as f:
        names, dtypes, n = _read_header(f, path)
        dtype = np.dtype(list(zip(names, dtypes)))
        data = f.read(n * dtype.itemsize)
    if len(data) < n * dtype.itemsize:
        need = n * dtype.itemsize
        raise PlyFormatError(f"{path}: truncated, {len(data)} bytes of vertex data where {n} vertices need {need}")
    vertices = np.frombuffer(data, dtype=dtype, count=n)

    required = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
    required += [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]
    missing = [name for name in required if name not in names]
    if missing:
        raise PlyFormatError(f"{path}: not a 3D Gaussian Splatting PLY, missing properties {missing}")
    n_rest = sum(name.startswith("f_rest_") for name in names)
    n_coeffs = 1 + n_rest // 3
    if n_rest % 3 or round(n_coeffs**0.5) ** 2 != n_coeffs or any(f"f_rest_{i}" not in names for i in range(n_rest)):
        raise PlyFormatError(f"{path}: {n_rest} f_rest_* properties do not form SH bands (3 ((d+1)^2 - 1) expected)")

    def column(*keys: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([vertices[k].astype(np.float64) for k in keys], -1))

    dc = column("f_dc_0", "f_dc_1", "f_dc_2")
    if n_rest:
        rest = column(*(f"f_rest_{i}" for i in range(n_rest))).reshape(n, 3, n_coeffs - 1).transpose(1, 2)
        colors = torch.cat([dc[:, None, :], rest], 1)
    else:
        colors = dc * SH_C0 + 0.5
    return Gaussians(
        means=column("x", "y", "z"),
        quats=column("rot_0", "rot_1", "rot_2", "rot_3"),
        scales=torch.exp(column("scale_0", "scale_1", "scale_2")),
        opacities=torch.sigmoid(column("opacity")[:, 0]),
        colors=colors,
    ).to(torch.float32)


def _read_header(f, path: Path) -> tuple[list[str], list[str], int]:
    """-> property names, numpy dtypes and count of the vertex element (which must come first)."""
    if f.readline().strip() != b"ply":
        raise PlyFormatError(f"{path}: not a PLY file (no 'ply' magic line)")
    names, dtypes, n, element = [], [], None, None
    while True:
        line = f.readline()
        if not line:
            raise PlyFormatError(f"{path}: PLY header has no end_header line")
        words = line.decode("ascii", errors="replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        if words[0] == "format" and words[1:2] != ["binary_little_endian"]:
            raise PlyFormatError(f"{path}: PLY format '{' '.join(words[1:])}' is not supported, only binary_little_endian")
        if words[0] == "element":
            element = words[1]
            if n is None and element != "vertex":
                raise PlyFormatError(f"{path}: the first PLY element is '{element}', expected 'vertex'")
            if element == "vertex":
                n = int(words[2])
        if words[0] == "property" and element == "vertex":
            if words[1] == "list" or words[1] not in _PLY_TYPES:
                raise PlyFormatError(f"{path}: unsupported vertex property type in '{line.decode().strip()}'")
            dtypes.append(_PLY_TYPES[words[1]])
            names.append(words[2])
    if n is None:
        raise PlyFormatError(f"{path}: PLY file has no vertex element")
    return names, dtypes, n
