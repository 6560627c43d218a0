import numpy as np
import pytest
import torch

from lib.flame.model import FlameModel
from lib.flame.safe_pickle import load_pickle
from lib.flame.synthetic import ensure_head_model
from lib.geometry import uv
from lib.geometry.obj_io import read_obj


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    paths = ensure_head_model(tmp_path_factory.mktemp("head"))
    flame = FlameModel.from_file(paths["flame_model"])
    obj = read_obj(paths["uv_obj"])
    g = torch.Generator().manual_seed(0)
    verts, _ = flame(expr=0.8 * torch.randn(1, flame.n_expr, generator=g), jaw_pose=torch.tensor([[0.25, 0.0, 0.0]]),
                     rotation=torch.tensor([[0.1, 0.4, -0.05]]))
    return dict(flame=flame, verts=verts, uvs=torch.as_tensor(obj["uvs"]).float(),
                faces_uv=torch.as_tensor(obj["faces_uv"]), regions=load_pickle(paths["masks"]))


def test_only_covered_texels_are_valid_and_lie_inside_their_uv_triangle(head):
    tm = uv.texel_map(head["uvs"], head["faces_uv"], 32)
    assert 0 < tm.n < 32 * 32
    assert tm.valid_mask().sum() == tm.n
    assert (tm.bary > -1e-4).all() and torch.allclose(tm.bary.sum(1), torch.ones(tm.n), atol=1e-5)
    # The texel centre is where its barycentrics point in the UV triangle (v axis: row 0 at the top).
    corners = head["uvs"][head["faces_uv"][tm.face]]  # [N, 3, 2]
    centre = (tm.bary[..., None] * corners).sum(1)
    rows, cols = tm.index // 32, tm.index % 32
    expected = torch.stack([(cols + 0.5) / 32, 1 - (rows + 0.5) / 32], 1)
    assert torch.allclose(centre, expected, atol=1e-5)


def test_texel_frames_are_right_handed_orthonormal_with_the_normal_outwards(head):
    tm = uv.texel_map(head["uvs"], head["faces_uv"], 64)
    frames = uv.texel_frames(head["verts"], head["flame"].faces, head["uvs"], head["faces_uv"], tm)[0]
    eye = torch.eye(3).expand_as(frames)
    assert torch.allclose(frames.transpose(-1, -2) @ frames, eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(frames), torch.ones(tm.n), atol=1e-5)
    # The third column is the surface normal: it agrees with the face's geometric normal.
    p = head["verts"][0][head["flame"].faces[tm.face]]
    face_n = torch.nn.functional.normalize(torch.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=-1), dim=-1)
    assert (frames[:, :, 2] * face_n).sum(-1).median() > 0.95


def test_tangent_follows_increasing_u_on_the_surface(head):
    tm = uv.texel_map(head["uvs"], head["faces_uv"], 64)
    faces, verts = head["flame"].faces, head["verts"]
    frames = uv.texel_frames(verts, faces, head["uvs"], head["faces_uv"], tm)[0]
    # Step a little along +u inside each texel's face: the surface moves along the tangent.
    t_uv = head["uvs"][head["faces_uv"][tm.face]]  # [N, 3, 2]
    m = torch.stack([t_uv[:, 1] - t_uv[:, 0], t_uv[:, 2] - t_uv[:, 0]], 2)  # d(u, v) / d(l1, l2)
    dl = torch.linalg.solve(m, torch.tensor([1e-3, 0.0]).expand(tm.n, 2))  # [N, 2]
    p = verts[0][faces[tm.face]]
    dp = dl[:, :1] * (p[:, 1] - p[:, 0]) + dl[:, 1:] * (p[:, 2] - p[:, 0])
    cos = (torch.nn.functional.normalize(dp, dim=-1) * frames[:, :, 0]).sum(-1)
    assert cos.median() > 0.95


def test_surface_points_lie_on_their_faces(head):
    tm = uv.texel_map(head["uvs"], head["faces_uv"], 32)
    pts = uv.surface_points(head["verts"], head["flame"].faces, tm)[0]
    p = head["verts"][0][head["flame"].faces[tm.face]]
    n = torch.nn.functional.normalize(torch.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=-1), dim=-1)
    assert ((pts - p[:, 0]) * n).sum(-1).abs().max() < 1e-6


def test_regions_follow_the_nearest_vertex_and_maps_round_trip(head):
    tm = uv.texel_map(head["uvs"], head["faces_uv"], 32)
    regions = uv.texel_regions(head["regions"], head["flame"].faces, tm)
    neck = set(np.asarray(head["regions"]["neck"]).tolist())
    nearest = head["flame"].faces[tm.face].gather(1, tm.bary.argmax(1, keepdim=True))[:, 0]
    assert regions["neck"].tolist() == [int(v) in neck for v in nearest]
    assert 0 < int(regions["neck"].sum()) < tm.n
    values = torch.randn(2, tm.n, 5)
    assert torch.equal(uv.gather_texels(uv.scatter_texels(values, tm), tm), values)


def test_knn_scale_is_the_rms_distance_to_three_neighbours():
    points = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3], [10, 10, 10]])
    expected = np.log(np.sqrt((1 + 4 + 9) / 3))
    assert uv.knn_log_scale(points)[0].item() == pytest.approx(expected, rel=1e-6)
