import math

import numpy as np
import pytest
import torch

from lib.geometry.rasterize import interpolate, rasterize, rasterize_camera, rasterize_uv

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def uv_sphere(n_lat: int, n_lon: int, radius: float, centre) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed lat-long sphere, outward counter-clockwise faces (y up): verts [V, 3], faces [F, 3]."""
    theta = torch.linspace(0, math.pi, n_lat + 1, dtype=torch.float64)
    phi = torch.linspace(0, 2 * math.pi, n_lon + 1, dtype=torch.float64)
    th, ph = torch.meshgrid(theta, phi, indexing="ij")
    unit = torch.stack([th.sin() * ph.sin(), th.cos(), th.sin() * ph.cos()], dim=-1).reshape(-1, 3)
    verts = unit * radius + torch.tensor(centre, dtype=torch.float64)
    i, j = torch.meshgrid(torch.arange(n_lat), torch.arange(n_lon), indexing="ij")
    a = (i * (n_lon + 1) + j).reshape(-1)
    b, c, d = a + n_lon + 1, a + n_lon + 2, a + 1
    faces = torch.cat([torch.stack([a, b, c], -1), torch.stack([a, c, d], -1)])
    tri = verts[faces]
    signed_volume = torch.linalg.det(tri).sum() / 6
    assert signed_volume > 0, "test mesh must be wound outward"
    return verts.float(), faces


def look_at(eye, target=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """OpenCV world-to-camera [4, 4] at `eye` looking at `target`, world y up."""
    eye, target = torch.tensor(eye, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)
    fwd = (target - eye) / (target - eye).norm()
    right = torch.linalg.cross(fwd, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    right = right / right.norm()
    down = torch.linalg.cross(fwd, right)
    R = torch.stack([right, down, fwd])
    viewmat = torch.eye(4, dtype=torch.float64)
    viewmat[:3, :3] = R
    viewmat[:3, 3] = -R @ eye
    return viewmat.float()


def pixel_rays(K: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Camera-space directions (z = 1) through every pixel centre: [H, W, 3] float64."""
    i, j = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                          torch.arange(width, dtype=torch.float64), indexing="ij")
    pix = torch.stack([j + 0.5, i + 0.5, torch.ones_like(i)], dim=-1)
    return pix @ torch.linalg.inv(K.double()).T


def sphere_silhouette(viewmat, K, centre, radius, height, width) -> torch.Tensor:
    """[H, W] bool: does the ray through the pixel centre hit the sphere (in front of the camera)?"""
    c = viewmat.double()[:3, :3] @ torch.tensor(centre, dtype=torch.float64) + viewmat.double()[:3, 3]
    d = pixel_rays(K, height, width)
    t = (d @ c) / (d * d).sum(-1)
    closest = t[..., None] * d - c
    return ((closest * closest).sum(-1) < radius**2) & (t > 0)


def within_one_ring(mask: torch.Tensor, expected: torch.Tensor) -> bool:
    """Every pixel where mask and expected differ has a pixel of the other expected label among
    its 8 neighbours, i.e. lies on the analytic boundary ring."""
    e = expected.float()[None, None]
    has_in = torch.nn.functional.max_pool2d(e, 3, 1, 1)[0, 0] > 0
    has_out = torch.nn.functional.max_pool2d(1 - e, 3, 1, 1)[0, 0] > 0
    wrong = mask.cpu() != expected
    return bool((has_in & has_out)[wrong].all())


def test_single_triangle_covers_exactly_the_pixel_centres_inside_it():
    H, W = 40, 32
    tri = np.array([[3.3, 2.7], [27.8, 9.1], [11.2, 37.4]])
    j, i = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    edges = []
    for a, b in [(0, 1), (1, 2), (2, 0)]:
        (ax, ay), (bx, by) = tri[a], tri[b]
        cross = (bx - ax) * (i - ay) - (by - ay) * (j - ax)
        edges.append(cross / math.hypot(bx - ax, by - ay))  # signed distance to the edge's line
    edges = np.stack(edges)
    expected = (np.all(edges >= 0, axis=0) | np.all(edges <= 0, axis=0))
    on_edge = np.abs(edges).min(axis=0) < 1e-4
    for order in ([0, 1, 2], [0, 2, 1]):  # both windings
        verts = torch.tensor(np.c_[tri, np.ones(3)], dtype=torch.float32)[None]
        frags = rasterize(verts, torch.tensor([order]), H, W)
        got = (frags.pix_to_face[0] == 0).numpy()
        assert expected.sum() > 150
        assert np.array_equal(got[~on_edge], expected[~on_edge])


