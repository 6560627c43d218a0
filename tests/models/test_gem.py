"""GEM: per-attribute PCA of Gaussian sequences, sigma units, parts, poses and the file."""
import numpy as np
import pytest
import torch

from lib.atomic import is_partial
from lib.errors import DiskFullError
from lib.flame.model import FlameModel
from lib.geometry.rotations import axis_angle_to_matrix, matrix_to_quat, normalize_quat, quat_to_matrix
from lib.lock import locked
from lib.models.frame_store import FrameStore
from lib.models.gem import (
    ATTRIBUTES, GaussianEigenModel, GaussianSet, GemError, align_quats, assign_parts, gaussian_order, gem_pose,
    part_groups, reconstruction_errors, to_gem_space, transform,
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


def _flipped(frames: GaussianSet, seed: int = 3) -> GaussianSet:
    """The same rotations with random quaternion signs."""
    flips = torch.where(torch.rand(frames.quats.shape[:2] + (1,), generator=torch.Generator().manual_seed(seed)) < 0.5,
                        -1.0, 1.0)
    return frames._replace(quats=frames.quats * flips)


def _three_parts(N: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """Parts a, b, c of random Gaussians (interleaved, as real parts are in texel order)."""
    return ["a", "b", "c"], torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(seed))


def _stored(folder, frames: GaussianSet, parts=None, chunk_bytes=20_000) -> FrameStore:
    """A FrameStore of frames, written in uneven batches of timesteps (1, 5, the rest)."""
    store = FrameStore(folder, gaussian_order(parts), chunk_bytes=chunk_bytes)
    T = frames.means.shape[0]
    for a, b in ((0, 1), (1, min(6, T)), (min(6, T), T)):
        store.append(GaussianSet(*(x[a:b] for x in frames)))
    return store


@pytest.mark.parametrize("with_parts", [False, True])
def test_fit_matches_an_svd_of_every_block(with_parts):
    """The in-memory fit against numpy's SVD of each block's centred data (rotations sign-aligned to frame 0)."""
    T, N = 13, 240
    frames = _flipped(low_rank_sequence(T=T, N=N, rank=20, seed=5))
    parts = _three_parts(N, seed=1) if with_parts else None
    counts = {"positions": 6, "rotations": 5, "scales": 12, "opacities": 3}
    model = GaussianEigenModel.fit(frames, counts, parts=parts)
    for attr in ATTRIBUTES:
        x = frames.attribute(attr).double()
        if attr == "rotations":
            x = x * torch.where((x * x[0]).sum(-1, keepdim=True) < 0, -1.0, 1.0).double()
        for block, (_, index) in zip(model.blocks[attr], part_groups(parts)):
            data = (x if index is None else x[:, index]).reshape(T, -1).numpy()
            centred = data - data.mean(0)
            u, s, vt = np.linalg.svd(centred, full_matrices=False)
            k = counts[attr]
            assert np.allclose(block.mean.numpy(), data.mean(0), atol=1e-7)
            assert np.allclose(block.eigenvalues.numpy(), s[:k] ** 2 / (T - 1), rtol=1e-5)
            sign = np.sign((block.basis.double().numpy() * vt[:k]).sum(1))
            assert np.allclose(block.basis.numpy(), sign[:, None] * vt[:k], atol=2e-5)


@pytest.mark.parametrize("chunk_bytes", [20_000, 1 << 18])  # many column blocks / batches of 4 frames
@pytest.mark.parametrize("with_parts", [False, True])
def test_fit_from_a_frame_store_equals_the_fit_in_memory(tmp_path, with_parts, chunk_bytes):
    T, N = 13, 300
    frames = _flipped(low_rank_sequence(T=T, N=N, rank=20, seed=2))
    parts = _three_parts(N, seed=4) if with_parts else None
    counts = {"positions": 6, "rotations": 5, "scales": 7, "opacities": 12}
    memory = GaussianEigenModel.fit(frames, counts, parts=parts)
    with _stored(tmp_path, frames, parts, chunk_bytes) as store:
        assert store.nbytes == T * N * 11 * 4
        streamed = GaussianEigenModel.fit(store, counts, parts=parts)
        batches = [b.means.shape[0] for b in store.batches()]
        assert sum(batches) == T and (batches[0] == 1 if chunk_bytes == 20_000 else batches[0] == 4)
        for batch, start in zip(store.batches(), np.cumsum([0] + batches)):
            stop = start + batch.means.shape[0]
            assert torch.equal(batch.means, frames.means[start:stop])  # in the Gaussians' own order again
            assert torch.equal(batch.quats, align_quats(frames.quats[start:stop], frames.quats[0]))
    assert streamed.parts == memory.parts and torch.equal(streamed.colors, frames.colors[0])
    for attr in ATTRIBUTES:
        for a, b in zip(memory.blocks[attr], streamed.blocks[attr]):
            assert torch.equal(a.index, b.index) if a.index is not None else b.index is None
            assert torch.allclose(a.mean, b.mean, atol=1e-7)
            assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-6)
            sign = torch.sign((a.basis * b.basis).sum(1))
            assert torch.allclose(a.basis, sign[:, None] * b.basis, atol=1e-6)
        # coefficients are the same projections (up to each component's sign)
        sign = torch.sign((memory.coefficients[attr] * streamed.coefficients[attr]).sum(0))
        assert torch.allclose(memory.coefficients[attr], sign * streamed.coefficients[attr], atol=1e-5)
    for x, y in zip(memory.reconstruct(memory.coefficients), streamed.reconstruct(streamed.coefficients)):
        assert torch.allclose(x, y, atol=1e-6)


