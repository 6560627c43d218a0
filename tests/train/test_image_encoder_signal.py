"""The image-encoder driving signal: TorchScript loading, face box and crop, feature PCA, the tiny actor."""
import os

import pytest
import torch
from torch import nn

from lib.config import load_config
from lib.dataset.cameras import Camera
from lib.dataset.vhap import DatasetError, VhapExport
from lib.flame.model import FlameModel
from lib.models.image_encoder import (
    BOUND, EncoderError, FeaturePCA, crop_faces, encode, encoder_features, encoder_signal, face_box, load_encoder,
)
from lib.paths import REPO_ROOT, resolve
from lib.train.data import ActorData


class TinyEncoder(nn.Module):
    """Stands in for DECA / EMOCA: crops [B, 3, S, S] -> features [B, 12]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.linear = nn.Linear(16, 12)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(torch.relu(self.conv(crops))).flatten(1))


class NanEncoder(nn.Module):
    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return crops.mean(dim=(2, 3)) / 0.0 * 0.0


class OneRowEncoder(nn.Module):
    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return crops[:1].flatten(1)


def _script(module: nn.Module, path):
    """Saves module as TorchScript. -> path"""
    torch.jit.script(module).save(str(path))
    return path


def _rel(path) -> str:
    """Configs take paths relative to the repository root, also for pytest's temporary folders."""
    return os.path.relpath(path, REPO_ROOT)


@pytest.fixture(scope="module")
def actor(tiny_actor_config):
    cfg = load_config(tiny_actor_config)
    export = VhapExport.from_config(cfg)
    flame = FlameModel.from_file(resolve(cfg.actor.flame_model), cfg.actor.n_shape, cfg.actor.n_expr)
    return export, ActorData(export, flame, torch.device("cpu"))


def test_encoder_signal_is_zero_at_identity_bounded_and_reloads_from_its_pca(tiny_actor_config, actor, tmp_path):
    export, data = actor
    torch.manual_seed(0)
    encoder = _rel(_script(TinyEncoder(), tmp_path / "encoder.pt"))
    cfg = load_config(tiny_actor_config, ["mapping.signal=encoder", f"mapping.encoder={encoder}",
                                          "mapping.encoder_crop=32"])
    timesteps, identity = data.timesteps, cfg.actor.identity_timestep
    pca_path = tmp_path / "pca" / "encoder_pca.npz"

    signal = encoder_signal(cfg, export, data, timesteps, identity, pca_path, fit=True)

    T = len(timesteps)
    assert signal.shape == (T, min(cfg.mapping.encoder_components, T - 1, 12))
    assert torch.equal(signal[timesteps.index(identity)], torch.zeros(signal.shape[1]))
    assert signal.abs().max() <= BOUND
    assert signal.abs().max() > 0.1  # the expressions move the features
    assert pca_path.is_file()
    again = encoder_signal(cfg, export, data, timesteps, identity, pca_path, fit=False)
    assert torch.allclose(again, signal, atol=1e-5)


def test_encoder_signal_refuses_a_pca_of_another_feature_size(tiny_actor_config, actor, tmp_path):
    export, data = actor
    cfg = load_config(tiny_actor_config, [f"mapping.encoder={_rel(_script(TinyEncoder(), tmp_path / 'e.pt'))}",
                                          "mapping.encoder_crop=16"])
    pca_path = tmp_path / "other.npz"
    FeaturePCA.fit(torch.randn(5, 7), 3).save(pca_path)
    with pytest.raises(EncoderError, match="other.npz.*7 features"):
        encoder_signal(cfg, export, data, data.timesteps[:2], 0, pca_path, fit=False)


def test_a_timestep_without_the_identity_camera_names_folder_and_camera(tiny_actor_config, actor, tmp_path):
    export, data = actor
    cfg = load_config(tiny_actor_config, [f"mapping.encoder={_rel(_script(TinyEncoder(), tmp_path / 'e.pt'))}",
                                          "actor.identity_camera=42"])
    with pytest.raises(DatasetError, match=f"{export.root}.*camera 42"):
        encoder_features(cfg, export, data, data.timesteps)


def test_load_encoder_refuses_a_state_dict_random_bytes_and_a_missing_file(tmp_path):
    state_dict = tmp_path / "weights.pth"
    torch.save(TinyEncoder().state_dict(), state_dict)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(EncoderError, match="weights.pth.*state_dict.*torch.jit.script"):
        load_encoder(state_dict)
    with pytest.raises(EncoderError, match="junk.pt.*torch.jit.script"):
        load_encoder(junk)
    with pytest.raises(EncoderError, match="not found.*missing.pt.*mapping.encoder"):
        load_encoder(tmp_path / "missing.pt")


def test_encode_refuses_non_finite_or_misshapen_features(tmp_path):
    crops = torch.rand(3, 3, 8, 8)
    nan = load_encoder(_script(NanEncoder(), tmp_path / "nan.pt"))
    with pytest.raises(EncoderError, match="nan.pt.*non-finite"):
        encode(nan, crops, tmp_path / "nan.pt")
    one_row = load_encoder(_script(OneRowEncoder(), tmp_path / "one.pt"))
    with pytest.raises(EncoderError, match=r"one.pt returned \(1, 192\)"):
        encode(one_row, crops, tmp_path / "one.pt")


