"""Gaussian splatting on the CPU, with gsplat's rules.

Projection and SH evaluation are gsplat's own pure-PyTorch reference functions
(`gsplat.cuda._torch_impl`), so the CPU path and the CUDA kernels share one definition.
Compositing is ours: a sparse list of (pixel, Gaussian) pairs sorted by pixel, then by
depth, with a hand-written backward pass.

Rules matched to gsplat 1.5.3's CUDA rasterizer ("classic" mode):
- 2D covariance + eps2d * I (0.3 px^2), no opacity compensation.
- A Gaussian is drawn when its centre lies in (near, far) and its opacity-aware box
  touches the image; at pixel centre p (pixel (i, j) -> (j + 0.5, i + 0.5)),
  sigma = 0.5 (a dx^2 + c dy^2) + b dx dy with conic (a, b, c), d = mean2d - p,
  alpha = min(0.999, opacity * exp(-sigma)); pairs with sigma < 0 or alpha < 1/255 are
  skipped.
- Front to back in camera depth (ties: lower Gaussian index first). The Gaussian whose
  alpha would bring the transmittance T to <= 1e-4 is not composited and ends the pixel.
- out = sum_k c_k alpha_k T_k + T_final * background;  alpha_img = 1 - T_final.

Why pairs and not tiles: only pairs that can contribute (alpha >= 1/255) are ever
built, so there is no padding to the busiest tile; the per-pixel transmittance is an
exclusive cumulative product, computed as a float64 cumulative sum of log(1 - alpha)
over the sorted pairs, and the backward pass is the same few segment sums in reverse.
"""

from dataclasses import dataclass

import math
import torch
from torch import Tensor

from gsplat.cuda._torch_impl import (
    _fully_fused_projection,
    _quat_scale_to_covar_preci,
    _spherical_harmonics,
)

EPS2D = 0.3  # px^2 added to every projected covariance (gsplat's default)
ALPHA_MIN = 1.0 / 255.0  # pairs below this alpha are skipped
ALPHA_MAX = 0.999  # alpha is clamped here, so one Gaussian never makes T exactly 0
T_MIN = 1e-4  # a pair whose alpha would bring T to <= T_MIN ends the pixel


@dataclass
class Pairs:
    """Composited (pixel, Gaussian) pairs, sorted by pixel, then front to back.

    Pixels are numbered across the batch: cam * H * W + row * W + col. Pairs are made
    from spans: a span is the run of pixels of one image row that one Gaussian reaches
    (alpha >= 1/255), so the pairs of a span share the Gaussian and the offset dy.
    With alpha_k, T_k (transmittance in front of pair k) and g_k = 1 where alpha_k has
    a gradient (composited, not clamped) else 0, the backward pass needs only
    w_k = alpha_k T_k, g_k alpha_k / (1 - alpha_k) and g_k alpha_k T_k.
    """

    span: Tensor  # [M] long, span of the pair
    pixel: Tensor  # [M] int, pixel of the pair (non-decreasing)
    pixel_counts: Tensor  # [P] long, pairs per pixel
    span_gauss: Tensor  # [S] long, visible Gaussian of each span
    span_dy: Tensor  # [S] mean2d_y - pixel centre y
    dx: Tensor  # [M] mean2d_x - pixel centre x
    weight: Tensor  # [M] alpha T: the pair's share of the pixel
    behind_factor: Tensor  # [M] g alpha / (1 - alpha)
    front_factor: Tensor  # [M] g alpha T
    trans_final: Tensor  # [P] transmittance behind the last composited pair (1 if none)


