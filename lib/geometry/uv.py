"""UV texel maps of a mesh: which surface point every texel stands for, and its local frame.

A UV-attached Gaussian lives at one texel of a size x size map (texel layout and v axis as in
``lib.geometry.rasterize``: row 0 is the top of the texture, v near 1). ``texel_map`` rasterizes the
UV layout once; every texel the layout covers is *valid* and becomes one Gaussian, described by the
mesh face it falls in and its barycentrics there. Texels outside the layout carry nothing and are
dropped (not kept at the origin).

Conventions, for the whole project:
- Gaussians are listed in row-major texel order of the valid texels (``TexelMap.index``), so a UV
  map ``[..., C, S, S]`` and a per-Gaussian tensor ``[..., N, C]`` convert with ``gather_texels``.
- A texel frame is a rotation matrix whose columns are (tangent, bitangent, normal): the tangent
  follows increasing u on the surface, the normal is the interpolated outward vertex normal and
  the bitangent completes a right-handed frame (n x t), so the frame is a proper rotation even
  where a UV chart is mirrored.
- The mesh faces and the UV faces correspond one to one (``faces[f]`` and ``faces_uv[f]`` are the
  same triangle), as in FLAME's head_template.obj.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

from lib.geometry.rasterize import rasterize_uv


@dataclass(frozen=True)
class TexelMap:
    """The valid texels of a UV layout at one size, and where they sit on the mesh."""

    size: int
    index: Tensor  # [N] long, flat texel index row * size + col, ascending
    face: Tensor  # [N] long, face the texel centre falls in
    bary: Tensor  # [N, 3] barycentrics of the texel centre in that face

    @property
    def n(self) -> int:
        return int(self.index.shape[0])

    def valid_mask(self) -> Tensor:
        """[S, S] bool, True where a texel carries a Gaussian."""
        mask = torch.zeros(self.size * self.size, dtype=torch.bool, device=self.index.device)
        mask[self.index] = True
        return mask.view(self.size, self.size)

    def subset(self, keep: Tensor) -> "TexelMap":
        """The texels where ``keep`` [N] bool is True (e.g. without the neck)."""
        return TexelMap(self.size, self.index[keep], self.face[keep], self.bary[keep])


def texel_map(uvs: Tensor, faces_uv: Tensor, size: int) -> TexelMap:
    """Rasterize a UV layout (uvs [T, 2] in [0, 1], faces_uv [F, 3]) into its valid texels."""
    frags = rasterize_uv(uvs.float(), faces_uv, size)
    p2f = frags.pix_to_face[0].reshape(-1)
    index = (p2f >= 0).nonzero().squeeze(1)
    if index.numel() == 0:
        raise ValueError(f"the UV layout covers no texel of a {size}x{size} map; check the UVs lie in [0, 1]")
    return TexelMap(size, index, p2f[index], frags.bary[0].reshape(-1, 3)[index])


def gather_texels(maps: Tensor, tm: TexelMap) -> Tensor:
    """UV maps [B, C, S, S] -> per-Gaussian values [B, N, C]."""
    return maps.flatten(2)[:, :, tm.index].transpose(1, 2)


def scatter_texels(values: Tensor, tm: TexelMap) -> Tensor:
    """Per-Gaussian values [B, N, C] -> UV maps [B, C, S, S], zeros at invalid texels."""
    B, _, C = values.shape
    out = values.new_zeros(B, C, tm.size * tm.size)
    out[:, :, tm.index] = values.transpose(1, 2)
    return out.view(B, C, tm.size, tm.size)


def surface_points(verts: Tensor, faces: Tensor, tm: TexelMap) -> Tensor:
    """Mesh point under every valid texel. verts [B, V, 3] -> [B, N, 3]"""
    corners = verts[:, faces[tm.face]]  # [B, N, 3 corners, 3]
    return (tm.bary[None, :, :, None].to(verts) * corners).sum(2)


def vertex_normals(verts: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted unit vertex normals (outward for counter-clockwise faces). [B, V, 3] -> [B, V, 3]"""
    v0, v1, v2 = verts[:, faces[:, 0]], verts[:, faces[:, 1]], verts[:, faces[:, 2]]
    face_n = torch.cross(v1 - v0, v2 - v0, dim=-1)  # length = twice the area: the weight
    normals = torch.zeros_like(verts)
    for k in range(3):
        normals.index_add_(1, faces[:, k], face_n)
    return torch.nn.functional.normalize(normals, dim=-1, eps=1e-12)