def _errors_in_memory(model: GaussianEigenModel, frames: GaussianSet) -> dict:
    """reconstruction_errors as it was computed with every frame in memory (the reference)."""
    rebuilt = model.reconstruct(model.project(frames))
    errors = {}
    for attr in ATTRIBUTES:
        a, b = frames.attribute(attr).float(), rebuilt.attribute(attr).float()
        if attr == "rotations":
            a = normalize_quat(a)
            a = align_quats(a, a[0])
            b = align_quats(b, a)
        rms = float((a - b).pow(2).sum(-1).mean().sqrt())
        spread = float((a - a.mean(0)).pow(2).sum(-1).mean().sqrt())
        errors[attr] = {"rms": rms, "relative": rms / spread}
    return errors


def test_streamed_reconstruction_errors_equal_the_in_memory_ones(tmp_path):
    T, N = 13, 300
    frames = _flipped(low_rank_sequence(T=T, N=N, rank=10, seed=7))
    labels = torch.arange(N) % 2
    model = GaussianEigenModel.fit(frames, {a: 3 for a in ATTRIBUTES}, parts=(["a", "b"], labels))
    reference = _errors_in_memory(model, frames)
    assert min(e["relative"] for e in reference.values()) > 0.1  # a real error, not round-off
    with _stored(tmp_path, frames) as store:
        from_store = reconstruction_errors(model, store.batches())
    one_by_one = reconstruction_errors(model, (frames.frame(t) for t in range(T)))
    whole = reconstruction_errors(model, frames)
    for errors in (from_store, one_by_one, whole):
        for attr in ATTRIBUTES:
            assert errors[attr]["rms"] == pytest.approx(reference[attr]["rms"], rel=1e-6)
            assert errors[attr]["relative"] == pytest.approx(reference[attr]["relative"], rel=1e-6)


def test_the_frame_store_file_is_deleted_when_the_build_ends_or_raises(tmp_path):
    frames = low_rank_sequence(T=4, N=50)
    with _stored(tmp_path, frames) as store:
        files = list(tmp_path.iterdir())
        assert files == [store.path] and is_partial(store.path) and store.path.stat().st_size == store.nbytes
    assert not list(tmp_path.iterdir())
    with pytest.raises(GemError, match="at least 2 frames"):
        with FrameStore(tmp_path) as store:
            store.append(frames.frame(0))
            GaussianEigenModel.fit(store, FULL)
    assert not list(tmp_path.iterdir())


def test_a_frame_store_left_by_a_killed_run_is_removed_by_the_next_run(tmp_path):
    store = _stored(tmp_path, low_rank_sequence(T=4, N=50))  # never closed: as a killed process leaves it
    assert store.path.exists()
    with locked(tmp_path, "the GEM folder"):  # what the next stage-3 run does first
        assert not store.path.exists()
    store.close()


def test_a_full_disk_while_writing_the_frame_store_is_a_disk_full_error(tmp_path, fill_disk):
    fill_disk()
    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*\.frames\.f32\..*partial"):
        with FrameStore(tmp_path) as store:
            store.append(low_rank_sequence(T=2, N=50))
    assert not list(tmp_path.iterdir())


def test_fit_refuses_a_store_written_in_another_order_than_its_parts(tmp_path):
    frames = low_rank_sequence(T=4, N=50)
    with _stored(tmp_path, frames) as store, pytest.raises(GemError, match="another Gaussian order"):
        GaussianEigenModel.fit(store, FULL, parts=(["a", "b"], torch.arange(50) % 2))


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