@pytest.mark.parametrize("device", DEVICES)
def test_sphere_with_offcentre_principal_point_covers_its_analytic_silhouette(device):
    H, W = 60, 80
    K = torch.tensor([[70.0, 0.0, 21.3], [0.0, 70.0, 38.6], [0.0, 0.0, 1.0]])  # far from (40, 30)
    centre, radius = (0.05, -0.1, 0.02), 0.25
    verts, faces = uv_sphere(48, 96, radius, centre)
    viewmat = look_at((0.6, 0.3, 1.4), target=(0.25, -0.05, 0.0))
    frags = rasterize_camera(verts[None].to(device), faces.to(device), viewmat[None].to(device),
                             K[None].to(device), H, W)
    expected = sphere_silhouette(viewmat, K, centre, radius, H, W)
    mask = frags.pix_to_face[0].cpu() >= 0
    assert 200 < expected.sum() < 0.7 * H * W  # the disc is in frame and not clipped
    perimeter = 2 * math.sqrt(math.pi * expected.sum())
    assert (mask != expected).sum() < 0.1 * perimeter  # the inscribed mesh loses a few edge pixels
    assert within_one_ring(mask, expected)


def test_batch_of_two_cameras_matches_single_renders_and_analytic_silhouettes():
    H, W = 48, 64
    K = torch.tensor([[60.0, 0.0, 30.0], [0.0, 60.0, 20.0], [0.0, 0.0, 1.0]])
    centre, radius = (0.0, 0.0, 0.0), 0.3
    verts, faces = uv_sphere(32, 64, radius, centre)
    viewmats = torch.stack([look_at((0.0, 0.0, 2.0), (0.1, 0.1, 0.0)), look_at((1.5, 0.4, 1.2))])
    Ks = torch.stack([K, K])
    batched = rasterize_camera(verts[None].expand(2, -1, -1), faces, viewmats, Ks, H, W)
    broadcast = rasterize_camera(verts[None], faces, viewmats, Ks, H, W)  # one mesh, two cameras
    for b in range(2):
        single = rasterize_camera(verts[None], faces, viewmats[b:b + 1], Ks[b:b + 1], H, W)
        for got, want in zip(batched, single):
            assert torch.equal(got[b], want[0])
        assert torch.equal(broadcast.pix_to_face[b], single.pix_to_face[0])
        expected = sphere_silhouette(viewmats[b], K, centre, radius, H, W)
        assert within_one_ring(batched.pix_to_face[b] >= 0, expected)
    assert not torch.equal(batched.pix_to_face[0] >= 0, batched.pix_to_face[1] >= 0)