@torch.no_grad()
def build_pairs(
    means2d: Tensor,  # [V, 2] pixels
    conics: Tensor,  # [V, 3] (a, b, c) of the inverse 2D covariance
    opacities: Tensor,  # [V], >= ALPHA_MIN
    depths: Tensor,  # [V] camera z
    cams: Tensor,  # [V] long, camera of each entry
    n_cams: int,
    width: int,
    height: int,
) -> Pairs:
    """All pairs that gsplat would composite, with their weights.

    Pair-sized arrays dominate the cost (memory traffic), hence the in-place updates.
    """
    device, dtype = means2d.device, means2d.dtype
    n_pixels = n_cams * height * width
    index_dtype = torch.int32 if n_pixels < 2**31 else torch.int64  # int32 keys sort ~2x faster
    # Contiguous 1-D components: index_select on them is several times faster than
    # advanced indexing or gathers from strided views.
    a, b, c = conics.t().contiguous()
    mx, my = means2d.t().contiguous()
    # opacity * exp(-sigma) >= 1/255  <=>  sigma <= level: an ellipse (the conic is
    # positive definite, so sigma >= 0 everywhere and gsplat's sigma < 0 test never
    # fires). The level is padded by a hair so that rounding cannot drop a pixel
    # centre; the exact alpha test below decides.
    log_opacity = torch.log(opacities)
    level = (log_opacity - math.log(ALPHA_MIN)) * (1.0 + 1e-5) + 1e-6
    ext_y = torch.sqrt(2.0 * level * a / (a * c - b * b))
    y0 = torch.ceil(my - ext_y - 0.5).clamp(0, height).long()
    y1 = torch.floor(my + ext_y - 0.5).clamp(-1, height - 1).long()
    rows = (y1 - y0 + 1).clamp_min(0)

    # Spans, Gaussian by Gaussian in depth order, so that a stable sort of the pairs by
    # pixel leaves every pixel's pairs front to back.
    order = torch.argsort(depths, stable=True)
    rows = rows.index_select(0, order)
    span_g = order.index_select(0, torch.repeat_interleave(rows))
    first_row = torch.repeat_interleave(torch.cumsum(rows, 0) - rows, rows)
    row = y0.index_select(0, span_g) + torch.arange(span_g.shape[0], device=device) - first_row
    dy = my.index_select(0, span_g) - (row.to(dtype) + 0.5)
    a_s, b_s, c_s = (t.index_select(0, span_g) for t in (a, b, c))
    # Where this row crosses the ellipse: 0.5 a dx^2 + b dy dx + 0.5 c dy^2 = level.
    b_dy = b_s * dy
    disc = b_dy * b_dy - a_s * (c_s * dy * dy - 2.0 * level.index_select(0, span_g))
    half = torch.sqrt(disc.clamp_min(0.0)) / a_s
    centre = mx.index_select(0, span_g) + b_dy / a_s  # pixel x where sigma is smallest on this row
    x0 = torch.ceil(centre - half - 0.5).clamp(0, width).long()
    x1 = torch.floor(centre + half - 0.5).clamp(-1, width - 1).long()
    cols = torch.where(disc >= 0, (x1 - x0 + 1).clamp_min(0), torch.zeros_like(x0))
    keep = torch.nonzero(cols > 0).squeeze(1)
    span_g, row, dy, x0, cols, a_s, b_dy, c_s = (
        t.index_select(0, keep) for t in (span_g, row, dy, x0, cols, a_s, b_dy, c_s)
    )

    # Pairs: pixel = first pixel of the span + offset along it; sorted by pixel.
    span = torch.repeat_interleave(cols)
    n_pairs = span.shape[0]
    if n_pairs == 0:
        empty = means2d.new_zeros(0)
        return Pairs(
            span=span, pixel=span.to(index_dtype), pixel_counts=torch.zeros(n_pixels, dtype=torch.long, device=device),
            span_gauss=span_g, span_dy=dy, dx=empty, weight=empty, behind_factor=empty, front_factor=empty,
            trans_final=means2d.new_ones(n_pixels),
        )
    span_first = torch.cumsum(cols, 0) - cols
    base = ((cams.index_select(0, span_g) * height + row) * width + x0 - span_first).to(index_dtype)
    pixel = base.index_select(0, span).add_(torch.arange(n_pairs, dtype=index_dtype, device=device))
    pixel, perm = torch.sort(pixel, stable=True)
    span = span.index_select(0, perm)
    offset = perm.sub_(span_first.index_select(0, span))
    del perm
    dx = (mx.index_select(0, span_g) - x0.to(dtype) - 0.5).index_select(0, span).sub_(offset)
    del offset
    # alpha = opacity exp(-sigma) = exp(-(dx (0.5 a dx + b dy) + 0.5 c dy^2 - log opacity))
    alpha = (0.5 * a_s).index_select(0, span).mul_(dx).add_(b_dy.index_select(0, span))
    alpha.mul_(dx).add_((0.5 * c_s * dy * dy - log_opacity.index_select(0, span_g)).index_select(0, span))
    alpha.neg_().exp_()
    skipped = alpha < ALPHA_MIN
    alpha_g = torch.where(skipped | (alpha > ALPHA_MAX), 0.0, alpha)  # g alpha
    alpha.clamp_max_(ALPHA_MAX).masked_fill_(skipped, 0.0)
    del skipped

    # Transmittance: exclusive product of (1 - alpha) along each pixel's run, as a
    # float64 running sum of log(1 - alpha) minus its value where the run starts.
    log_keep = torch.neg(alpha).log1p_()
    counts = torch.bincount(pixel, minlength=n_pixels)
    starts = torch.cumsum(counts, 0).sub_(counts)
    log_t_after = torch.cumsum(log_keep, 0, dtype=torch.float64)
    first = starts.clamp_max(n_pairs - 1)  # empty pixels: any valid index
    log_t_after.sub_((log_t_after.index_select(0, first) - log_keep.index_select(0, first)).index_select(0, pixel))
    # T after a pair falls monotonically along a run, so `done` is a suffix of each run.
    done = log_t_after <= math.log(T_MIN)
    log_t_after = log_t_after.to(dtype)
    live = counts
    n_done = int(done.sum())
    if n_done:
        live = counts - torch.bincount(pixel.masked_select(done), minlength=n_pixels)
        if 8 * n_done > n_pairs:  # many dead pairs: drop them
            sel = torch.nonzero(~done).squeeze(1)
            span, pixel, dx, alpha, alpha_g, log_keep, log_t_after = (
                t.index_select(0, sel) for t in (span, pixel, dx, alpha, alpha_g, log_keep, log_t_after)
            )
            counts, starts = live, torch.cumsum(live, 0).sub_(live)
        else:  # a few: keep them inert (alpha 0, no gradient, T unchanged)
            for t in (alpha, alpha_g, log_t_after, log_keep):
                t.masked_fill_(done, 0.0)
    last = (starts + live - 1).clamp(0, span.shape[0] - 1)
    log_t_final = torch.where(live > 0, log_t_after.index_select(0, last), 0.0)
    trans = log_t_after.sub_(log_keep).exp_()
    return Pairs(
        span=span,
        pixel=pixel,
        pixel_counts=counts,
        span_gauss=span_g,
        span_dy=dy,
        dx=dx,
        weight=alpha * trans,
        behind_factor=alpha_g / alpha.neg_().add_(1.0),
        front_factor=alpha_g.mul_(trans),
        trans_final=log_t_final.exp_(),
    )


