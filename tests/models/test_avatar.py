import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib.flame.model import FlameModel
from lib.flame.safe_pickle import load_pickle
from lib.flame.synthetic import ensure_head_model
from lib.geometry import uv
from lib.geometry.obj_io import read_obj
from lib.geometry.rotations import axis_angle_to_matrix, matrix_to_quat, quat_to_matrix
from lib.models.avatar import GaussianAvatar, canonical_mesh, cut_weights, split_global_pose
from lib.models.mesh_pca import MeshPCA
from lib.models.texture_unet import ModulatedConv2d


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    paths = ensure_head_model(tmp_path_factory.mktemp("head"))
    flame = FlameModel.from_file(paths["flame_model"])
    obj = read_obj(paths["uv_obj"])
    g = torch.Generator().manual_seed(0)
    n = 12
    params = {"expr": 0.7 * torch.randn(n, flame.n_expr, generator=g),
              "jaw_pose": torch.cat([0.3 * torch.rand(n, 1, generator=g), torch.zeros(n, 2)], 1),
              "neck_pose": 0.1 * torch.randn(n, 3, generator=g), "rotation": 0.3 * torch.randn(n, 3, generator=g),
              "translation": 0.05 * torch.randn(n, 3, generator=g)}
    with torch.no_grad():
        head, R, t = split_global_pose(flame, params)
        world, _ = flame(**params)
        canon = canonical_mesh(flame, {"shape": None, "neck_pose": None, "static_offset": None}, None, 20.0)
    regions = load_pickle(paths["masks"])
    avatar = GaussianAvatar(flame.faces, torch.as_tensor(obj["uvs"]), torch.as_tensor(obj["faces_uv"]), canon,
                            regions, MeshPCA.fit(head, 100), 32, 4, [8, 8, 8], 8, 4, 8, 1)
    return dict(flame=flame, obj=obj, head=head, R=R, t=t, world=world, canon=canon, regions=regions, avatar=avatar)


def test_global_pose_split_reproduces_flame_world_vertices(setup):
    world = setup["head"] @ setup["R"].transpose(-1, -2) + setup["t"][:, None]
    assert torch.allclose(world, setup["world"], atol=1e-6)


def test_zero_residuals_put_gaussians_on_the_posed_mesh_surface_with_its_frames(setup):
    av = setup["avatar"]
    with torch.no_grad():
        g = av(setup["head"][:3], setup["R"][:3], setup["t"][:3])
    faces, tm = setup["flame"].faces, av.texels
    assert torch.allclose(g.means, uv.surface_points(setup["world"][:3], faces, tm), atol=1e-6)
    uvs, faces_uv = torch.as_tensor(setup["obj"]["uvs"]).float(), torch.as_tensor(setup["obj"]["faces_uv"])
    frames = uv.texel_frames(setup["world"][:3], faces, uvs, faces_uv, tm)
    assert torch.allclose(quat_to_matrix(g.quats), frames, atol=1e-4)
    assert torch.allclose(g.opacities, torch.full_like(g.opacities, 0.7))
    assert torch.allclose(g.scales, av.canonical_log_scales.exp()[None, :, None].expand_as(g.scales))


def test_canonical_gaussians_sit_on_the_canonical_mesh(setup):
    av, faces = setup["avatar"], setup["flame"].faces
    on_mesh = uv.surface_points(setup["canon"][None], faces, av.texels)[0]
    assert torch.allclose(av.canonical_positions, on_mesh, atol=1e-7)
    uvs, faces_uv = torch.as_tensor(setup["obj"]["uvs"]).float(), torch.as_tensor(setup["obj"]["faces_uv"])
    frames = uv.texel_frames(setup["canon"][None], faces, uvs, faces_uv, av.texels)[0]
    assert torch.allclose(av.canonical_quats, matrix_to_quat(frames), atol=1e-6)


def test_neck_gaussians_are_removed(setup):
    av = setup["avatar"]
    full = uv.texel_map(torch.as_tensor(setup["obj"]["uvs"]).float(), torch.as_tensor(setup["obj"]["faces_uv"]), 32)
    neck = uv.texel_regions(setup["regions"], setup["flame"].faces, full)["neck"]
    assert neck.sum() > 0
    assert av.n_gaussians == full.n - int(neck.sum())
    assert not av.region("neck").any()
    kept = set(av.texel_index.tolist())
    assert not kept & set(full.index[neck].tolist())