def test_depth_on_a_fronto_parallel_plane_is_its_distance():
    H = W = 33
    K = torch.tensor([[50.0, 0.0, 16.5], [0.0, 50.0, 16.5], [0.0, 0.0, 1.0]])
    z = 2.5
    verts = torch.tensor([[-1.0, -1.0, z], [1.0, -1.0, z], [1.0, 1.0, z], [-1.0, 1.0, z]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    frags = rasterize_camera(verts[None], faces, torch.eye(4)[None], K[None], H, W)
    assert abs(frags.depth[0, 16, 16].item() - z) < 1e-5
    covered = frags.pix_to_face[0] >= 0
    assert covered.all()  # the plane spans +-20 px around the centre
    assert (frags.depth[0] - z).abs().max() < 1e-5


def test_perspective_correct_barycentrics_interpolate_a_linear_attribute_exactly():
    H, W = 40, 50
    K = torch.tensor([[45.0, 0.0, 23.0], [0.0, 45.0, 21.0], [0.0, 0.0, 1.0]])
    # Camera-space quad on the slanted plane z = 3 + 1.5 x (depth from 1.5 to 4.5).
    xy = torch.tensor([[-1.0, -1.2], [1.0, -1.2], [1.0, 1.2], [-1.0, 1.2]])
    verts = torch.cat([xy, 3 + 1.5 * xy[:, :1]], dim=-1)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    A = torch.tensor([[1.0, 2.0, -0.5], [0.3, -1.0, 2.0]])
    attrs = verts @ A.T + torch.tensor([0.5, -2.0])  # linear in 3D, [V, 2]
    frags = rasterize_camera(verts[None], faces, torch.eye(4)[None], K[None], H, W)
    covered = frags.pix_to_face[0] >= 0
    assert covered.sum() > 400

    d = pixel_rays(K, H, W)
    t = 3.0 / (d[..., 2] - 1.5 * d[..., 0])  # ray t * d meets the plane
    points = t[..., None] * d
    want = points.float() @ A.T + torch.tensor([0.5, -2.0])
    got = interpolate(frags, attrs, faces)[0]
    assert (got - want)[covered].abs().max() < 1e-4
    assert (frags.depth[0] - points[..., 2].float())[covered].abs().max() < 1e-4

    # Screen-space (affine) barycentrics on the same projection are measurably wrong.
    proj = verts @ K.T
    screen = torch.cat([proj[:, :2] / proj[:, 2:], verts[:, 2:]], dim=-1)
    affine = rasterize(screen[None], faces, H, W, perspective=False)
    assert (interpolate(affine, attrs, faces)[0] - want)[covered].abs().max() > 0.05


@pytest.mark.parametrize("near_first", [True, False])
def test_nearer_surface_wins_where_triangles_overlap(near_first):
    H, W = 30, 40
    # Both faces cover the whole image. "slope" has depth 2 + x / W, "flat" 2.5: slope is nearer
    # left of x = 20, whichever face comes first.
    slope = torch.tensor([[-100.0, -100.0, 2 - 100 / W], [140.0, -100.0, 2 + 140 / W], [20.0, 300.0, 2.5]])
    flat = torch.tensor([[-100.0, -100.0, 2.5], [140.0, -100.0, 2.5], [20.0, 300.0, 2.5]])
    verts = torch.cat([slope, flat] if near_first else [flat, slope])[None]
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    slope_id = 0 if near_first else 1
    frags = rasterize(verts, faces, H, W)
    x = (torch.arange(W) + 0.5).expand(H, W)
    assert torch.equal(frags.pix_to_face[0], torch.where(2 + x / W < 2.5, slope_id, 1 - slope_id))
    assert torch.allclose(frags.depth[0], torch.minimum(2 + x / W, torch.tensor(2.5)))


@pytest.mark.parametrize("device", DEVICES)
def test_uv_quad_covers_every_texel_and_interpolates_uv_at_texel_centres(device):
    size = 64
    uvs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], device=device)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]], device=device)
    frags = rasterize_uv(uvs, faces, size)
    assert frags.pix_to_face.shape == (1, size, size)
    assert (frags.pix_to_face >= 0).all()
    got = interpolate(frags, uvs, faces)[0].cpu()
    centres = (torch.arange(size) + 0.5) / size
    assert torch.allclose(got[..., 0], centres[None, :].expand(size, size), atol=1e-6)
    assert torch.allclose(got[..., 1], 1 - centres[:, None].expand(size, size), atol=1e-6)  # row 0 is v = 1

    # One position map per posed mesh from a single UV rasterization.
    positions = torch.randn(3, 4, 3, device=device)
    maps = interpolate(frags, positions, faces)
    assert maps.shape == (3, size, size, 3)
    assert torch.allclose(maps[2], interpolate(frags, positions[2], faces)[0])


def test_uv_triangle_covers_the_lower_left_half_of_the_texture():
    size = 32
    frags = rasterize_uv(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0, 1, 2]]), size)
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    covered = frags.pix_to_face[0] == 0
    off_diagonal = i != j  # centres on the hypotenuse u + v = 1
    assert torch.equal(covered[off_diagonal], (j < i)[off_diagonal])


def test_empty_pixels_have_no_face_infinite_depth_and_zero_values():
    H, W = 20, 30
    verts = torch.tensor([[[1.0, 1.0, 2.0], [9.0, 1.0, 2.0], [1.0, 9.0, 2.0],
                           [100.0, 100.0, 1.0], [120.0, 100.0, 1.0], [100.0, 130.0, 1.0]]])  # 2nd off-image
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    frags = rasterize(verts, faces, H, W)
    empty = frags.pix_to_face[0] < 0
    assert 0 < (~empty).sum() < 50 and empty.sum() > 500
    assert torch.isinf(frags.depth[0][empty]).all() and (frags.depth[0][~empty] == 2.0).all()
    assert (frags.bary[0][empty] == 0).all()
    assert torch.allclose(frags.bary[0][~empty].sum(-1), torch.ones(()))
    values = interpolate(frags, torch.ones(6, 4), faces)[0]
    assert (values[empty] == 0).all() and torch.allclose(values[~empty], torch.ones(()))

    none = rasterize(verts[:, :0], torch.zeros(0, 3, dtype=torch.long), H, W)
    assert (none.pix_to_face == -1).all() and torch.isinf(none.depth).all()