def texel_normals(verts: Tensor, faces: Tensor, tm: TexelMap) -> Tensor:
    """Interpolated unit vertex normal at every valid texel. [B, V, 3] -> [B, N, 3]"""
    return torch.nn.functional.normalize(surface_points(vertex_normals(verts, faces), faces, tm), dim=-1, eps=1e-12)


def face_tangents(verts: Tensor, faces: Tensor, uvs: Tensor, faces_uv: Tensor) -> Tensor:
    """dP/du of every face from its UV parameterisation (not normalised). -> [B, F, 3]

    With edges e1 = P1 - P0, e2 = P2 - P0 and their UV edges (du1, dv1), (du2, dv2), the affine
    map P(u, v) has dP/du = (dv2 e1 - dv1 e2) / det, det = du1 dv2 - du2 dv1.
    """
    p = verts[:, faces]  # [B, F, 3, 3]
    t = uvs.to(verts)[faces_uv]  # [F, 3, 2]
    e1, e2 = p[:, :, 1] - p[:, :, 0], p[:, :, 2] - p[:, :, 0]
    d1, d2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    # Faces with a degenerate UV triangle cover no texel; any finite value serves them.
    inv = torch.where(det.abs() > 1e-20, 1.0 / torch.where(det == 0, torch.ones_like(det), det), torch.zeros_like(det))
    return (d2[:, 1, None] * e1 - d1[:, 1, None] * e2) * inv[None, :, None]


def texel_frames(verts: Tensor, faces: Tensor, uvs: Tensor, faces_uv: Tensor, tm: TexelMap) -> Tensor:
    """Orthonormal (tangent, bitangent, normal) frame of every valid texel, as columns. -> [B, N, 3, 3]"""
    n = texel_normals(verts, faces, tm)
    t = face_tangents(verts, faces, uvs, faces_uv)[:, tm.face]
    t = t - (t * n).sum(-1, keepdim=True) * n  # Gram-Schmidt against the smooth normal
    # A tangent parallel to the normal (a face seen edge-on in UV) has no direction: any
    # perpendicular one keeps the frame a rotation.
    fallback = torch.cross(n, torch.tensor([0.0, 1.0, 0.0], dtype=n.dtype, device=n.device).expand_as(n), dim=-1)
    short = t.norm(dim=-1, keepdim=True) < 1e-9
    t = torch.nn.functional.normalize(torch.where(short, fallback, t), dim=-1, eps=1e-12)
    b = torch.cross(n, t, dim=-1)
    return torch.stack([t, b, n], dim=-1)


def texel_regions(region_verts: dict[str, np.ndarray], faces: Tensor, tm: TexelMap) -> dict[str, Tensor]:
    """Region membership of every valid texel through its nearest face corner (largest barycentric).

    region_verts: region name -> vertex indices (FLAME_masks.pkl). -> name -> [N] bool
    """
    nearest = faces[tm.face].gather(1, tm.bary.argmax(1, keepdim=True)).squeeze(1)  # [N] vertex ids
    n_verts = int(faces.max()) + 1
    out = {}
    for name, ids in region_verts.items():
        member = torch.zeros(max(n_verts, int(np.max(ids, initial=-1)) + 1), dtype=torch.bool)
        member[torch.as_tensor(np.asarray(ids, dtype=np.int64))] = True
        out[name] = member.to(nearest.device)[nearest]
    return out


def knn_log_scale(points: Tensor, k: int = 3) -> Tensor:
    """log of the RMS distance of every point to its k nearest neighbours. points [N, 3] -> [N]"""
    pts = points.detach().cpu().double().numpy()
    dist, _ = cKDTree(pts).query(pts, k=k + 1)  # the first neighbour is the point itself
    rms = np.sqrt((dist[:, 1:] ** 2).mean(1)).clip(min=1e-7)
    return torch.as_tensor(np.log(rms), dtype=points.dtype, device=points.device)
