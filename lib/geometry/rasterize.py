"""Triangle-mesh rasterization in plain torch: per-pixel face id, barycentrics and depth.

Replaces pytorch3d's mesh rasterizer (not installable here) on CPU and CUDA alike. Used for
foreground masks, UV texel maps (which face and where, for every texel) and dataset rendering.

Conventions (stated here once)
------------------------------
- Screen space: x right, y down, in pixels. Pixel (row i, col j) covers [j, j+1] x [i, i+1] and is
  sampled at its centre (j + 0.5, i + 0.5), as gsplat does.
- Camera space: OpenCV. `viewmat` is world-to-camera [4, 4] (x right, y down, z forward), `K` is
  [3, 3] in pixels with any principal point (skew honoured). `depth` is camera z, not ray length.
- UV space: texel (i, j) of a size x size map is sampled at u = (j + 0.5) / size,
  v = 1 - (i + 0.5) / size. Row 0 is the top of the texture (v near 1): the image layout in which
  FLAME UV textures are stored, so a UV map indexes like the texture image.
- Z-buffer: the nearest depth wins; exact ties go to the lowest face id, so results are
  deterministic. In UV space every depth is 0 and overlapping charts resolve by face id.
- Near plane: a face with any vertex at depth <= `near` is dropped whole (no clipping). The
  camera default, 0.01 m, is the Gaussian renderer's near plane, so a mesh mask and a splat render
  agree on what is visible. Perspective rasterization always drops faces with a vertex at z <= 0.
- Back faces are kept by default (meshes may be open). With `cull_backfaces=True` a face is kept
  only if its vertices run counter-clockwise in the image as displayed (negative signed area in
  x-right/y-down pixels): an outward, counter-clockwise wound mesh such as FLAME seen by an OpenCV
  camera.
- Edges: the inside test accepts barycentrics down to -64 machine epsilons (-7.6e-6 in float32) so
  that rounding cannot drop a pixel centre on an edge shared by two faces from both; `bary` may be
  that slightly negative.
- Gradients: `pix_to_face` is piecewise constant. `bary` and `depth` are recomputed for the winning
  faces with autograd on, so they are differentiable w.r.t. vertex positions inside faces but carry
  no silhouette gradient. `interpolate` is differentiable w.r.t. the attributes.

Algorithm
---------
Every face gets the pixel-centre bounding box of its screen triangle; (face, pixel) candidate
pairs are enumerated in chunks of at most `max_pairs` pairs (a huge face is split across chunks),
so memory is bounded however large the triangles are. Each chunk evaluates barycentrics for all
its pairs at once, keeps the inside ones and folds them into a flat z-buffer with
scatter_reduce('amin'). Barycentrics and depth are then recomputed once per covered pixel from the
winning face (perspective-correct for camera rasterization).
"""

from typing import NamedTuple

import torch
from torch import Tensor

# A chunk's temporaries take about 150 bytes per candidate pair (about 80 MB here); smaller chunks
# stay in cache and measured faster on CPU than larger ones.
DEFAULT_MAX_PAIRS = 1 << 19


class Fragments(NamedTuple):
    pix_to_face: Tensor  # [B, H, W] long, face index into `faces`, -1 where empty
    bary: Tensor  # [B, H, W, 3] barycentrics of the pixel centre in that face, zeros where empty
    depth: Tensor  # [B, H, W] depth of the pixel centre on that face, inf where empty


