"""GEM: per-attribute PCA of Gaussian sequences, sigma units, parts, poses and the file."""
import numpy as np
import pytest
import torch

from lib.flame.model import FlameModel
from lib.geometry.rotations import axis_angle_to_matrix, matrix_to_quat, normalize_quat, quat_to_matrix
from lib.models.gem import (
    ATTRIBUTES, GaussianEigenModel, GaussianSet, GemError, assign_parts, gem_pose, reconstruction_errors,
    to_gem_space, transform,
)

FULL = {"positions": 50, "rotations": 40, "scales": 40, "opacities": 50}


def low_rank_sequence(T=12, N=300, rank=4, seed=0) -> GaussianSet:
    """T frames whose every attribute is its mean plus `rank` random directions (exactly rank `rank`).

    Quaternions are raw (not normalised), as GEM models them, and stay near a base rotation so that
    no sign flip occurs. Scales and opacities stay inside their valid ranges.
    """
    g = torch.Generator().manual_seed(seed)

    def sequence(C, base, amplitude):
        dirs = torch.randn(rank, N * C, generator=g, dtype=torch.float64)
        dirs = dirs / dirs.norm(dim=1, keepdim=True) * (N * C) ** 0.5  # unit RMS per value
        weights = torch.randn(T, rank, generator=g, dtype=torch.float64)
        return (base.reshape(1, -1) + amplitude * weights @ dirs).reshape(T, N, C)

    base_quat = matrix_to_quat(axis_angle_to_matrix(torch.randn(N, 3, generator=g, dtype=torch.float64)))
    return GaussianSet(
        means=sequence(3, torch.randn(N, 3, generator=g, dtype=torch.float64) * 0.1, 0.002).float(),
        quats=sequence(4, base_quat, 0.02).float(),
        scales=sequence(3, torch.full((N, 3), 0.01, dtype=torch.float64), 0.0005).float(),
        opacities=sequence(1, torch.full((N, 1), 0.6, dtype=torch.float64), 0.02)[..., 0].float(),
        colors=torch.rand(1, N, 3, generator=g).expand(T, N, 3),
    )


def test_fit_rebuilds_a_low_rank_sequence_exactly():
    frames = low_rank_sequence(rank=4)
    model = GaussianEigenModel.fit(frames, FULL)
    for attr in ATTRIBUTES:
        assert model.n_components(attr) == 4  # numerically zero directions are dropped
    rebuilt = model.reconstruct(model.coefficients)
    assert torch.allclose(rebuilt.means, frames.means, atol=2e-6)
    assert torch.allclose(rebuilt.quats, normalize_quat(frames.quats), atol=2e-6)
    assert torch.allclose(rebuilt.scales, frames.scales, atol=2e-6)
    assert torch.allclose(rebuilt.opacities, frames.opacities, atol=2e-6)
    assert torch.equal(rebuilt.colors[0], frames.colors[0])
    assert max(e["rms"] for e in reconstruction_errors(model, frames).values()) < 2e-6


def test_fewer_components_leave_the_energy_of_the_dropped_singular_values():
    frames = low_rank_sequence(rank=6, T=15)
    model = GaussianEigenModel.fit(frames, {a: 2 for a in ATTRIBUTES})
    x = frames.means.reshape(15, -1).double().numpy()
    singular = np.linalg.svd(x - x.mean(0), compute_uv=False)
    rebuilt = model.reconstruct(model.coefficients).means.reshape(15, -1).double().numpy()
    residual = ((rebuilt - x) ** 2).sum()
    assert residual == pytest.approx((singular[2:] ** 2).sum(), rel=1e-3)
    assert np.allclose(model.blocks["positions"][0].eigenvalues.numpy(), singular[:2] ** 2 / 14, rtol=1e-4)