def test_faces_reaching_the_near_plane_are_dropped_without_nans():
    K = torch.tensor([[20.0, 0.0, 10.0], [0.0, 20.0, 10.0], [0.0, 0.0, 1.0]])
    tri = torch.tensor([[-0.5, -0.5, 1.0], [0.5, -0.5, 1.0], [0.0, 0.5, 1.0]])
    crossing = tri.clone()
    crossing[0, 2] = 0.005  # between the camera and the 0.01 near plane
    behind = tri.clone()
    behind[1, 2] = -1.0
    faces = torch.tensor([[0, 1, 2]])
    for verts, visible in [(tri, True), (crossing, False), (behind, False)]:
        verts = verts.clone().requires_grad_()
        frags = rasterize_camera(verts[None], faces, torch.eye(4)[None], K[None], 20, 20)
        assert bool((frags.pix_to_face >= 0).any()) == visible
        frags.depth[torch.isfinite(frags.depth)].sum().backward()
        assert torch.isfinite(verts.grad).all()


def test_backface_culling_keeps_what_a_closed_outward_mesh_shows():
    H, W = 40, 40
    K = torch.tensor([[50.0, 0.0, 20.0], [0.0, 50.0, 20.0], [0.0, 0.0, 1.0]])
    verts, faces = uv_sphere(24, 48, 0.3, (0.0, 0.0, 0.0))
    viewmat = look_at((0.3, 0.5, 1.5))[None]
    kept = rasterize_camera(verts[None], faces, viewmat, K[None], H, W)
    culled = rasterize_camera(verts[None], faces, viewmat, K[None], H, W, cull_backfaces=True)
    assert torch.equal(kept.pix_to_face, culled.pix_to_face)
    inside_out = rasterize_camera(verts[None], faces.flip(-1), viewmat, K[None], H, W, cull_backfaces=True)
    far_side = (inside_out.depth > kept.depth) & (kept.pix_to_face >= 0)
    assert far_side.sum() > 0.9 * (kept.pix_to_face >= 0).sum()  # only the far hemisphere faces the camera


def test_chunked_candidates_give_the_same_fragments_and_ties_go_to_the_lowest_face_id():
    H, W = 36, 44
    K = torch.tensor([[40.0, 0.0, 22.0], [0.0, 40.0, 18.0], [0.0, 0.0, 1.0]])
    verts, faces = uv_sphere(16, 32, 0.3, (0.0, 0.0, 0.0))
    big = torch.tensor([[-3.0, -3.0, 0.0], [3.0, -3.0, 0.0], [0.0, 3.0, 0.0]])  # behind-the-sphere wall
    n = verts.shape[0]
    verts = torch.cat([verts, big])
    # The wall twice: the copy with the higher id must never win.
    faces = torch.cat([faces, torch.tensor([[n, n + 1, n + 2]] * 2)])
    viewmat = look_at((0.0, 0.0, 1.2))[None]
    whole = rasterize_camera(verts[None], faces, viewmat, K[None], H, W)
    chunked = rasterize_camera(verts[None], faces, viewmat, K[None], H, W, max_pairs=97)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
    wall = faces.shape[0] - 2
    assert (whole.pix_to_face == wall).sum() > 300
    assert not (whole.pix_to_face == wall + 1).any()


def test_depth_and_interpolated_values_carry_gradients_inside_faces():
    H = W = 21
    K = torch.tensor([[30.0, 0.0, 10.5], [0.0, 30.0, 10.5], [0.0, 0.0, 1.0]])
    verts = torch.tensor([[-1.0, -1.0, 2.0], [1.0, -1.0, 2.0], [1.0, 1.0, 2.0], [-1.0, 1.0, 2.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    shift = torch.zeros(3, requires_grad=True)
    frags = rasterize_camera((verts + shift)[None], faces, torch.eye(4)[None], K[None], H, W)
    frags.depth[0, 10, 10].backward(retain_graph=True)
    assert torch.allclose(shift.grad, torch.tensor([0.0, 0.0, 1.0]), atol=1e-5)
    colours = torch.rand(4, 3, requires_grad=True)
    interpolate(frags, colours, faces).sum().backward()
    assert torch.allclose(colours.grad.sum(), torch.tensor(3.0 * H * W))
