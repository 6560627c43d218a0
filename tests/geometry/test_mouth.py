"""Faces closing the mouth (lib/geometry/mouth.py) on a toy mesh and on the FLAME-like synthetic head
(synthetic.head_mouth: open), and the avatar built with them (actor.close_mouth)."""
import numpy as np
import pytest
import torch

from lib.flame.model import FlameModel
from lib.flame.synthetic import build_head_model, generate_head_model, without_cavity
from lib.geometry import uv
from lib.geometry.mouth import MouthError, boundary_loops, free_rectangle, mouth_faces, mouth_loop
from lib.models.avatar import GaussianAvatar, canonical_mesh
from lib.models.mesh_pca import MeshPCA


def grid(n: int, holes=()):
    """An n x n grid of quads in the z = 0 plane, facing +z, without the quads in ``holes``."""
    verts = np.array([(x, y, 0.0) for y in range(n + 1) for x in range(n + 1)], dtype=float)
    faces = []
    for y in range(n):
        for x in range(n):
            if (x, y) in holes:
                continue
            a, b, c, d = y * (n + 1) + x, y * (n + 1) + x + 1, (y + 1) * (n + 1) + x + 1, (y + 1) * (n + 1) + x
            faces += [(a, b, c), (a, c, d)]
    return verts, np.array(faces)


def directed_edges(faces):
    return [(int(f[k]), int(f[(k + 1) % 3])) for f in faces for k in range(3)]


def test_boundary_loops_walk_each_hole_against_its_faces():
    verts, faces = grid(5, holes={(1, 2), (2, 2), (3, 2)})  # a slit three quads wide
    loops = boundary_loops(faces)
    assert sorted(len(loop) for loop in loops) == [8, 20]  # the slit and the outer border
    edges = set(directed_edges(faces))
    for loop in loops:
        for a, b in zip(loop, np.roll(loop, -1)):
            assert (int(a), int(b)) not in edges and (int(b), int(a)) in edges


def test_a_slit_is_closed_by_a_strip_that_continues_the_surface():
    verts, faces = grid(5, holes={(1, 2), (2, 2), (3, 2)})
    lips = np.array([v for v in range(len(verts)) if 1 <= verts[v, 0] <= 4 and 2 <= verts[v, 1] <= 3])
    uvs = verts[:, :2] / 5 * 0.5  # the layout fills [0, 0.5]²: room to its right
    closure = mouth_faces(verts, faces, {"lips": lips}, uvs, faces)
    assert len(closure.faces) == 6  # 8 loop vertices, two corners: 8 - 2 triangles
    closed = np.concatenate([faces, closure.faces])
    assert len(boundary_loops(closed)) == 1  # only the outer border is left
    edges = directed_edges(closed)
    assert len(edges) == len(set(edges))  # every edge once per direction: one orientation throughout
    n = np.cross(verts[closure.faces[:, 1]] - verts[closure.faces[:, 0]], verts[closure.faces[:, 2]] - verts[closure.faces[:, 0]])
    assert (n[:, 2] > 0).all()  # facing +z as the grid does
    # its UV chart is new space: no texel of the old layout changes hands
    _, all_uvs, all_faces_uv = closure.appended(faces, uvs, faces)
    old = uv.texel_map(torch.as_tensor(uvs).float(), torch.as_tensor(faces), 64)
    new = uv.texel_map(all_uvs, all_faces_uv, 64)
    kept = torch.isin(new.index, old.index)
    assert torch.equal(new.index[kept], old.index) and torch.equal(new.face[kept], old.face)
    assert (~kept).sum() > 20 and (new.face[~kept] >= len(faces)).all()


def test_a_mesh_without_a_hole_between_the_lips_or_without_uv_room_is_refused():
    verts, faces = grid(4)
    inner = np.array([v for v in range(len(verts)) if 1 <= verts[v, 0] <= 3 and 1 <= verts[v, 1] <= 3])
    with pytest.raises(MouthError, match="close_mouth: false"):
        mouth_loop(faces, {"lips": inner})  # the only hole is the border, which the lips don't hold
    with pytest.raises(MouthError, match="no 'lips' region"):
        mouth_loop(faces, {"face": np.arange(len(verts))})
    full = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=float)
    with pytest.raises(MouthError, match="no empty rectangle"):
        free_rectangle(full, np.array([[0, 1, 2], [0, 2, 3]]))


@pytest.fixture(scope="module")
def open_head(tmp_path_factory):
    folder = tmp_path_factory.mktemp("head_open")
    paths = generate_head_model(folder, 0, "open")
    return folder, paths