def test_training_coefficients_are_in_sigma_units_and_match_projection():
    frames = low_rank_sequence(rank=5, T=20)
    model = GaussianEigenModel.fit(frames, FULL)
    for attr in ATTRIBUTES:
        c = model.coefficients[attr]
        assert torch.allclose(c.mean(0), torch.zeros(c.shape[1]), atol=1e-5)
        assert torch.allclose(c.std(0, unbiased=True), torch.ones(c.shape[1]), atol=1e-4)
    projected = model.project(frames)
    for attr in ATTRIBUTES:
        assert torch.allclose(projected[attr], model.coefficients[attr], atol=1e-3)
    # One sigma along component k moves the attribute by sqrt(lambda_k) in the basis direction.
    c = model.zero_coefficients()
    c["positions"][0, 1] = 1.0
    moved = model.reconstruct(c).means - model.reconstruct(model.zero_coefficients()).means
    block = model.blocks["positions"][0]
    assert torch.allclose(moved.reshape(-1), block.eigenvalues[1].sqrt() * block.basis[1], atol=1e-6)


def test_component_count_is_capped_by_the_number_of_frames():
    model = GaussianEigenModel.fit(low_rank_sequence(T=5, rank=8), FULL)
    assert all(model.n_components(a) == 4 for a in ATTRIBUTES)
    with pytest.raises(GemError, match="at least 2 frames"):
        GaussianEigenModel.fit(low_rank_sequence(T=1), FULL)


def test_rotations_are_renormalised_and_sign_flips_do_not_matter():
    frames = low_rank_sequence(rank=3)
    flips = torch.where(torch.rand(frames.quats.shape[:2] + (1,), generator=torch.Generator().manual_seed(3)) < 0.5,
                        -1.0, 1.0)
    flipped = frames._replace(quats=frames.quats * flips)  # same rotations, random signs
    model = GaussianEigenModel.fit(flipped, FULL)
    assert model.n_components("rotations") == 3  # the flips were undone before the PCA
    c = model.zero_coefficients()
    c["rotations"][0] = 3.0  # far out: raw quaternions leave the unit sphere
    quats = model.reconstruct(c).quats
    assert torch.allclose(quats.norm(dim=-1), torch.ones(quats.shape[:2]), atol=1e-6)
    rebuilt = model.reconstruct(model.project(flipped)).quats
    assert torch.allclose(quat_to_matrix(rebuilt), quat_to_matrix(flipped.quats), atol=1e-5)


def test_scales_and_opacities_stay_in_their_ranges_far_from_the_data():
    model = GaussianEigenModel.fit(low_rank_sequence(rank=3), FULL)
    c = {a: torch.full((1, model.n_components(a)), 40.0) for a in ATTRIBUTES}
    g = model.reconstruct(c)
    assert g.scales.min() >= 0 and g.opacities.min() >= 0 and g.opacities.max() <= 1


def test_parts_fit_one_basis_per_region_and_move_only_their_gaussians():
    frames = low_rank_sequence(rank=4, N=200)
    labels = torch.arange(200) % 3
    model = GaussianEigenModel.fit(frames, {a: 3 for a in ATTRIBUTES}, parts=(["a", "b", "c"], labels))
    assert model.parts == ["a", "b", "c"]
    assert model.n_components("positions") == 9
    assert model.component_labels("scales")[3] == ("b", 0)
    full = GaussianEigenModel.fit(frames, {a: 4 for a in ATTRIBUTES}, parts=(["a", "b", "c"], labels))
    rebuilt = full.reconstruct(full.coefficients)
    assert torch.allclose(rebuilt.means, frames.means, atol=2e-6)
    c = model.zero_coefficients()
    c["positions"][0, 3] = 2.0  # part "b", first component
    moved = (model.reconstruct(c).means - model.reconstruct(model.zero_coefficients()).means).norm(dim=-1)[0]
    assert moved[labels == 1].max() > 0 and moved[labels != 1].max() == 0


def test_parts_follow_the_nearest_canonical_vertex_with_region_priority():
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]])
    masks = {"face": np.array([0, 1, 2]), "nose": np.array([1]), "left_eyeball": np.array([2])}
    positions = torch.tensor([[0.1, 0, 0], [0.9, 0, 0], [2.2, 0, 0], [3.3, 0, 0], [1.1, 0, 0]])
    names, labels = assign_parts(positions, verts, masks)
    assert names == ["eyeballs", "nose", "face", "rest"]
    assert [names[i] for i in labels] == ["face", "nose", "eyeballs", "rest", "nose"]