class _Composite(torch.autograd.Function):
    """Front-to-back alpha compositing over precomputed pairs, with its exact gradient.

    The pairs (which pixel sees which Gaussian, in which order, and which are dropped
    by the thresholds) are piecewise constant in the inputs, so they are built without
    gradients; alpha, T and the weights are smooth inside each piece. Work is done
    channel by channel on 1-D arrays: their gathers and sums are several times faster
    than on [M, D] ones.
    """

    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, pairs: Pairs):
        # features [V, D] -> image [P, D], T_final [P]
        p = pairs
        span_feats = features.index_select(0, p.span_gauss).t().contiguous()  # [D, S]
        pair_feats = [f.index_select(0, p.span) for f in span_feats]
        image = torch.stack(
            [torch.segment_reduce(f * p.weight, "sum", lengths=p.pixel_counts) for f in pair_feats], -1
        )
        ctx.pairs, ctx.pair_feats = p, pair_feats
        ctx.save_for_backward(conics, opacities)
        # A copy: an output kept on ctx would form a tensor <-> graph reference cycle,
        # which only the cyclic garbage collector frees (memory grows until it runs).
        return image, p.trans_final.clone()

    @staticmethod
    def backward(ctx, v_image, v_trans_final):
        # v_image [P, D], v_trans_final [P]
        conics, opacities = ctx.saved_tensors
        p = ctx.pairs
        n_pairs, n_spans, dtype = p.span.shape[0], p.span_gauss.shape[0], p.weight.dtype
        if n_pairs == 0:
            n_gauss = opacities.shape[0]
            return conics.new_zeros(n_gauss, 2), torch.zeros_like(conics), torch.zeros_like(opacities), (
                conics.new_zeros(n_gauss, v_image.shape[1])
            ), None
        # Channels whose output gradient is zero (e.g. depth when no loss uses it) are
        # skipped: they add nothing to any sum below.
        channels = [k for k in range(v_image.shape[1]) if bool(v_image[:, k].any())]
        v_image = v_image.t()
        v_pair = {k: v_image[k].contiguous().index_select(0, p.pixel) for k in channels}  # [M] each
        color_dot = torch.zeros_like(p.weight)  # c_k . dL/dout
        for k in channels:
            color_dot.addcmul_(ctx.pair_feats[k], v_pair[k])
        # d out / d alpha_k = c_k T_k - (sum_{j>k} c_j w_j + T_final bg) / (1 - alpha_k);
        # the sum behind k is (run total - running sum up to k), running sums in float64.
        running = torch.cumsum(color_dot * p.weight, 0, dtype=torch.float64)
        ends = torch.cumsum(p.pixel_counts, 0).sub_(1).clamp_min(0)  # empty pixels: any valid index
        total = running.index_select(0, ends) + (p.trans_final * v_trans_final).double()
        behind = total.index_select(0, p.pixel).sub_(running).to(dtype)
        # v_sigma = -g alpha dL/dalpha, as alpha = opacity exp(-sigma) where g = 1
        v_sigma = behind.mul_(p.behind_factor).sub_(color_dot.mul_(p.front_factor))

        # Reduce to spans first (the pairs of a span share the Gaussian and dy): sums of
        # v_sigma dx^0,1,2 and of w dL/dout per channel.
        v_sigma_dx = v_sigma * p.dx
        cols = [v_sigma, v_sigma_dx, v_sigma_dx * p.dx] + [v_pair[k].mul_(p.weight) for k in channels]
        sums = p.weight.new_zeros(len(cols), n_spans)
        for row, col in zip(sums, cols):
            row.index_add_(0, p.span, col)
        s0, s1, s2 = sums[:3]
        v_feats = sums.new_zeros(n_spans, v_image.shape[0])
        v_feats[:, channels] = sums[3:].t()
        dy = p.span_dy
        a, b, c = conics.index_select(0, p.span_gauss).unbind(-1)
        # sigma = 0.5 (a dx^2 + c dy^2) + b dx dy with d = mean2d - pixel centre;
        # d alpha / d opacity = alpha / opacity.
        per_span = torch.stack(
            [
                a * s1 + b * dy * s0,
                b * s1 + c * dy * s0,
                0.5 * s2,
                dy * s1,
                0.5 * dy * dy * s0,
                -s0 / opacities.index_select(0, p.span_gauss),
            ],
            -1,
        )
        per_span = torch.cat([per_span, v_feats], -1)
        grads = per_span.new_zeros(opacities.shape[0], per_span.shape[1])
        grads.index_add_(0, p.span_gauss, per_span)
        return grads[:, 0:2], grads[:, 2:5], grads[:, 5], grads[:, 6:], None