def test_cut_weights_hold_the_gaussians_at_the_neck_cut_and_free_those_away_from_it(setup):
    """regressor.cut_band: 0 (the tracked pose) next to the neck and at the chin's height, 1 (the corrected
    pose) on the upper face, in between across the band; band 0 frees every Gaussian."""
    av, canon, regions = setup["avatar"], setup["canon"], setup["regions"]
    pos = av.canonical_positions
    w = cut_weights(pos, canon, regions, 0.02)
    assert w.shape == (av.n_gaussians,) and float(w.min()) >= 0.0 and float(w.max()) <= 1.0
    to_neck = torch.cdist(pos, canon[torch.as_tensor(regions["neck"]).long()]).amin(1)
    assert float(w[to_neck.argsort()[:10]].max()) < 0.1  # the Gaussians nearest the neck
    for name in ("forehead", "left_eyeball", "nose"):
        assert torch.equal(w[av.region(name)], torch.ones(int(av.region(name).sum()))), name
    assert 0.0 < float(w[(to_neck > 0.005) & (to_neck < 0.01)].mean()) < 1.0  # the fade
    assert torch.equal(cut_weights(pos, canon, regions, 0.0), torch.ones(av.n_gaussians))
    assert torch.equal(av.cut_weight, torch.ones(av.n_gaussians))  # the fixture's avatar: band 0


def test_gaussians_at_the_cut_keep_the_tracked_pose_and_the_others_follow_the_correction(setup):
    av = copy.deepcopy(setup["avatar"])
    av.cut_weight = cut_weights(av.canonical_positions, setup["canon"], setup["regions"], 0.02)
    head, R, t = setup["head"][:1], setup["R"][:1], setup["t"][:1]
    R1, t1 = axis_angle_to_matrix(torch.tensor([[0.02, -0.01, 0.015]])) @ R, t + torch.tensor([[0.002, -0.001, 0.0]])
    with torch.no_grad():
        tracked, corrected = av(head, R, t), av(head, R1, t1)
        mixed = av(head, R1, t1, (R, t))
        assert torch.equal(av(head, R1, t1, (R1, t1)).means, corrected.means)  # nothing corrected: unchanged
    w = av.cut_weight
    assert (w < 0.05).sum() > 5 and (w == 1).sum() > 100 and ((w > 0.2) & (w < 0.8)).sum() > 5
    # a straight fade from where the tracked pose puts a Gaussian to where the corrected one does (both rigid)
    want = tracked.means + w[None, :, None] * (corrected.means - tracked.means)
    assert torch.allclose(mixed.means, want, atol=1e-6)
    assert torch.equal(mixed.means[:, w == 1], corrected.means[:, w == 1])
    for name in ("quats", "scales", "opacities", "colors"):
        assert torch.equal(getattr(mixed, name), getattr(corrected, name)), name


def test_position_residuals_move_gaussians_in_the_posed_texel_frame(setup):
    av = setup["avatar"]
    i = slice(0, 1)
    with torch.no_grad():
        base = av(setup["head"][i], setup["R"][i], setup["t"][i])
        av.generator.head.bias[:3] = torch.tensor([0.0, 0.0, 1.0])  # +1 unit along the canonical normal
        moved = av(setup["head"][i], setup["R"][i], setup["t"][i])
        av.generator.head.bias.zero_()
    # A residual along the canonical normal ends up along the posed (world) normal, same length.
    uvs, faces_uv = torch.as_tensor(setup["obj"]["uvs"]).float(), torch.as_tensor(setup["obj"]["faces_uv"])
    frames_c = av.canonical_frames
    world_frames = uv.texel_frames(setup["world"][i], setup["flame"].faces, uvs, faces_uv, av.texels)[0]
    d = (moved.means - base.means)[0]
    expected = (world_frames @ frames_c.transpose(-1, -2) @ torch.tensor([0.0, 0.0, 0.01]))
    assert torch.allclose(d, expected, atol=1e-6)


