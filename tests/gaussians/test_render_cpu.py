"""The CPU renderer follows gsplat's rasterization rules and has exact gradients (both compositors)."""

import math

import pytest
import torch
from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

from lib.gaussians import render as render_module
from lib.gaussians import project_numba, render_cpu, render_numba
from lib.gaussians.render import render

F64 = torch.float64
SH_C0 = 0.28209479177387814


@pytest.fixture(autouse=True, params=["numba", "torch"])
def cpu_backend(request, monkeypatch):
    """Every case holds for both CPU paths: the native one render() uses and the torch reference."""
    native = request.param == "numba"
    monkeypatch.setattr(render_module, "cpu_projector", project_numba.project if native else render_cpu.project)
    monkeypatch.setattr(render_module, "cpu_compositor", render_numba.composite if native else render_cpu.composite)


def camera(width, height, focal=40.0, cx=None, cy=None, distance=2.0, n=1):
    """Camera at (0, 0, -distance) looking along +z (world = camera axes)."""
    viewmats = torch.eye(4, dtype=F64).repeat(n, 1, 1)
    viewmats[:, 2, 3] = distance
    cx = width / 2 if cx is None else cx
    cy = height / 2 if cy is None else cy
    Ks = torch.tensor([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]], dtype=F64).repeat(n, 1, 1)
    return viewmats, Ks


def random_scene(n, seed, spread=(0.3, 0.25, 0.4), scale=(0.03, 0.08), opacity=(0.3, 0.8)):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=F64) - 0.5) * torch.tensor(spread, dtype=F64)
    quats = torch.randn(n, 4, generator=g, dtype=F64)
    scales = scale[0] + (scale[1] - scale[0]) * torch.rand(n, 3, generator=g, dtype=F64)
    opacities = opacity[0] + (opacity[1] - opacity[0]) * torch.rand(n, generator=g, dtype=F64)
    colors = torch.rand(n, 3, generator=g, dtype=F64)
    return means, quats, scales, opacities, colors


def reference_render(means, quats, scales, opacities, colors, viewmat, K, width, height, background):
    """Pixel-by-pixel statement of gsplat's rules, one Gaussian at a time (pure autograd)."""
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        means, covars, viewmat[None], K[None], width, height, eps2d=0.3, near_plane=0.01, far_plane=100.0
    )
    ys, xs = torch.meshgrid(torch.arange(height, dtype=F64), torch.arange(width, dtype=F64), indexing="ij")
    trans = torch.ones(height, width, dtype=F64)
    out = torch.zeros(height, width, 3, dtype=F64)
    acc_depth = torch.zeros(height, width, dtype=F64)
    done = torch.zeros(height, width, dtype=torch.bool)
    for g in torch.argsort(depths[0], stable=True).tolist():
        if (radii[0, g] == 0).all() or opacities[g] < 1 / 255:
            continue
        dx = means2d[0, g, 0] - (xs + 0.5)
        dy = means2d[0, g, 1] - (ys + 0.5)
        a, b, c = conics[0, g]
        sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
        alpha = torch.clamp_max(opacities[g] * torch.exp(-sigma), 0.999)
        valid = (sigma >= 0) & (alpha >= 1 / 255) & ~done
        next_trans = trans * (1 - alpha)
        stop = valid & (next_trans <= 1e-4)
        done = done | stop
        use = valid & ~stop
        weight = torch.where(use, alpha * trans, 0.0)
        out = out + weight[..., None] * colors[g]
        acc_depth = acc_depth + weight * depths[0, g]
        trans = torch.where(use, next_trans, trans)
    alpha_img = 1 - trans
    rgb = out + trans[..., None] * background
    return rgb, alpha_img[..., None], (acc_depth / alpha_img.clamp_min(1e-10))[..., None]


def test_single_gaussian_footprint_matches_analytic_2d_gaussian():
    # On the optical axis the Jacobian is diag(f / z): cov2d = (f / z)^2 R S^2 R^T (xy
    # block) + 0.3 I, for a Gaussian rotated by 30 degrees about the viewing axis.
    width, height, focal, z = 40, 30, 50.0, 2.0
    viewmats, Ks = camera(width, height, focal=focal, cx=19.3, cy=14.6, distance=z)
    theta = math.radians(30.0)
    quats = torch.tensor([[math.cos(theta / 2), 0.0, 0.0, math.sin(theta / 2)]], dtype=F64)
    scales = torch.tensor([[0.2, 0.08, 0.05]], dtype=F64)
    out = render(
        torch.zeros(1, 3, dtype=F64), quats, scales, torch.tensor([0.8], dtype=F64),
        torch.tensor([[0.2, 0.5, 1.0]], dtype=F64), viewmats, Ks, width, height,
    )
    rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=F64)
    cov2d = (focal / z) ** 2 * rot @ torch.diag(scales[0, :2] ** 2) @ rot.T + 0.3 * torch.eye(2, dtype=F64)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=F64), torch.arange(width, dtype=F64), indexing="ij")
    d = torch.stack([xs + 0.5 - 19.3, ys + 0.5 - 14.6], -1)
    sigma = 0.5 * torch.einsum("hwi,ij,hwj->hw", d, torch.linalg.inv(cov2d), d)
    expected = 0.8 * torch.exp(-sigma)
    expected = torch.where(expected >= 1 / 255, expected, 0.0)
    torch.testing.assert_close(out.alpha[0, ..., 0], expected, atol=1e-9, rtol=0)
    colour = torch.tensor([0.2, 0.5, 1.0], dtype=F64)
    torch.testing.assert_close(out.rgb[0], expected[..., None] * colour, atol=1e-9, rtol=0)
    assert (expected > 0).sum() > 100  # the footprint is a real ellipse, not a dot