def rasterize(
    verts_screen: Tensor,  # [B, V, 3] x, y in pixels, z depth
    faces: Tensor,  # [F, 3] long
    height: int,
    width: int,
    perspective: bool = False,
    near: float | None = None,
    cull_backfaces: bool = False,
    max_pairs: int = DEFAULT_MAX_PAIRS,
) -> Fragments:
    """Rasterize triangles given in screen space, z-buffered.

    perspective=False: x, y, z are affine in screen space (orthographic or UV rasterization) and
    barycentrics are the screen-space ones. perspective=True: x, y are a perspective projection and
    z the camera depth; barycentrics are perspective-correct (they interpolate attributes linear on
    the 3D triangle) and depth is the true depth on the 3D triangle. `near` drops faces with any
    vertex at z <= near (None: no test, except z <= 0 under perspective).
    """
    if verts_screen.ndim != 3 or verts_screen.shape[-1] != 3:
        raise ValueError(f"verts_screen must be [B, V, 3], got {tuple(verts_screen.shape)}")
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be [F, 3], got {tuple(faces.shape)}")
    if perspective:
        near = 0.0 if near is None else max(near, 0.0)
    faces = faces.to(device=verts_screen.device, dtype=torch.long)
    B, F = verts_screen.shape[0], faces.shape[0]
    tri = verts_screen[:, faces].reshape(B * F, 3, 3)  # [B*F, corner, xyz]
    with torch.no_grad():
        winner = _zbuffer(tri, B, height, width, perspective, near, cull_backfaces, max_pairs)
    return _fragments(tri, winner, B, F, height, width, perspective)


def rasterize_camera(
    verts_world: Tensor,  # [B, V, 3] (B may be 1 with several cameras)
    faces: Tensor,  # [F, 3] long
    viewmat: Tensor,  # [B, 4, 4] world-to-camera, OpenCV
    K: Tensor,  # [B, 3, 3] pixels
    height: int,
    width: int,
    near: float = 0.01,
    cull_backfaces: bool = False,
    max_pairs: int = DEFAULT_MAX_PAIRS,
) -> Fragments:
    """Rasterize a world-space mesh seen by OpenCV pinhole cameras; perspective-correct bary."""
    R, t = viewmat[..., :3, :3], viewmat[..., :3, 3]
    cam = verts_world @ R.transpose(-1, -2) + t[..., None, :]  # [B, V, 3]
    z = cam[..., 2:]
    # Vertices at or behind the near plane only belong to dropped faces; a placeholder depth keeps
    # their projection (and its gradient) finite.
    z_safe = torch.where(z > near, z, torch.ones_like(z))
    pix = (cam / z_safe) @ K.transpose(-1, -2)  # [B, V, 3], last entry 1
    return rasterize(
        torch.cat([pix[..., :2], z], dim=-1), faces, height, width,
        perspective=True, near=near, cull_backfaces=cull_backfaces, max_pairs=max_pairs,
    )


def rasterize_uv(
    uvs: Tensor,  # [T, 2] in [0, 1]
    faces_uv: Tensor,  # [F, 3] long, indices into uvs
    size: int,
    max_pairs: int = DEFAULT_MAX_PAIRS,
) -> Fragments:
    """Rasterize a UV layout into a size x size texel grid (B = 1); see the UV convention above."""
    x = uvs[:, 0] * size
    y = (1.0 - uvs[:, 1]) * size
    verts = torch.stack([x, y, torch.zeros_like(x)], dim=-1)[None]
    return rasterize(verts, faces_uv, size, size, max_pairs=max_pairs)


def interpolate(
    fragments: Fragments,
    attrs: Tensor,  # [B, V, C] or [V, C]
    faces: Tensor,  # [F, 3] long, the faces that were rasterized
) -> Tensor:  # [B, H, W, C], zeros where empty
    """Barycentric interpolation of per-vertex attributes at every covered pixel.

    Fragments with B = 1 broadcast against batched attrs: one UV rasterization serves the position
    maps of many posed meshes that share the layout.
    """
    p2f, bary = fragments.pix_to_face, fragments.bary
    if attrs.ndim == 2:
        attrs = attrs[None]
    B = max(p2f.shape[0], attrs.shape[0])
    if p2f.shape[0] not in (1, B) or attrs.shape[0] not in (1, B):
        raise ValueError(f"batch sizes do not broadcast: fragments {p2f.shape[0]}, attrs {attrs.shape[0]}")
    faces = faces.to(device=attrs.device, dtype=torch.long)
    covered = p2f >= 0
    corner = faces[p2f.clamp(min=0)]  # [Bf, H, W, 3]
    b_idx = torch.arange(attrs.shape[0], device=attrs.device).view(-1, 1, 1, 1)
    vals = attrs[b_idx, corner]  # [B, H, W, 3, C]
    out = (bary[..., None].to(attrs.dtype) * vals).sum(dim=-2)
    return torch.where(covered[..., None], out, torch.zeros_like(out))


