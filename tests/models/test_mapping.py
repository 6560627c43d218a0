"""The mapping network (stage 4): bounded output, per-part MLPs, coefficient regression, checkpoints,
and the identity-relative driving signal."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.config import load_config
from lib.dataset.vhap import DatasetError, read_flame_params
from lib.models.gem import GaussianEigenModel, GaussianSet, GemError
from lib.models.mapping import (
    BOUND, MappingNetwork, coefficient_loss, coefficient_parts, flatten_coefficients, hold_at_mean,
    split_coefficients, variance_weights,
)
from lib.paths import REPO_ROOT
from lib.train.checkpoint import CheckpointError
from lib.train.fit_mapping import driving_signals, load_mapping, save_mapping

T, N, S = 16, 24, 5
COUNTS = {"positions": 6, "rotations": 4, "scales": 4, "opacities": 3}


def toy_gem(parts: bool = False) -> tuple[GaussianEigenModel, torch.Tensor]:
    """A GEM of T frames whose Gaussians move with a smooth function of an S-value signal."""
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(T, S, generator=g)
    motion = torch.tanh(signal @ torch.randn(S, 8, generator=g))  # [T, 8]

    def attr(C):
        return (motion @ torch.randn(8, N * C, generator=g) * 0.1).view(T, N, C) + torch.randn(1, N, C, generator=g)

    quats = attr(4) + torch.tensor([3.0, 0, 0, 0])
    frames = GaussianSet(attr(3), quats, attr(3).abs() + 0.1, attr(1)[..., 0].sigmoid(), torch.rand(T, N, 3, generator=g))
    split = (["a", "b"], (torch.arange(N) % 2)) if parts else None
    return GaussianEigenModel.fit(frames, COUNTS, parts=split), signal


def test_output_is_bounded_by_2_9_sigma_even_for_huge_signals():
    gem, _ = toy_gem()
    _, labels = coefficient_parts(gem)
    net = MappingNetwork(S, labels, width=32).eval()
    out = net(torch.randn(64, S) * 1e4)
    assert out.abs().max() <= BOUND + 1e-6
    assert out.abs().max() > 2.5  # saturates towards the bound, not at a smaller one


def test_one_mlp_per_part_writes_only_its_parts_coefficients():
    gem, _ = toy_gem(parts=True)
    names, labels = coefficient_parts(gem)
    assert names == ["a", "b"] and labels.shape[0] == sum(gem.n_components(a) for a in COUNTS)
    net = MappingNetwork(S, labels, width=16).eval()
    assert len(net.mlps) == 2
    with torch.no_grad():
        net.mlps[1][-1].weight.zero_()
        net.mlps[1][-1].bias.zero_()
        out = net(torch.randn(3, S))
    assert (out[:, labels == 1] == 0).all() and (out[:, labels == 0] != 0).all()
    assert set(split_coefficients(gem, out)) == set(COUNTS)


def test_coefficient_regression_lowers_the_loss_on_a_toy_gem():
    torch.manual_seed(0)
    gem, signal = toy_gem()
    target = flatten_coefficients(gem.coefficients)
    net = MappingNetwork(S, coefficient_parts(gem)[1], width=64)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    with torch.no_grad():
        before = coefficient_loss(net.eval()(signal), target).item()
    net.train()
    for _ in range(300):
        loss = coefficient_loss(net(signal), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = coefficient_loss(net.eval()(signal), target).item()
    assert after < 0.5 * before, (before, after)


def _config(tmp_path: Path, signal: str = "flame"):
    experiments = os.path.relpath(tmp_path / "experiments", REPO_ROOT)
    return load_config(None, [f"actor.experiments_dir={experiments}", "mapping.width=16", f"mapping.signal={signal}"])


def test_checkpoint_round_trip_restores_the_same_network(tmp_path):
    gem, signal = toy_gem(parts=True)
    cfg = _config(tmp_path)
    net = MappingNetwork(S, coefficient_parts(gem)[1], width=16, signal_scale=torch.rand(S) + 0.5).eval()
    save_mapping(cfg, net, torch.optim.AdamW(net.parameters()), 7)
    loaded, state = load_mapping(cfg, gem, "cpu")
    assert state["step"] == 7 and not loaded.training
    assert torch.equal(loaded.signal_scale, net.signal_scale)
    with torch.no_grad():
        assert torch.equal(loaded(signal), net(signal))
    with pytest.raises(CheckpointError, match="mesh_pca"):
        load_mapping(_config(tmp_path, "mesh_pca"), gem, "cpu")


class _Export:
    """The part of VhapExport that driving_signals reads: per-split timesteps and their FLAME files."""

    def __init__(self, root: Path, splits: dict[str, list[int]]):
        self.root, self.splits = root, splits

    def timesteps(self, split):
        return [(t, self.root / f"{t:05d}.npz") for t in self.splits.get(split, [])]

    def load_flame(self, path):
        return read_flame_params(path)


def test_flame_signal_is_zero_at_the_identity_frame(tmp_path):
    rng = np.random.default_rng(0)
    params = {}
    for t in range(6):
        params[t] = {"shape": rng.normal(size=8), "expr": rng.normal(size=(1, 10)), "rotation": rng.normal(size=(1, 3)),
                     "neck_pose": rng.normal(size=(1, 3)), "jaw_pose": rng.normal(size=(1, 3)),
                     "eyes_pose": rng.normal(size=(1, 6)), "translation": rng.normal(size=(1, 3))}
        np.savez(tmp_path / f"{t:05d}.npz", **params[t])
    export = _Export(tmp_path, {"train": [0, 1, 2, 3], "test": [4, 5]})
    cfg = load_config(None, ["actor.identity_timestep=2"])
    signal = driving_signals(cfg, export, list(range(6)))
    assert signal.shape == (6, 10 + 3 + 6)
    assert torch.equal(signal[2], torch.zeros(19))
    raw = lambda t: np.concatenate([params[t][k].ravel() for k in ("expr", "jaw_pose", "eyes_pose")])  # noqa: E731
    np.testing.assert_allclose(signal[5].numpy(), raw(5) - raw(2), atol=1e-6)
    np.testing.assert_allclose(driving_signals(cfg, export, [5, 1]).numpy(), signal[[5, 1]].numpy(), atol=1e-6)
    with pytest.raises(DatasetError, match="identity_timestep"):
        driving_signals(load_config(None, ["actor.identity_timestep=9"]), export, [0])
    with pytest.raises(DatasetError, match="timestep 7 is not"):
        driving_signals(cfg, export, [7])


def test_variance_weights_follow_the_components_variance():
    gem, _ = toy_gem()
    w = variance_weights(gem)
    assert w.shape[0] == sum(gem.n_components(a) for a in COUNTS)
    assert torch.isclose(w.mean(), torch.tensor(1.0))
    first = w[:gem.n_components("positions")]
    assert (first[1:] <= first[:-1] + 1e-6).all() and first[0] > first[-1]


def test_attention_variant_starts_as_the_per_part_network_and_learns_part_specific_gates():
    torch.manual_seed(0)
    gem, signal = toy_gem(parts=True)
    _, labels = coefficient_parts(gem)
    plain = MappingNetwork(S, labels, width=32).eval()
    gated = MappingNetwork(S, labels, width=32, attention=True).eval()
    gated.load_state_dict(plain.state_dict(), strict=False)  # same part MLPs; the context starts at zero
    with torch.no_grad():
        assert torch.equal(gated.gates(signal), torch.ones(T, 2, S))
        assert torch.allclose(gated(signal), plain(signal))
    target = flatten_coefficients(gem.coefficients)
    opt = torch.optim.AdamW(gated.parameters(), lr=3e-3)
    gated.train()
    for _ in range(200):
        loss = coefficient_loss(gated(signal), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        gates = gated.eval().gates(signal)
        after = coefficient_loss(gated(signal), target).item()
        before = coefficient_loss(plain(signal), target).item()
    assert after < 0.5 * before
    assert (gates[:, 0] - gates[:, 1]).abs().max() > 1e-3  # each part listens to the signal its own way
    assert ((gates > 0) & (gates < 2)).all()


def test_hold_at_mean_zeroes_only_the_named_parts_coefficients():
    gem, _ = toy_gem(parts=True)
    _, labels = coefficient_parts(gem)
    flat = torch.randn(3, labels.shape[0])
    held = hold_at_mean(flat, gem, ["b"])
    assert (held[:, labels == 1] == 0).all() and torch.equal(held[:, labels == 0], flat[:, labels == 0])
    assert torch.equal(hold_at_mean(flat, gem, []), flat)
    with pytest.raises(GemError, match="hair"):
        hold_at_mean(flat, gem, ["hair"])
    no_parts, _ = toy_gem()
    flat = torch.randn(2, coefficient_parts(no_parts)[1].shape[0])
    assert torch.equal(hold_at_mean(flat, no_parts, ["scalp"]), flat)  # nothing to hold without parts
