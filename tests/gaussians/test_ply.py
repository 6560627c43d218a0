"""Gaussians survive the standard 3DGS PLY layout."""

import numpy as np
import pytest
import torch

from lib.gaussians.gaussians import Gaussians
from lib.gaussians.ply import SH_C0, read_ply, write_ply

LAYOUT_SH1 = (
    ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    + [f"f_rest_{i}" for i in range(9)]
    + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
)


def random_gaussians(n: int, sh_coeffs: int | None = None, seed: int = 0) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    colors = torch.rand(n, 3, generator=g) if sh_coeffs is None else torch.randn(n, sh_coeffs, 3, generator=g)
    return Gaussians(
        means=torch.randn(n, 3, generator=g) * 0.1,
        quats=torch.randn(n, 4, generator=g),
        scales=torch.exp(torch.randn(n, 3, generator=g) - 5.0),
        opacities=torch.rand(n, generator=g),
        colors=colors,
    )


def parts(g: Gaussians) -> tuple[torch.Tensor, ...]:
    return g.means, g.quats, g.scales, g.opacities, g.colors


def read_raw(path) -> tuple[list[str], np.ndarray]:
    """Independent minimal parse of a float-only binary PLY: property names and values."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode().splitlines()
    assert header[:2] == ["ply", "format binary_little_endian 1.0"]
    names = [line.split()[2] for line in header if line.startswith("property float ")]
    return names, np.frombuffer(data[end:], dtype="<f4").reshape(-1, len(names))


def test_file_has_the_3dgs_layout_with_channel_major_f_rest(tmp_path):
    g = random_gaussians(5, sh_coeffs=4)
    write_ply(tmp_path / "g.ply", *parts(g))
    names, values = read_raw(tmp_path / "g.ply")
    assert names == LAYOUT_SH1
    col = {name: values[:, i] for i, name in enumerate(names)}
    for c in range(3):
        np.testing.assert_array_equal(col[f"f_dc_{c}"], g.colors[:, 0, c].numpy())
        for k in range(3):  # all coefficients of R first, then G, then B
            np.testing.assert_array_equal(col[f"f_rest_{c * 3 + k}"], g.colors[:, 1 + k, c].numpy())
    np.testing.assert_array_equal(np.stack([col[f"rot_{i}"] for i in range(4)], -1), g.quats.numpy())
    np.testing.assert_allclose(col["opacity"], torch.logit(g.opacities.double()).numpy(), rtol=1e-6)
    np.testing.assert_allclose(col["scale_1"], torch.log(g.scales[:, 1].double()).numpy(), rtol=1e-6)
    assert (values[:, 3:6] == 0).all()


def test_rgb_colours_are_stored_as_degree_zero_sh(tmp_path):
    g = random_gaussians(6)
    write_ply(tmp_path / "g.ply", *parts(g))
    names, values = read_raw(tmp_path / "g.ply")
    assert not any(name.startswith("f_rest") for name in names)
    dc = values[:, names.index("f_dc_0") : names.index("f_dc_0") + 3]
    np.testing.assert_allclose(dc * SH_C0 + 0.5, g.colors.numpy(), atol=1e-7)
    # The file cannot tell degree-0 SH from RGB: it reads back as the RGB it renders as.
    sh0 = random_gaussians(6, sh_coeffs=1)
    write_ply(tmp_path / "sh0.ply", *parts(sh0))
    torch.testing.assert_close(read_ply(tmp_path / "sh0.ply").colors, sh0.colors[:, 0] * SH_C0 + 0.5)


@pytest.mark.parametrize("sh_coeffs", [None, 4, 16])
def test_round_trip_is_exact_to_float32(tmp_path, sh_coeffs):
    g = random_gaussians(1000, sh_coeffs=sh_coeffs, seed=1)
    write_ply(tmp_path / "g.ply", *parts(g))
    back = read_ply(tmp_path / "g.ply")
    # Stored as they are: bit for bit.
    assert torch.equal(back.means, g.means) and torch.equal(back.quats, g.quats)
    if sh_coeffs is not None:
        assert torch.equal(back.colors, g.colors)
    else:  # through (rgb - 0.5) / C0 in float32: one rounding of the stored value
        torch.testing.assert_close(back.colors, g.colors, atol=6e-8, rtol=0)
    # Through log / logit in float32: within a few float32 ulps.
    torch.testing.assert_close(back.scales, g.scales, rtol=2e-6, atol=0)
    torch.testing.assert_close(back.opacities, g.opacities, rtol=2e-6, atol=3e-8)
    # The file itself is a fixed point: loading and saving again gives the same bytes.
    write_ply(tmp_path / "again.ply", *parts(back))
    assert (tmp_path / "again.ply").read_bytes() == (tmp_path / "g.ply").read_bytes()


def test_write_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "sub" / "g.ply"
    # tensors that require grad (a training state) are written as they are
    write_ply(path, *(t.requires_grad_() for t in parts(random_gaussians(3, seed=2))))
    write_ply(path, *parts(random_gaussians(7, seed=3)))
    assert len(read_ply(path)) == 7
    assert sorted(p.name for p in path.parent.iterdir()) == ["g.ply"]


def test_unreadable_files_are_named_in_the_error(tmp_path):
    ascii_ply = tmp_path / "ascii.ply"
    ascii_ply.write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n0\n")
    with pytest.raises(ValueError, match="ascii.ply.*binary_little_endian"):
        read_ply(ascii_ply)
    mesh = tmp_path / "mesh.ply"
    mesh.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float x\n"
                     b"property float y\nproperty float z\nend_header\n" + bytes(12))  # fmt: skip
    with pytest.raises(ValueError, match="mesh.ply.*missing properties.*f_dc_0"):
        read_ply(mesh)
    write_ply(tmp_path / "cut.ply", *parts(random_gaussians(4)))
    (tmp_path / "cut.ply").write_bytes((tmp_path / "cut.ply").read_bytes()[:-10])
    with pytest.raises(ValueError, match="cut.ply.*truncated"):
        read_ply(tmp_path / "cut.ply")