def _zbuffer(
    tri: Tensor,  # [B*F, 3, 3] screen triangles, row n is face n % F of image n // F
    n_images: int,
    height: int,
    width: int,
    perspective: bool,
    near: float | None,
    cull_backfaces: bool,
    max_pairs: int,
) -> Tensor:  # [B * H * W] long, winning row of `tri` per pixel, -1 where empty
    device, dtype = tri.device, tri.dtype
    n_faces = tri.shape[0] // max(n_images, 1)
    n_pix = n_images * height * width
    x, y, z = tri.unbind(-1)  # each [N, 3]
    e1x, e1y = x[:, 1] - x[:, 0], y[:, 1] - y[:, 0]
    e2x, e2y = x[:, 2] - x[:, 0], y[:, 2] - y[:, 0]
    area = e1x * e2y - e1y * e2x  # twice the signed area
    keep = torch.isfinite(tri).all(dim=(1, 2)) & (area != 0) & torch.isfinite(1.0 / area)
    if near is not None:
        keep &= (z > near).all(dim=1)
    if cull_backfaces:
        keep &= area < 0
    # Pixel-centre bounding box: col j is a candidate iff xmin <= j + 0.5 <= xmax.
    x0 = torch.ceil(x.amin(dim=1) - 0.5).clamp(0, width)
    x1 = torch.floor(x.amax(dim=1) - 0.5).clamp(-1, width - 1)
    y0 = torch.ceil(y.amin(dim=1) - 0.5).clamp(0, height)
    y1 = torch.floor(y.amax(dim=1) - 0.5).clamp(-1, height - 1)
    nx = (x1 - x0 + 1).clamp(min=0)
    ny = (y1 - y0 + 1).clamp(min=0)
    keep &= (nx > 0) & (ny > 0)
    fid = keep.nonzero().squeeze(1)  # ascending, so "lowest face id wins ties" survives chunking

    winner = torch.full((n_pix,), -1, dtype=torch.long, device=device)
    if fid.numel() == 0:
        return winner
    counts = (nx[fid] * ny[fid]).long()
    ends = counts.cumsum(0)
    starts = ends - counts
    total = int(ends[-1])
    # Pair bookkeeping runs in float64: exact integers up to 2**53, and float division is much
    # cheaper than integer division on CPU.
    nx = nx[fid].double()
    pix_base = (  # flat index of the box's first pixel
        (fid // n_faces).double() * (height * width) + y0[fid].double() * width + x0[fid].double()
    )
    # Barycentrics (l1, l2) are affine in the pixel centre; anchored at the box's first centre so
    # that float32 stays accurate for small faces far from the image origin.
    inv_area = 1.0 / area[fid]
    c1x, c1y = e2y[fid] * inv_area, -e2x[fid] * inv_area
    c2x, c2y = -e1y[fid] * inv_area, e1x[fid] * inv_area
    dx0 = x0[fid] + 0.5 - x[fid, 0]
    dy0 = y0[fid] + 0.5 - y[fid, 0]
    l1_first, l2_first = c1x * dx0 + c1y * dy0, c2x * dx0 + c2y * dy0
    zf = (1.0 / z[fid] if perspective else z[fid]).unbind(-1)  # 3 x [Fv]

    # Two faces sharing an edge evaluate it from different anchors; an exact inside test could
    # let rounding drop a centre on the edge from both (a crack). A tolerance of 64 machine
    # epsilons makes both claim it and the z-buffer choose.
    tol = 64 * torch.finfo(dtype).eps
    zbuf = torch.full((n_pix,), torch.inf, dtype=dtype, device=device)
    slot = torch.full((n_pix,), fid.numel(), dtype=torch.long, device=device)  # winning index into fid
    for s in range(0, total, max_pairs):
        e = min(s + max_pairs, total)
        lo = int(torch.searchsorted(ends, s, right=True))
        hi = int(torch.searchsorted(ends, e - 1, right=True)) + 1
        seg_counts = ends[lo:hi].clamp(max=e) - starts[lo:hi].clamp(min=s)
        k = torch.repeat_interleave(torch.arange(lo, hi, device=device), seg_counts, output_size=e - s)
        local = (torch.arange(s, e, device=device) - starts.index_select(0, k)).double()
        nxk = nx.index_select(0, k)
        row = torch.floor((local + 0.5) / nxk)
        col = local - row * nxk
        rowf, colf = row.to(dtype), col.to(dtype)
        l1 = l1_first.index_select(0, k) + colf * c1x.index_select(0, k) + rowf * c1y.index_select(0, k)
        l2 = l2_first.index_select(0, k) + colf * c2x.index_select(0, k) + rowf * c2y.index_select(0, k)
        inside = ((l1 >= -tol) & (l2 >= -tol) & (l1 + l2 <= 1 + tol)).nonzero().squeeze(1)
        if inside.numel() == 0:
            continue
        k, l1, l2 = k.index_select(0, inside), l1.index_select(0, inside), l2.index_select(0, inside)
        pix = (pix_base.index_select(0, k) + row.index_select(0, inside) * width
               + col.index_select(0, inside)).long()
        d = ((1 - l1 - l2) * zf[0].index_select(0, k) + l1 * zf[1].index_select(0, k)
             + l2 * zf[2].index_select(0, k))
        if perspective:
            d = 1.0 / d
        before = zbuf.index_select(0, pix)
        zbuf.scatter_reduce_(0, pix, d, reduce="amin")
        # Pairs that set a new minimum take the pixel; an equal depth from an earlier chunk (lower
        # face id) keeps it.
        won = ((d == zbuf.index_select(0, pix)) & (d < before)).nonzero().squeeze(1)
        pix, k = pix.index_select(0, won), k.index_select(0, won)
        slot.index_fill_(0, pix, fid.numel())
        slot.scatter_reduce_(0, pix, k, reduce="amin")
    covered = slot < fid.numel()
    winner[covered] = fid[slot[covered]]
    return winner


def _fragments(
    tri: Tensor,  # [B*F, 3, 3] screen triangles, with autograd
    winner: Tensor,  # [B*H*W] long, row of tri per pixel or -1
    B: int,
    F: int,
    height: int,
    width: int,
    perspective: bool,
) -> Fragments:
    """Barycentrics and depth of every covered pixel centre in its winning face."""
    n_pix = B * height * width
    pix = (winner >= 0).nonzero().squeeze(1)
    face = winner[pix]
    t = tri[face]  # [P, 3, 3]
    in_image = pix % (height * width)
    px = (in_image % width).to(tri.dtype) + 0.5
    py = torch.div(in_image, width, rounding_mode="floor").to(tri.dtype) + 0.5
    x, y, z = t.unbind(-1)
    e1x, e1y = x[:, 1] - x[:, 0], y[:, 1] - y[:, 0]
    e2x, e2y = x[:, 2] - x[:, 0], y[:, 2] - y[:, 0]
    dx, dy = px - x[:, 0], py - y[:, 0]
    area = e1x * e2y - e1y * e2x
    l1 = (dx * e2y - dy * e2x) / area
    l2 = (e1x * dy - e1y * dx) / area
    lam = torch.stack([1 - l1 - l2, l1, l2], dim=-1)  # screen-space barycentrics
    if perspective:
        w = lam / z
        inv_depth = w.sum(dim=-1, keepdim=True)
        bary, depth = w / inv_depth, 1.0 / inv_depth.squeeze(-1)
    else:
        bary, depth = lam, (lam * z).sum(dim=-1)

    pix_to_face = torch.full((n_pix,), -1, dtype=torch.long, device=tri.device)
    pix_to_face[pix] = face % max(F, 1)
    bary_img = tri.new_zeros(n_pix, 3).index_put((pix,), bary)
    depth_img = tri.new_full((n_pix,), torch.inf).index_put((pix,), depth)
    return Fragments(
        pix_to_face.view(B, height, width),
        bary_img.view(B, height, width, 3),
        depth_img.view(B, height, width),
    )