def _stack(zs, opacities, colors, scale=0.3):
    """Large round Gaussians on the optical axis at camera depths 2 + z."""
    n = len(zs)
    means = torch.tensor([[0.0, 0.0, z] for z in zs], dtype=F64)
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * n, dtype=F64)
    scales = torch.full((n, 3), scale, dtype=F64)
    return means, quats, scales, torch.tensor(opacities, dtype=F64), torch.tensor(colors, dtype=F64)


def test_front_to_back_order_follows_depth_not_index():
    # Principal point on a pixel centre, so the centre pixel sees sigma = 0: alpha = opacity.
    viewmats, Ks = camera(21, 21, cx=10.5, cy=10.5)
    red, blue = [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    for order in ([0, 1], [1, 0]):
        zs, opac, cols = [-0.5, 0.5], [0.9, 0.8], [red, blue]  # red in front
        scene = _stack([zs[i] for i in order], [opac[i] for i in order], [cols[i] for i in order])
        out = render(*scene, viewmats, Ks, 21, 21)
        centre = out.rgb[0, 10, 10]
        torch.testing.assert_close(centre, torch.tensor([0.9, 0.0, 0.1 * 0.8], dtype=F64))
        assert out.rgb[0, ..., 0].sum() > out.rgb[0, ..., 2].sum()


def test_gaussian_that_would_bring_transmittance_below_1e4_is_not_composited():
    viewmats, Ks = camera(21, 21, cx=10.5, cy=10.5)
    bg = torch.tensor([0.0, 1.0, 0.0], dtype=F64)
    white, red, blue = [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    # Opacity 1 is clamped to 0.999: T = 1e-3 behind the first Gaussian.
    # Second alpha 0.95: T would become 5e-5 <= 1e-4, so it is skipped and the pixel ends
    # (the third, alpha 0.5, is not reached either).
    out = render(*_stack([-0.5, 0.0, 0.5], [1.0, 0.95, 0.5], [white, red, blue]), viewmats, Ks, 21, 21, background=bg)
    torch.testing.assert_close(out.rgb[0, 10, 10], torch.tensor([0.999, 0.999 + 1e-3, 0.999], dtype=F64))
    torch.testing.assert_close(out.alpha[0, 10, 10, 0], torch.tensor(0.999, dtype=F64))
    # Second alpha 0.5: T would become 5e-4 > 1e-4, so it is composited.
    out = render(*_stack([-0.5, 0.0], [1.0, 0.5], [white, red]), viewmats, Ks, 21, 21, background=bg)
    torch.testing.assert_close(out.rgb[0, 10, 10], torch.tensor([0.999 + 5e-4, 0.999 + 5e-4, 0.999], dtype=F64))


def test_alpha_is_clamped_at_0999_and_has_no_opacity_gradient_there():
    viewmats, Ks = camera(21, 21, cx=10.5, cy=10.5)
    means, quats, scales, opacities, colors = _stack([0.0], [0.9995], [[1.0, 1.0, 1.0]])
    opacities.requires_grad_()
    out = render(means, quats, scales, opacities, colors, viewmats, Ks, 21, 21)
    torch.testing.assert_close(out.alpha[0, 10, 10, 0], torch.tensor(0.999, dtype=F64))
    (grad,) = torch.autograd.grad(out.alpha[0, 10, 10, 0], opacities)
    assert grad.item() == 0.0


def test_off_centre_principal_point_shifts_image_by_the_pixel_offset():
    scene = random_scene(12, seed=3, spread=(0.3, 0.3, 0.3))
    viewmats, Ks = camera(32, 28)
    shifted = Ks.clone()
    shifted[:, 0, 2] += 3.0
    shifted[:, 1, 2] -= 2.0
    a = render(*scene, viewmats, Ks, 32, 28)
    b = render(*scene, viewmats, shifted, 32, 28)
    assert a.alpha[0, 2:, :-3].sum() > 10
    torch.testing.assert_close(b.rgb[0, :-2, 3:], a.rgb[0, 2:, :-3], atol=1e-9, rtol=0)
    torch.testing.assert_close(b.alpha[0, :-2, 3:], a.alpha[0, 2:, :-3], atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    "seed, opacity, n",
    [
        (0, (0.3, 0.8), 40),  # a few pixels end early (3% of pairs: kept, inert)
        (1, (0.97, 1.0), 40),  # clamped alphas; many pixels end early (19% of pairs: dropped)
        (2, (0.3, 0.999), 25),  # sparser: no pixel ends early
    ],
)
def test_matches_pixel_by_pixel_reference_in_value_and_gradient(seed, opacity, n):
    params = [t.requires_grad_() for t in random_scene(n, seed, scale=(0.02, 0.1), opacity=opacity)]
    viewmats, Ks = camera(24, 20, focal=30.0, cx=11.7, cy=10.2)
    bg = torch.tensor([0.3, 0.6, 0.9], dtype=F64)
    weights = torch.rand(20, 24, 5, generator=torch.Generator().manual_seed(seed), dtype=F64)

    def loss(rgb, alpha, depth):
        return (torch.cat([rgb, alpha, depth], -1) * weights).sum()

    out = render(*params, viewmats, Ks, 24, 20, background=bg)
    ours = torch.autograd.grad(loss(out.rgb[0], out.alpha[0], out.depth[0]), params)
    ref_out = reference_render(*params, viewmats[0], Ks[0], 24, 20, bg)
    ref = torch.autograd.grad(loss(*ref_out), params)
    for got, want in zip((out.rgb[0], out.alpha[0], out.depth[0]), ref_out):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7)


def test_gradcheck_float64_all_parameters():
    params = [t.clone().requires_grad_() for t in random_scene(6, seed=0)]
    viewmats, Ks = camera(12, 10, focal=20.0, cx=6.3, cy=4.8, distance=1.5)
    bg = torch.tensor([0.2, 0.3, 0.4], dtype=F64)

    def fn(*p):
        out = render(*p, viewmats, Ks, 12, 10, background=bg)
        return out.rgb, out.alpha, out.depth

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_float64_spherical_harmonics():
    # The view direction depends on the means, so both get checked.
    means, quats, scales, opacities, _ = random_scene(4, seed=4)
    sh = 0.3 * torch.randn(4, 16, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    params = [t.clone().requires_grad_() for t in (means, sh)]
    viewmats, Ks = camera(12, 10, focal=20.0, cx=6.3, cy=4.8, distance=1.5)

    def fn(means, sh):
        return render(means, quats, scales, opacities, sh, viewmats, Ks, 12, 10, sh_degree=3).rgb

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_every_parameter_of_every_gaussian_gets_a_gradient():
    scene = [t.float() for t in random_scene(10, seed=5, spread=(0.4, 0.3, 0.2))]
    params = [t.requires_grad_() for t in scene]
    viewmats, Ks = (t.float() for t in camera(48, 40, focal=60.0))
    out = render(*params, viewmats, Ks, 48, 40, background=torch.tensor([0.5, 0.5, 0.5]))
    target = torch.rand(1, 40, 48, 3, generator=torch.Generator().manual_seed(0))
    ((out.rgb - target) ** 2).sum().add(out.depth.sum()).backward()
    for name, p in zip(["means", "quats", "scales", "opacities", "colors"], params):
        per_gaussian = p.grad.reshape(p.shape[0], -1).abs().sum(-1)
        assert torch.isfinite(p.grad).all(), name
        assert (per_gaussian > 0).all(), f"{name}: Gaussians {torch.nonzero(per_gaussian == 0).flatten().tolist()}"


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_spherical_harmonics_degree_matches_hand_evaluated_basis(degree):
    # Camera at (0, 0, -2) looking at a Gaussian at the origin: view direction +z, where
    # the basis functions with m = 0 are Y00 = C0, Y10 = 0.4886 z,
    # Y20 = 0.9462 z^2 - 0.3154, Y30 = z (1.8659 z^2 - 1.1195).
    zonal = {0: (0, SH_C0), 1: (2, 0.48860251190292), 2: (6, 0.6307831305050400), 3: (12, 0.746352665180231)}
    viewmats, Ks = camera(21, 21, cx=10.5, cy=10.5)
    sh = torch.zeros(1, 16, 3, dtype=F64)
    sh[0, 0] = torch.tensor([0.1, -0.2, 0.3], dtype=F64)
    expected = 0.5 + SH_C0 * sh[0, 0]
    if degree > 0:
        index, value = zonal[degree]
        sh[0, index] = torch.tensor([0.4, 0.2, -0.3], dtype=F64)
        expected = expected + value * sh[0, index]
    sh[0, (degree + 1) ** 2 :] += 5.0  # bands above the degree must be ignored
    out = render(*_stack([0.0], [1.0], [[0.0, 0.0, 0.0]])[:4], sh, viewmats, Ks, 21, 21, sh_degree=degree)
    torch.testing.assert_close(out.rgb[0, 10, 10], 0.999 * expected.clamp_min(0.0))


def test_expected_depth_of_one_and_of_two_gaussians():
    viewmats, Ks = camera(21, 21, cx=10.5, cy=10.5)
    out = render(*_stack([0.25], [0.9], [[1.0, 1.0, 1.0]], scale=0.1), viewmats, Ks, 21, 21)
    covered = out.alpha[0, ..., 0] > 0
    assert covered.sum() > 20 and not covered.all()
    torch.testing.assert_close(out.depth[0, ..., 0][covered], torch.full_like(out.depth[0, ..., 0][covered], 2.25))
    assert (out.depth[0, ..., 0][~covered] == 0).all()
    out = render(*_stack([0.0, 1.0], [0.6, 0.5], [[1.0, 1.0, 1.0]] * 2), viewmats, Ks, 21, 21)
    w1, w2 = 0.6, 0.4 * 0.5
    torch.testing.assert_close(out.depth[0, 10, 10, 0], torch.tensor((w1 * 2.0 + w2 * 3.0) / (w1 + w2), dtype=F64))


def test_background_fills_what_the_gaussians_leave_per_camera():
    scene = random_scene(15, seed=6)
    viewmats, Ks = camera(20, 16, n=2)
    viewmats[1, 0, 3] = 0.05  # second camera slightly to the side
    bgs = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.4, 0.6]], dtype=F64)
    black = render(*scene, viewmats, Ks, 20, 16)
    coloured = render(*scene, viewmats, Ks, 20, 16, background=bgs)
    torch.testing.assert_close(coloured.rgb, black.rgb + (1 - black.alpha) * bgs[:, None, None, :])
    empty = black.alpha[..., 0] == 0
    assert empty.any() and (~empty).any()
    same = render(*scene, viewmats, Ks, 20, 16, background=bgs[1])
    torch.testing.assert_close(same.rgb, black.rgb + (1 - black.alpha) * bgs[1])