def test_mesh_pca_reconstructs_its_meshes_and_whitens_their_coefficients(setup, tmp_path):
    head = setup["head"]
    pca = MeshPCA.fit(head, 100)
    assert pca.n_components == head.shape[0] - 1
    assert torch.allclose(pca.project(head, pca.n_components), head, atol=1e-5)
    z = pca.coefficients(head)
    assert torch.allclose(z.var(0), torch.ones(pca.n_components), atol=1e-3)
    assert (pca.variances[:-1] >= pca.variances[1:]).all()
    loaded = MeshPCA.load(pca.save(tmp_path / "pca.npz"))
    assert torch.equal(loaded.components, pca.components)
    with np.load(tmp_path / "pca.npz") as data:
        assert np.allclose(data["whitening"], 1 / np.sqrt(data["variances"]))


def test_modulated_conv_equals_the_per_sample_modulated_weight():
    torch.manual_seed(0)
    conv = ModulatedConv2d(5, 7, 3, style_dim=4)
    torch.nn.init.normal_(conv.affine.weight)
    x, style = torch.randn(2, 5, 9, 9), torch.randn(2, 4)
    s = conv.affine(style)
    expected = []
    for b in range(2):
        w = conv.weight * conv.scale * s[b][None, :, None, None]
        w = w / w.pow(2).sum((1, 2, 3), keepdim=True).add(1e-8).sqrt()
        expected.append(F.conv2d(x[b:b + 1], w, padding=1) + conv.bias[None, :, None, None])
    assert torch.allclose(conv(x, style), torch.cat(expected), atol=1e-5)


def test_pca_deformation_rides_the_projected_mesh_and_ignores_what_the_pca_cannot_hold(setup):
    """regressor.deform: pca: the Gaussians follow the mesh projected on the network's PCA components, so
    jitter outside that span (tracking noise) moves them not at all; with 'tracked' it moves them."""
    s, tracked = setup, setup["avatar"]
    flame, obj = s["flame"], s["obj"]
    pca_avatar = GaussianAvatar(flame.faces, torch.as_tensor(obj["uvs"]), torch.as_tensor(obj["faces_uv"]), s["canon"],
                                s["regions"], tracked.pca, 32, 4, [8, 8, 8], 8, 4, 8, 1, deform="pca")
    pca_avatar.load_state_dict(tracked.state_dict())
    head, R, t = s["head"][:3], s["R"][:3], s["t"][:3]
    with torch.no_grad():
        _, _, projected = tracked.network_input(head)
        jitter = projected - head  # what the first n_pca components do not hold
        for avatar, moved in ((pca_avatar, False), (tracked, True)):
            a, b = avatar(head, R, t), avatar(projected, R, t)
            assert torch.allclose(a.means, b.means, atol=1e-6) != moved
            assert torch.allclose(a.colors, b.colors)
    assert jitter.abs().max() > 1e-4
    assert torch.allclose(pca_avatar(projected, R, t).means, tracked(projected, R, t).means, atol=1e-6)


def test_the_canonical_mesh_is_made_on_the_device_of_the_flame_model(setup):
    """The meta device stands in for a GPU: a tensor made on the CPU beside the model's fails there as it
    does on CUDA (the opened jaw was made on the CPU, and bench/train_step.py failed on an H200)."""
    flame = copy.deepcopy(setup["flame"]).to("meta")
    verts = canonical_mesh(flame, {"shape": None, "neck_pose": None, "static_offset": None}, None, 20.0)
    assert verts.device.type == "meta" and verts.shape == setup["canon"].shape


def test_bf16_autocast_on_the_generator_hands_float32_gaussians_close_to_float32_ones(setup):
    """train.bf16 (CUDA) runs the generator under bf16 autocast; the assembly after it must stay float32. CPU
    autocast takes the same path here."""
    avatar = copy.deepcopy(setup["avatar"])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in avatar.parameters():
            p.add_(0.05 * torch.randn_like(p))  # away from the zero-initialised output layer
    pose = (setup["head"][:1], setup["R"][:1], setup["t"][:1])
    exact = avatar(*pose)
    avatar.bf16 = True
    half = avatar(*pose)
    for name in ("means", "quats", "scales", "opacities", "colors"):
        a, b = getattr(exact, name), getattr(half, name)
        assert b.dtype == torch.float32, name
        if name != "colors":  # the colour head runs outside autocast
            assert (a - b).abs().max() > 0, name  # autocast did run the generator in bf16
        assert torch.allclose(a, b, rtol=0.05, atol=0.05 * a.abs().max().item()), name
    sum(getattr(half, name).sum() for name in ("means", "scales", "colors")).backward()
    assert all(torch.isfinite(p.grad).all() for p in avatar.parameters() if p.grad is not None)