def test_save_load_round_trip_and_fp16_option(tmp_path):
    frames = low_rank_sequence(rank=4, N=400)
    labels = (torch.arange(400) % 2)
    model = GaussianEigenModel.fit(frames, FULL, timesteps=torch.arange(10, 22), parts=(["x", "y"], labels),
                                   extras={"texel_index": torch.arange(400) * 3})
    path = model.save(tmp_path / "gem.pt")
    loaded = GaussianEigenModel.load(path)
    assert loaded.parts == ["x", "y"] and torch.equal(loaded.timesteps, torch.arange(10, 22))
    assert torch.equal(loaded.extras["texel_index"], torch.arange(400) * 3)
    a, b = model.reconstruct(model.coefficients), loaded.reconstruct(loaded.coefficients)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not list(tmp_path.glob(".*partial*"))  # the temp file of the atomic write is gone

    half = model.save(tmp_path / "gem16.pt", half=True)
    basis_values = sum(b.basis.numel() for blocks in model.blocks.values() for b in blocks)
    saved = path.stat().st_size - half.stat().st_size  # 2 bytes per basis value, headers aside
    assert 2 * basis_values <= saved + 4096 and saved <= 2 * basis_values + 4096
    # nbytes writes to memory; a file's archive only adds its own name inside.
    assert abs(model.nbytes(half=True) - half.stat().st_size) < 1024
    assert abs(model.nbytes() - path.stat().st_size) < 1024
    loaded16 = GaussianEigenModel.load(half)
    assert loaded16.blocks["positions"][0].basis.dtype == torch.float32
    c = loaded16.reconstruct(loaded16.coefficients)
    assert (c.means - a.means).abs().max() < 1e-5  # fp16 bases: far below a pixel


def test_corrupt_or_foreign_files_give_a_clear_error(tmp_path):
    model = GaussianEigenModel.fit(low_rank_sequence(rank=2, T=4, N=50), FULL)
    path = model.save(tmp_path / "gem.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(GemError, match="truncated.pt is corrupt.*pca_gauss.py"):
        GaussianEigenModel.load(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.zeros(3)}, foreign)
    with pytest.raises(GemError, match="not a GEM file"):
        GaussianEigenModel.load(foreign)
    with pytest.raises(GemError, match="not found.*pca_gauss.py"):
        GaussianEigenModel.load(tmp_path / "missing.pt")