def test_encode_flattens_trailing_dims_and_batches(tmp_path):
    encoder = load_encoder(_script(TinyEncoder(), tmp_path / "e.pt"))
    crops = torch.rand(5, 3, 16, 16)
    assert torch.allclose(encode(encoder, crops, "e.pt", batch=2), encode(encoder, crops, "e.pt", batch=5),
                          atol=1e-6)
    assert encode(encoder, crops, "e.pt").shape == (5, 12)


def test_face_box_is_square_and_contains_every_projected_vertex():
    torch.manual_seed(0)
    verts = torch.randn(200, 3) * torch.tensor([0.08, 0.12, 0.06])
    K = torch.tensor([[300.0, 0.0, 40.0], [0.0, 300.0, 60.0], [0.0, 0.0, 1.0]])
    cam = Camera.look_at((0.3, 0.1, 1.0), (0.0, 0.0, 0.0), K, 80, 120)
    cam_pts = verts @ cam.viewmat[:3, :3].T + cam.viewmat[:3, 3]
    uv = (cam_pts @ K.T)[:, :2] / cam_pts[:, 2:]

    for margin in (1.0, 1.25):
        x0, y0, x1, y1 = face_box(verts, cam.viewmat, K, margin).tolist()
        assert x1 - x0 == pytest.approx(y1 - y0)
        assert (uv[:, 0] >= x0 - 1e-4).all() and (uv[:, 0] <= x1 + 1e-4).all()
        assert (uv[:, 1] >= y0 - 1e-4).all() and (uv[:, 1] <= y1 + 1e-4).all()
    extent = (uv.max(0).values - uv.min(0).values).max()
    assert x1 - x0 == pytest.approx(1.25 * float(extent), rel=1e-5)


def test_face_box_refuses_a_mesh_behind_the_camera():
    K = torch.eye(3)
    with pytest.raises(ValueError, match="behind the camera"):
        face_box(torch.tensor([[0.0, 0.0, -1.0]]), torch.eye(4), K)


def test_crop_of_the_whole_square_image_at_its_own_size_is_the_image():
    image = torch.rand(8, 8, 3)
    crop = crop_faces(image, torch.tensor([0.0, 0.0, 8.0, 8.0]), 8)
    assert torch.allclose(crop, image.permute(2, 0, 1), atol=1e-6)


def test_crop_outside_the_image_is_white():
    image = torch.rand(8, 8, 3)
    crop = crop_faces(image, torch.tensor([4.0, 0.0, 12.0, 8.0]), 8)  # right half beyond the image
    assert torch.allclose(crop[:, :, :4], image.permute(2, 0, 1)[:, :, 4:], atol=1e-6)
    assert torch.equal(crop[:, :, 4:], torch.ones(3, 8, 4))
    far = crop_faces(image, torch.tensor([20.0, 20.0, 30.0, 30.0]), 5)
    assert torch.equal(far, torch.ones(3, 5, 5))


def test_crop_samples_a_linear_image_at_the_box_pixel_centres():
    # image value = 0.01 x + 0.02 y at pixel centres (x = j + 0.5): bilinear resampling is exact inside.
    H, W = 10, 12
    y, x = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    image = (0.01 * x + 0.02 * y)[..., None].expand(H, W, 3)
    box = torch.tensor([2.3, 1.7, 6.3, 5.7])
    crop = crop_faces(image, box, 5)
    s = (torch.arange(5) + 0.5) * 0.8
    expected = 0.01 * (2.3 + s)[None, :] + 0.02 * (1.7 + s)[:, None]
    assert torch.allclose(crop[0], expected, atol=1e-6)


def test_feature_pca_gives_unit_rms_coefficients_and_zero_for_components_without_variance(tmp_path):
    torch.manual_seed(0)
    rank2 = torch.randn(30, 2) @ torch.randn(2, 8)
    pca = FeaturePCA.fit(rank2, 4)
    z = pca.project(rank2)
    assert z.shape == (30, 4)
    assert z.abs().max() < BOUND  # not clamped, so the RMS is the PCA's own
    assert torch.allclose(z[:, :2].pow(2).mean(0), torch.ones(2), atol=1e-4)
    assert torch.equal(z[:, 2:], torch.zeros(30, 2))
    assert torch.equal(pca.project(torch.zeros(1, 8)), torch.zeros(1, 4))
    assert pca.project(rank2 * 100).abs().max() == pytest.approx(BOUND)
    assert FeaturePCA.fit(torch.randn(3, 8), 50).components.shape == (2, 8)  # clipped to T - 1


def test_feature_pca_load_names_a_missing_or_corrupt_file(tmp_path):
    with pytest.raises(EncoderError, match="not found.*absent.npz"):
        FeaturePCA.load(tmp_path / "absent.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(EncoderError, match="bad.npz"):
        FeaturePCA.load(bad)