def test_batch_of_cameras_equals_cameras_one_by_one():
    scene = random_scene(20, seed=7)
    viewmats, Ks = camera(20, 16, n=3)
    viewmats[1, :3, 3] = torch.tensor([0.05, -0.02, 2.1], dtype=F64)
    Ks[2, 0, 2] = 8.0
    both = render(*scene, viewmats, Ks, 20, 16)
    for i in range(3):
        one = render(*scene, viewmats[i : i + 1], Ks[i : i + 1], 20, 16)
        for got, want in zip(both, one):
            torch.testing.assert_close(got[i : i + 1], want, atol=1e-9, rtol=0)


def test_no_visible_gaussian_renders_the_background():
    bg = torch.tensor([0.1, 0.7, 0.3], dtype=F64)
    viewmats, Ks = camera(16, 12)
    means, quats, scales, opacities, colors = (t.clone().requires_grad_() for t in random_scene(4, seed=8))
    behind = means.detach().clone()
    behind[:, 2] = -3.0  # camera at z = -2: these are behind it
    for m, o in [(behind, opacities), (means, torch.full_like(opacities, 1e-3))]:  # behind; too faint
        out = render(m, quats, scales, o, colors, viewmats, Ks, 16, 12, background=bg)
        assert torch.equal(out.rgb, bg.expand(1, 12, 16, 3))
        assert torch.equal(out.alpha, torch.zeros(1, 12, 16, 1, dtype=F64))
        assert torch.equal(out.depth, torch.zeros(1, 12, 16, 1, dtype=F64))
    out.rgb.sum().backward()
    assert (colors.grad == 0).all()
    empty = [torch.zeros(0, k, dtype=F64) for k in (3, 4, 3)]
    out = render(*empty, torch.zeros(0, dtype=F64), torch.zeros(0, 3, dtype=F64), viewmats, Ks, 16, 12, background=bg)
    assert torch.equal(out.rgb, bg.expand(1, 12, 16, 3))


def test_shape_errors_name_the_argument():
    means, quats, scales, opacities, colors = random_scene(3, seed=0)
    viewmats, Ks = camera(8, 8)
    with pytest.raises(ValueError, match="quats"):
        render(means, quats[:, :3], scales, opacities, colors, viewmats, Ks, 8, 8)
    with pytest.raises(ValueError, match="sh_degree"):
        render(means, quats, scales, opacities, torch.zeros(3, 4, 3, dtype=F64), viewmats, Ks, 8, 8, sh_degree=2)