def test_the_flame_like_head_has_an_open_mouth_and_poses_as_the_full_head(open_head):
    folder, paths = open_head
    reduced, full = FlameModel.from_file(paths["flame_model"]), FlameModel.from_file(folder / "ground_truth/flame2023.pkl")
    kept = torch.as_tensor(np.load(folder / "ground_truth/kept_vertices.npy"))
    assert reduced.v_template.shape[0] == len(kept) < full.v_template.shape[0]
    g = torch.Generator().manual_seed(3)
    params = dict(shape=torch.randn(1, 300, generator=g), expr=torch.randn(2, 100, generator=g),
                  jaw_pose=torch.tensor([[0.35, 0.0, 0.0], [0.05, 0.02, 0.0]]),
                  rotation=0.2 * torch.randn(2, 3, generator=g), translation=0.01 * torch.randn(2, 3, generator=g))
    offset = 1e-3 * torch.randn(1, full.v_template.shape[0], 3, generator=g)
    with torch.no_grad():
        v_full, _ = full(**params, static_offset=offset)
        v_reduced, _ = reduced(**params, static_offset=offset[:, kept])
    assert torch.allclose(v_full[:, kept], v_reduced, atol=1e-6)
    model = build_head_model(0)
    loops_full, loops_open = boundary_loops(model.faces), boundary_loops(without_cavity(model)[0].faces)
    assert len(loops_open) == len(loops_full) - 1  # the cavity's rim is gone; the hole between the lips stays


def test_the_avatar_closes_the_mouth_with_gaussians_that_follow_the_lips(open_head):
    folder, paths = open_head
    from lib.flame.safe_pickle import load_pickle
    from lib.geometry.obj_io import read_obj

    flame = FlameModel.from_file(paths["flame_model"])
    obj = read_obj(paths["uv_obj"])
    regions = load_pickle(paths["masks"])
    closure = mouth_faces(flame.v_template.numpy(), flame.faces.numpy(), regions, obj["uvs"], obj["faces_uv"])
    faces, uvs, faces_uv = closure.appended(flame.faces, obj["uvs"], obj["faces_uv"])
    none = {"shape": None, "neck_pose": None, "static_offset": None}
    canon = canonical_mesh(flame, none, None, 20.0)
    jaw = torch.tensor([[0.0, 0.0, 0.0], [0.4, 0.0, 0.0]])
    with torch.no_grad():
        heads, _ = flame(jaw_pose=jaw)
    pca = MeshPCA.fit(torch.cat([heads, canon[None]]), 2)
    args = (regions, pca, 64, 2, [8, 8, 8, 8], 8, 4, 8, 1)
    plain = GaussianAvatar(flame.faces, torch.as_tensor(obj["uvs"]), torch.as_tensor(obj["faces_uv"]), canon, *args)
    closed = GaussianAvatar(faces, uvs, faces_uv, canon, *args)
    on_closure = closed.texel_face >= len(flame.faces)
    assert on_closure.sum() >= 30 and closed.n_gaussians == plain.n_gaussians + on_closure.sum()
    assert closed.region("lips")[on_closure].all()
    with torch.no_grad():
        g = closed(heads, torch.eye(3).expand(2, 3, 3), torch.zeros(2, 3))
    assert all(torch.isfinite(x).all() for x in (g.means, g.quats, g.scales))
    # closed jaw: the strip lies on the lip line; open: its Gaussians spread down with the lower lip
    spread = [g.means[b, on_closure, 1].max() - g.means[b, on_closure, 1].min() for b in range(2)]
    assert spread[1] > 2 * spread[0] + 0.005


def test_masks_label_what_is_seen_through_the_open_mouth_as_mouth_and_keep_it(open_head):
    """Through the open lips a ray meets the inside of the head; the masks cap the rim (a fan) and the avatar
    closes it (a strip): wherever the strip is the front-most surface, the masks say mouth and keep."""
    from lib.dataset.masks import MaskRegions, frame_masks
    from lib.dataset.synthetic_actor import make_rig
    from lib.flame.safe_pickle import load_pickle
    from lib.geometry.rasterize import rasterize_camera

    _, paths = open_head
    flame = FlameModel.from_file(paths["flame_model"])
    regions = load_pickle(paths["masks"])
    with torch.no_grad():
        verts, joints = flame(jaw_pose=torch.tensor([[0.4, 0.0, 0.0]]))
    camera = make_rig(flame.v_template, regions, 9, 0.5)[8]  # the frontal camera
    closure = torch.as_tensor(mouth_faces(flame.v_template.numpy(), flame.faces.numpy(), regions).faces)
    closed = torch.cat([flame.faces, closure])
    seen = rasterize_camera(verts, closed, camera.viewmat[None], camera.K[None], camera.height, camera.width)
    gap = seen.pix_to_face[0] >= len(flame.faces)  # pixels where the strip is the front-most surface
    assert gap.sum() > 20
    keep, mouth = frame_masks(verts[0], joints[0], MaskRegions.of_model(flame, regions), [camera])
    assert mouth[0][gap].float().mean() > 0.99 and keep[0][gap].float().mean() > 0.99