def _flame_without_correctives() -> FlameModel:
    """A 6-vertex FLAME-format model, no pose correctives; vertex 5 follows only the jaw."""
    rng = np.random.default_rng(0)
    weights = np.zeros((6, 5))
    weights[np.arange(6), [0, 1, 1, 3, 4, 2]] = 1.0
    regressor = np.eye(5, 6)
    return FlameModel.from_dict({
        "v_template": rng.normal(scale=0.1, size=(6, 3)), "f": np.array([[0, 1, 2], [3, 4, 5]]),
        "shapedirs": rng.normal(scale=0.01, size=(6, 3, 4)), "posedirs": np.zeros((6, 3, 36)),
        "J_regressor": regressor, "weights": weights,
        "kintree_table": np.array([[-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
    }, n_shape=4, n_expr=0)


def test_gem_pose_maps_the_neck_free_head_onto_the_world_mesh():
    flame = _flame_without_correctives()
    g = torch.Generator().manual_seed(1)
    params = {"shape": torch.randn(2, 4, generator=g), "expr": None,
              "rotation": 0.4 * torch.randn(2, 3, generator=g), "neck_pose": 0.3 * torch.randn(2, 3, generator=g),
              "jaw_pose": 0.2 * torch.randn(2, 3, generator=g), "eyes_pose": 0.1 * torch.randn(2, 6, generator=g),
              "translation": torch.randn(2, 3, generator=g), "static_offset": None}
    world, _ = flame(**params)
    neck_free, _ = flame(**{**params, "rotation": None, "translation": None, "neck_pose": None})
    R, t = gem_pose(flame, params)
    mapped = neck_free @ R.transpose(-1, -2) + t[:, None]
    # Vertices 1..5 hang below the neck (neck, jaw, eyes); vertex 0 is the root's and moves otherwise.
    assert torch.allclose(mapped[:, 1:], world[:, 1:], atol=1e-5)
    assert not torch.allclose(mapped[:, 0], world[:, 0], atol=1e-3)


def test_to_gem_space_inverts_the_pose_on_means_and_rotations():
    frames = low_rank_sequence(rank=2, T=3, N=20)
    frames = frames._replace(quats=normalize_quat(frames.quats))
    R = axis_angle_to_matrix(torch.randn(3, 3))
    t = torch.randn(3, 3)
    world = transform(frames, R, t)
    assert torch.allclose(world.means[1, 0], R[1] @ frames.means[1, 0] + t[1], atol=1e-6)
    assert torch.allclose(quat_to_matrix(world.quats), R[:, None] @ quat_to_matrix(frames.quats), atol=1e-5)
    back = to_gem_space(world, R, t)
    assert torch.allclose(back.means, frames.means, atol=1e-5)
    assert torch.allclose(quat_to_matrix(back.quats), quat_to_matrix(frames.quats), atol=1e-5)


def test_evaluate_applies_the_pose_after_the_basis():
    frames = low_rank_sequence(rank=3, T=6, N=30)
    model = GaussianEigenModel.fit(frames, FULL)
    R, t = axis_angle_to_matrix(torch.tensor([[0.0, 0.5, 0.0]])), torch.tensor([[0.1, 0.2, 1.0]])
    c = {a: x[2:3] for a, x in model.coefficients.items()}
    world = model.evaluate(c, R, t)
    assert torch.allclose(world.means, frames.means[2:3] @ R.transpose(-1, -2) + t[:, None], atol=1e-5)


def test_truncated_model_keeps_the_first_components_of_every_part():
    frames = low_rank_sequence(rank=5, N=120)
    labels = torch.arange(120) % 2
    model = GaussianEigenModel.fit(frames, {a: 5 for a in ATTRIBUTES}, parts=(["a", "b"], labels))
    small = model.truncated({a: 2 for a in ATTRIBUTES})
    assert small.n_components("positions") == 4
    assert torch.equal(small.coefficients["scales"], model.coefficients["scales"][:, [0, 1, 5, 6]])
    # Orthonormal bases: projecting on the truncated basis keeps the same leading coefficients.
    assert torch.allclose(small.project(frames)["positions"], small.coefficients["positions"], atol=1e-3)
    assert small.nbytes() < 0.75 * model.nbytes()  # the dropped components leave the file


def test_render_gem_folds_the_pose_into_the_camera_and_matches_posed_gaussians():
    from lib.dataset.cameras import Camera
    from lib.gaussians.render import render
    from lib.models.gem import render_gem

    frames = low_rank_sequence(rank=2, T=4, N=150)
    model = GaussianEigenModel.fit(frames, FULL)
    R, t = axis_angle_to_matrix(torch.tensor([[0.1, 0.6, -0.2]])), torch.tensor([[0.02, -0.01, 0.05]])
    cam = Camera.look_at((0.1, 0.0, 0.7), (0.0, 0.0, 0.0), torch.tensor([[80.0, 0, 24], [0, 80.0, 20], [0, 0, 1]]),
                         48, 40)
    c = {a: x[1:2] for a, x in model.coefficients.items()}
    image = render_gem(model, c, R, t, cam.viewmat[None], cam.K[None], 48, 40, torch.ones(3)).rgb
    g = model.evaluate(c, R, t)
    expected = render(g.means[0], g.quats[0], g.scales[0], g.opacities[0], g.colors[0], cam.viewmat[None], cam.K[None],
                      48, 40, torch.ones(3)).rgb
    assert (expected < 0.99).any()  # something is in view
    assert torch.allclose(image, expected, atol=1e-4)