def composite(
    means2d: Tensor,  # [V, 2]
    conics: Tensor,  # [V, 3]
    opacities: Tensor,  # [V]
    features: Tensor,  # [V, D]
    depths: Tensor,  # [V]
    cams: Tensor,  # [V] long
    n_cams: int,
    width: int,
    height: int,
) -> tuple[Tensor, Tensor]:
    """Composite visible projected Gaussians -> (features [C, H, W, D], T_final [C, H, W, 1])."""
    pairs = build_pairs(
        means2d.detach(), conics.detach(), opacities.detach(), depths.detach(), cams, n_cams, width, height
    )
    image, trans_final = _Composite.apply(means2d, conics, opacities, features, pairs)
    return image.reshape(n_cams, height, width, -1), trans_final.reshape(n_cams, height, width, 1)


def project(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] wxyz
    scales: Tensor,  # [N, 3] linear
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    eps2d: float,
    near: float,
    far: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """gsplat's projection -> radii [C, N, 2], means2d [C, N, 2], depths [C, N], conics [C, N, 3]."""
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        means, covars, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near, far_plane=far
    )
    return radii, means2d, depths, conics


def rasterize_cpu(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] wxyz
    scales: Tensor,  # [N, 3] linear
    opacities: Tensor,  # [N]
    colors: Tensor,  # [N, 3] RGB or [N, K, 3] SH coefficients
    viewmats: Tensor,  # [C, 4, 4] world-to-camera, OpenCV
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    backgrounds: Tensor | None,  # [C, 3]
    sh_degree: int | None,
    near: float,
    far: float,
    projector=project,  # project() here, or project_numba.project (same contract)
    compositor=composite,  # composite() here, or render_numba.composite (same contract)
) -> tuple[Tensor, Tensor, Tensor]:
    """-> rgb [C, H, W, 3], alpha [C, H, W, 1], expected depth [C, H, W, 1]."""
    n_cams = viewmats.shape[0]
    radii, means2d, depths, conics = projector(
        means, quats, scales, viewmats, Ks, width, height, EPS2D, near, far
    )  # [C, N, 2], [C, N, 2], [C, N], [C, N, 3]
    # Opacity below 1/255 can never reach the alpha threshold (gsplat culls it too).
    # Non-finite projections (a diverged parameter) are dropped rather than allowed to
    # turn into absurd pixel ranges.
    visible = (radii > 0).all(-1) & (opacities >= ALPHA_MIN)[None]
    visible &= torch.isfinite(means2d).all(-1) & torch.isfinite(conics).all(-1)
    flat = torch.nonzero(visible.flatten()).squeeze(1)  # visible (camera, Gaussian) entries
    n = means.shape[0]
    cams, gids = flat // n, flat % n

    if sh_degree is None:
        rgb = colors.index_select(0, gids)
    else:
        campos = torch.inverse(viewmats)[:, :3, 3]  # [C, 3]
        dirs = means.index_select(0, gids) - campos.index_select(0, cams)
        rgb = torch.clamp_min(_spherical_harmonics(sh_degree, dirs, colors.index_select(0, gids)) + 0.5, 0.0)
    depth_v = depths.flatten().index_select(0, flat)
    features = torch.cat([rgb, depth_v[:, None]], -1)
    image, trans_final = compositor(
        means2d.reshape(-1, 2).index_select(0, flat), conics.reshape(-1, 3).index_select(0, flat),
        opacities.index_select(0, gids), features, depth_v, cams, n_cams, width, height,
    )
    alpha = 1.0 - trans_final
    rgb_img = image[..., :3]
    if backgrounds is not None:
        rgb_img = rgb_img + trans_final * backgrounds[:, None, None, :]
    depth = image[..., 3:] / alpha.clamp_min(1e-10)
    return rgb_img, alpha, depth
