"""Gaussian compositing on the CPU in native code (numba), with gsplat's rules.

A drop-in for `render_cpu.composite` (same arguments, same images, same gradients); the
projection before it is `project_numba.project` (or gsplat's torch reference), and this
module does the per-pixel work, which is where the time goes.

Rules (gsplat 1.5.3, "classic"; stated in full in render_cpu.py): a Gaussian reaches a
pixel centre p when alpha = min(0.999, opacity exp(-sigma)) >= 1/255 with
sigma = 0.5 (a dx^2 + c dy^2) + b dx dy, d = mean2d - p; pixels composite front to back
in camera depth (ties: lower index first); the pair whose alpha would bring the
transmittance to <= 1e-4 is dropped and ends the pixel.

How:
- Binning: each Gaussian's pixel box is the bounding box of the ellipse on which its
  alpha falls to 1/255 (sigma = log(255 opacity), gsplat's opacity-aware extent), so no
  pixel it can reach lies outside. Boxes are binned into TILE_H x TILE_W tiles in global
  depth order, which leaves every tile's list already sorted front to back.
- Rasterizing: tiles in parallel (Python threads running nogil kernels; heaviest first);
  inside a tile, row by row: a Gaussian's exact column span on the row comes from one
  square root (where the row crosses the ellipse), so no pixel outside it is ever
  tested; along the span alpha steps by products, not exps; a row stops scanning its
  list once all its pixels have ended.
- Sums in float64 whatever the input dtype: T is a running product, and the backward
  pass's "what lies behind" is a running sum over up to hundreds of pairs.
- With gradients, every composited pair (tile-list slot, column, alpha, T in front) is
  recorded, row by row, in a per-tile block sized by an exact upper bound (the area of
  the tile covered by the boxes). The backward pass walks each row's record in reverse
  (back to front per pixel) and accumulates into one gradient row per tile-list slot,
  so threads never write to the same memory; the slots are summed per Gaussian after.
  Without gradients nothing is recorded (the evaluation / viewer path).

Threads: torch.get_num_threads() at every call, so the one knob (torch.set_num_threads,
i.e. the config's `train.threads`) rules torch and the renderer; the two never run at the
same time (see run_threads for why not numba's parallel loops).
"""

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from numba import njit
from torch import Tensor

from lib.gaussians import render_cpu
from lib.gaussians.render_cpu import ALPHA_MAX, ALPHA_MIN, T_MIN

TILE_W = 16  # pixels; a tile row is one contiguous run of the image row
TILE_H = 16
# The bound ellipse's level is padded a hair (relative and absolute) so that rounding can
# never drop a pixel centre whose alpha reaches 1/255; the exact alpha test decides.
LEVEL_PAD_REL, LEVEL_PAD_ABS = 1e-5, 1e-6
FEATURES = 4  # channels the rasterizing kernel composites (in registers)
N_GRAD = 6  # per-slot gradient columns before the features: mean2d x, y; conic a, b, c; opacity


@njit(cache=True, error_model="numpy")
def _extents(mx, my, a, b, c, opac, width, height):
    """Pixel box [x0, x1] x [y0, y1] (inclusive; empty when x1 < x0) of each Gaussian's
    alpha >= 1/255 ellipse, clipped to the image, and the ellipse's level (in sigma)."""
    n = mx.shape[0]
    x0 = np.empty(n, np.int32)
    x1 = np.empty(n, np.int32)
    y0 = np.empty(n, np.int32)
    y1 = np.empty(n, np.int32)
    level = np.empty(n, np.float64)
    inv_a = np.empty(n, np.float64)  # 1 / a and exp(-a): constants of the row spans and alpha steps
    exp_neg_a = np.empty(n, np.float64)
    for g in range(n):
        ag, bg, cg = np.float64(a[g]), np.float64(b[g]), np.float64(c[g])
        lv = (math.log(np.float64(opac[g])) - math.log(ALPHA_MIN)) * (1.0 + LEVEL_PAD_REL) + LEVEL_PAD_ABS
        level[g] = lv
        inv_a[g] = 1.0 / ag
        exp_neg_a[g] = math.exp(-ag)
        det = ag * cg - bg * bg
        if not (det > 0.0 and ag > 0.0 and lv > 0.0):  # degenerate conic: nothing drawn
            x0[g], x1[g], y0[g], y1[g] = 0, -1, 0, -1
            continue
        # Half extents of {0.5 d^T Q d <= level}: sqrt(2 level (Q^-1)_ii), (Q^-1)_xx = c / det.
        ex = math.sqrt(2.0 * lv * cg / det)
        ey = math.sqrt(2.0 * lv * ag / det)
        # A pixel (row i) is inside when its centre i + 0.5 is; clip in float before int.
        # (np.ceil / np.floor stay floats, so huge or infinite extents clip safely).
        x0[g] = np.int32(min(max(np.ceil(mx[g] - ex - 0.5), 0.0), width))
        x1[g] = np.int32(min(max(np.floor(mx[g] + ex - 0.5), -1.0), width - 1))
        y0[g] = np.int32(min(max(np.ceil(my[g] - ey - 0.5), 0.0), height))
        y1[g] = np.int32(min(max(np.floor(my[g] + ey - 0.5), -1.0), height - 1))
    return x0, x1, y0, y1, level, inv_a, exp_neg_a


@njit(cache=True, error_model="numpy")
def _bin(order, cams, x0, x1, y0, y1, n_cams, tiles_x, tiles_y, with_bound):
    """Tile lists in depth order -> (tile_start [T+1], tile_ids [E], pair_start [T+1]).

    pair_start bounds each tile's composited pairs by the tile area the boxes cover
    (only computed when with_bound)."""
    n_tiles = n_cams * tiles_x * tiles_y
    tile_start = np.zeros(n_tiles + 1, np.int64)
    pair_start = np.zeros(n_tiles + 1, np.int64)
    for g in order:
        if x1[g] < x0[g] or y1[g] < y0[g]:
            continue
        base = cams[g] * tiles_x * tiles_y
        for ty in range(y0[g] // TILE_H, y1[g] // TILE_H + 1):
            rows = min(y1[g], ty * TILE_H + TILE_H - 1) - max(y0[g], ty * TILE_H) + 1
            for tx in range(x0[g] // TILE_W, x1[g] // TILE_W + 1):
                t = base + ty * tiles_x + tx
                tile_start[t + 1] += 1
                if with_bound:
                    cols = min(x1[g], tx * TILE_W + TILE_W - 1) - max(x0[g], tx * TILE_W) + 1
                    pair_start[t + 1] += rows * cols
    for t in range(n_tiles):
        tile_start[t + 1] += tile_start[t]
        pair_start[t + 1] += pair_start[t]
    fill = tile_start[:-1].copy()
    tile_ids = np.empty(tile_start[-1], np.int32)
    for g in order:
        if x1[g] < x0[g] or y1[g] < y0[g]:
            continue
        base = cams[g] * tiles_x * tiles_y
        for ty in range(y0[g] // TILE_H, y1[g] // TILE_H + 1):
            for tx in range(x0[g] // TILE_W, x1[g] // TILE_W + 1):
                t = base + ty * tiles_x + tx
                tile_ids[fill[t]] = g
                fill[t] += 1
    return tile_start, tile_ids, pair_start


@njit(nogil=True, cache=True)
def _tile_box(t, tiles_x, tiles_y, width, height):
    """Global tile index t -> (camera, first and past-last pixel column, first and past-last row)."""
    cam = t // (tiles_x * tiles_y)
    px0 = (t % tiles_x) * TILE_W
    py0 = ((t // tiles_x) % tiles_y) * TILE_H
    return cam, px0, min(px0 + TILE_W, width), py0, min(py0 + TILE_H, height)


@njit(nogil=True, cache=True, error_model="numpy")
def _rasterize(tiles, tile_start, tile_ids, x0, x1, y0, y1, level, inv_a, exp_neg_a, mx, my, a, b, c, opac, feats,
               tiles_x, tiles_y, width, height, image, trans_final,
               store, pair_start, row_end, pair_slot, pair_col, pair_alpha, pair_trans):
    """Composite every listed tile into image [P, 4] and trans_final [P] (P = C H W);
    with `store`, record the composited pairs (see the module docstring).

    Exactly 4 feature channels (RGB + depth: what render() composites), held in registers."""
    for j in range(tiles.shape[0]):
        t = tiles[j]
        cam, px0, px1, py0, py1 = _tile_box(t, tiles_x, tiles_y, width, height)
        ncols = px1 - px0
        trans = np.empty(TILE_W, np.float64)
        acc0, acc1, acc2, acc3 = (np.empty(TILE_W, np.float64), np.empty(TILE_W, np.float64),
                                  np.empty(TILE_W, np.float64), np.empty(TILE_W, np.float64))
        done = np.empty(TILE_W, np.bool_)
        n = pair_start[t] if store else 0
        for y in range(py0, py1):
            trans[:] = 1.0
            acc0[:] = 0.0
            acc1[:] = 0.0
            acc2[:] = 0.0
            acc3[:] = 0.0
            done[:] = False
            live = ncols
            yc = y + 0.5
            for k in range(tile_start[t], tile_start[t + 1]):
                g = tile_ids[k]
                if y < y0[g] or y > y1[g]:
                    continue
                ag, bg, cg = np.float64(a[g]), np.float64(b[g]), np.float64(c[g])
                dy = np.float64(my[g]) - yc
                bdy = bg * dy
                # Columns where this row crosses 0.5 a dx^2 + b dy dx + 0.5 c dy^2 = level.
                disc = bdy * bdy - ag * (cg * dy * dy - 2.0 * level[g])
                if disc < 0.0:
                    continue
                half = math.sqrt(disc) * inv_a[g]
                centre = np.float64(mx[g]) + bdy * inv_a[g]
                # Clipped to the box too: the pair record's size bound counts box pixels only.
                xa = max(int(max(np.ceil(centre - half - 0.5), -1.0)), px0, x0[g])
                xb = min(int(min(np.floor(centre + half - 0.5), width)), px1 - 1, x1[g])
                if xa > xb:
                    continue
                # Along the row sigma is quadratic in x, so exp(-sigma) steps by a ratio that
                # itself steps by exp(-a): two products per pixel instead of an exp.
                dx = np.float64(mx[g]) - (xa + 0.5)
                raw = np.float64(opac[g]) * math.exp(-(0.5 * ag * dx * dx + 0.5 * cg * dy * dy + bdy * dx))
                step = math.exp(ag * dx - 0.5 * ag + bdy)
                step_ratio = exp_neg_a[g]
                f0, f1, f2, f3 = feats[g, 0], feats[g, 1], feats[g, 2], feats[g, 3]
                for x in range(xa, xb + 1):
                    i = x - px0
                    alpha = raw
                    raw *= step
                    step *= step_ratio
                    if done[i]:
                        continue
                    if alpha < ALPHA_MIN:
                        continue
                    clamped = alpha > ALPHA_MAX
                    if clamped:
                        alpha = ALPHA_MAX
                    t_next = trans[i] * (1.0 - alpha)
                    if t_next <= T_MIN:
                        done[i] = True
                        live -= 1
                        continue
                    w = alpha * trans[i]
                    acc0[i] += w * f0
                    acc1[i] += w * f1
                    acc2[i] += w * f2
                    acc3[i] += w * f3
                    if store:
                        pair_slot[n] = k
                        pair_col[n] = i
                        # The sign carries "clamped" (alpha has no gradient there).
                        pair_alpha[n] = -alpha if clamped else alpha
                        pair_trans[n] = trans[i]
                        n += 1
                    trans[i] = t_next
                if live == 0:
                    break
            p0 = (cam * height + y) * width + px0
            for i in range(ncols):
                trans_final[p0 + i] = trans[i]
                image[p0 + i, 0] = acc0[i]
                image[p0 + i, 1] = acc1[i]
                image[p0 + i, 2] = acc2[i]
                image[p0 + i, 3] = acc3[i]
            if store:
                row_end[t * TILE_H + (y - py0)] = n


@njit(nogil=True, cache=True, error_model="numpy")
def _backward(tiles, tile_start, tile_ids, mx, my, a, b, c, opac, feats, tiles_x, tiles_y, width, height,
              v_image, v_trans, trans_final, pair_start, row_end, pair_slot, pair_col, pair_alpha, pair_trans,
              slot_grads):
    """Adds into slot_grads [E, 6 + 4] (one row per tile-list slot) d/d (mean2d x, y, conic a, b,
    c, opacity, 4 features): the exact derivative of `_rasterize` with the recorded pairs held fixed."""
    for j in range(tiles.shape[0]):
        t = tiles[j]
        cam, px0, px1, py0, py1 = _tile_box(t, tiles_x, tiles_y, width, height)
        behind = np.empty(TILE_W, np.float64)
        start = pair_start[t]
        for y in range(py0, py1):
            end = row_end[t * TILE_H + (y - py0)]
            p0 = (cam * height + y) * width + px0
            # behind_k = sum over the pairs behind k of (c . v) w, plus T_final v_T.
            for i in range(px1 - px0):
                behind[i] = np.float64(trans_final[p0 + i]) * v_trans[p0 + i]
            yc = y + 0.5
            # The pairs of one Gaussian's span on this row are consecutive in the record (and
            # share dy): sum v_sigma dx^0,1,2 and w v over the span in registers, then turn them
            # into the slot's gradient once per span.
            cur = -1
            s0 = s1 = s2 = v0 = v1 = v2 = v3 = 0.0
            ag = bg = cg = mxg = dy = inv_o = f0 = f1 = f2 = f3 = 0.0  # set at each span's first pair
            for m in range(end - 1, start - 2, -1):
                k = pair_slot[m] if m >= start else -1  # -1: past the row's first pair
                if k != cur or k < 0:
                    if cur >= 0:
                        # sigma = 0.5 (a dx^2 + c dy^2) + b dx dy; d alpha / d opacity = alpha / opacity
                        slot_grads[cur, 0] += ag * s1 + bg * dy * s0
                        slot_grads[cur, 1] += bg * s1 + cg * dy * s0
                        slot_grads[cur, 2] += 0.5 * s2
                        slot_grads[cur, 3] += dy * s1
                        slot_grads[cur, 4] += 0.5 * dy * dy * s0
                        slot_grads[cur, 5] -= s0 * inv_o
                        slot_grads[cur, N_GRAD + 0] += v0
                        slot_grads[cur, N_GRAD + 1] += v1
                        slot_grads[cur, N_GRAD + 2] += v2
                        slot_grads[cur, N_GRAD + 3] += v3
                    if k < 0:
                        break
                    cur = k
                    s0 = s1 = s2 = v0 = v1 = v2 = v3 = 0.0
                    g = tile_ids[k]
                    ag, bg, cg = np.float64(a[g]), np.float64(b[g]), np.float64(c[g])
                    mxg = np.float64(mx[g])
                    dy = np.float64(my[g]) - yc
                    inv_o = 1.0 / opac[g]
                    f0, f1, f2, f3 = feats[g, 0], feats[g, 1], feats[g, 2], feats[g, 3]
                i = pair_col[m]
                p = p0 + i
                alpha = np.float64(pair_alpha[m])
                clamped = alpha < 0.0
                alpha = abs(alpha)
                tr = np.float64(pair_trans[m])
                w = alpha * tr
                g0, g1, g2, g3 = v_image[p, 0], v_image[p, 1], v_image[p, 2], v_image[p, 3]
                cv = f0 * g0 + f1 * g1 + f2 * g2 + f3 * g3
                v0 += w * g0
                v1 += w * g1
                v2 += w * g2
                v3 += w * g3
                if not clamped:
                    # d out / d alpha_k = c_k T_k - behind_k / (1 - alpha_k); alpha = o exp(-sigma).
                    v_sigma = alpha * (behind[i] / (1.0 - alpha) - cv * tr)
                    dx = mxg - (px0 + i + 0.5)
                    s0 += v_sigma
                    s1 += v_sigma * dx
                    s2 += v_sigma * dx * dx
                behind[i] += cv * w
            start = end


@njit(cache=True, error_model="numpy")
def _sum_slots(slot_grads, tile_ids, n):
    """Per-slot gradient rows -> per-Gaussian [n, 6 + D] (in slot order: deterministic)."""
    out = np.zeros((n, slot_grads.shape[1]), np.float64)
    for k in range(tile_ids.shape[0]):
        g = tile_ids[k]
        for d in range(slot_grads.shape[1]):
            out[g, d] += slot_grads[k, d]
    return out


class Bins(NamedTuple):
    tiles: np.ndarray  # [T'] int64, non-empty tiles, heaviest first
    tile_start: np.ndarray  # [T + 1] int64, offsets into tile_ids
    tile_ids: np.ndarray  # [E] int32, visible entries per tile, front to back
    pair_start: np.ndarray  # [T + 1] int64, offsets of each tile's pair record (bound)
    x0: np.ndarray  # [V] int32 pixel box
    x1: np.ndarray
    y0: np.ndarray
    y1: np.ndarray
    level: np.ndarray  # [V] float64, sigma at which alpha reaches 1/255 (padded)
    inv_a: np.ndarray  # [V] float64, 1 / conic a
    exp_neg_a: np.ndarray  # [V] float64, exp(-a): ratio of successive alpha steps along a row
    tiles_x: int
    tiles_y: int


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def bin_tiles(
    means2d: Tensor,  # [V, 2]
    conics: Tensor,  # [V, 3]
    opacities: Tensor,  # [V]
    depths: Tensor,  # [V]
    cams: Tensor,  # [V] long
    n_cams: int,
    width: int,
    height: int,
    with_bound: bool,
) -> Bins:
    mx, my = (_numpy(t) for t in means2d.detach().t())
    a, b, c = (_numpy(t) for t in conics.detach().t())
    x0, x1, y0, y1, level, inv_a, exp_neg_a = _extents(mx, my, a, b, c, _numpy(opacities), width, height)
    tiles_x, tiles_y = -(-width // TILE_W), -(-height // TILE_H)
    # Stable: equal depths keep the lower (camera, Gaussian) index in front, as gsplat's sort does.
    order = _numpy(torch.argsort(depths.detach(), stable=True))
    tile_start, tile_ids, pair_start = _bin(order, _numpy(cams), x0, x1, y0, y1, n_cams, tiles_x, tiles_y, with_bound)
    counts = np.diff(tile_start)
    nonempty = np.flatnonzero(counts)
    tiles = nonempty[np.argsort(-counts[nonempty], kind="stable")]
    return Bins(tiles, tile_start, tile_ids, pair_start, x0, x1, y0, y1, level, inv_a, exp_neg_a, tiles_x, tiles_y)


_pool: ThreadPoolExecutor | None = None  # helper threads (the calling thread works too), grown on demand
_pool_size = 0
_DONE = object()


def run_threads(kernel, chunks: list) -> None:
    """kernel(chunk) for every chunk, on torch.get_num_threads() threads (this one included).

    The kernels are numba functions compiled with nogil, so Python threads run them in parallel.
    Why not numba's own parallel loops: their OpenMP layer shares torch's libgomp, whose idle
    threads spin; on a machine shared with other processes a spinning or preempted thread
    stalls the whole loop at its barrier (2 threads ran 3x slower than 1 here). A thread pool
    hands out chunks dynamically and waits without spinning.
    """
    global _pool, _pool_size
    threads = min(torch.get_num_threads(), len(chunks))
    if threads <= 1:
        for chunk in chunks:
            kernel(chunk)
        return
    if _pool is None or _pool_size < threads - 1:
        _pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="gaussians")
        _pool_size = threads - 1
    todo, lock = iter(chunks), threading.Lock()

    def work():  # every thread takes the next chunk until none is left
        while True:
            with lock:
                chunk = next(todo, _DONE)
            if chunk is _DONE:
                return
            kernel(chunk)

    helpers = [_pool.submit(work) for _ in range(threads - 1)]
    work()
    for future in helpers:
        future.result()


CHUNKS_PER_THREAD = 64  # small chunks, handed out as threads free up: 4 per thread left one thread idle at
# the end of a frame (2 threads 1.59-1.63x one thread at 802x550, against 1.69-1.74x with 64; bench/threads.py)


def tile_chunks(tiles: np.ndarray, threads: int) -> list[np.ndarray]:
    """Tiles (heaviest first) dealt into chunks of about equal cost: chunk w gets tiles w, w + k, ..."""
    k = min(tiles.shape[0], CHUNKS_PER_THREAD * threads if threads > 1 else 1)
    return [tiles[w::k] for w in range(k)] if k else []


class _Composite(torch.autograd.Function):
    """Front-to-back compositing with its exact gradient (pairs recorded in forward)."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, bins: Bins, n_pixels: int, width: int, height: int):
        # features [V, D] -> image [P, D], T_final [P]
        out = _forward(means2d, conics, opacities, features, bins, n_pixels, width, height, store=True)
        image, trans_final, record = out
        ctx.bins, ctx.record, ctx.size = bins, record, (width, height)
        ctx.save_for_backward(means2d, conics, opacities, features)
        return image, trans_final.clone()  # a copy: see render_cpu._Composite

    @staticmethod
    def backward(ctx, v_image, v_trans_final):
        means2d, conics, opacities, features = ctx.saved_tensors
        bins, (row_end, slot, col, alpha, trans, trans_final), (width, height) = ctx.bins, ctx.record, ctx.size
        mx, my = (_numpy(t) for t in means2d.t())
        a, b, c = (_numpy(t) for t in conics.t())
        slot_grads = np.zeros((bins.tile_ids.shape[0], N_GRAD + features.shape[1]), np.float64)
        args = (bins.tile_start, bins.tile_ids, mx, my, a, b, c, _numpy(opacities), _numpy(features), bins.tiles_x,
                bins.tiles_y, width, height, _numpy(v_image.to(torch.float64)),
                _numpy(v_trans_final.to(torch.float64)), trans_final, bins.pair_start, row_end, slot, col, alpha,
                trans, slot_grads)
        # Threads write disjoint slot rows (every slot belongs to one tile).
        run_threads(lambda tiles: _backward(tiles, *args), tile_chunks(bins.tiles, torch.get_num_threads()))
        grads = torch.from_numpy(_sum_slots(slot_grads, bins.tile_ids, means2d.shape[0])).to(features.dtype)
        return grads[:, 0:2], grads[:, 2:5], grads[:, 5], grads[:, N_GRAD:], None, None, None, None


def _forward(means2d, conics, opacities, features, bins: Bins, n_pixels, width, height, store):
    dtype = features.dtype
    n_feat = features.shape[1]
    image = np.zeros((n_pixels, n_feat), dtype=_numpy(features).dtype)
    trans_final = np.ones(n_pixels, dtype=image.dtype)
    n_pairs = int(bins.pair_start[-1]) if store else 0
    n_rows = bins.tile_start.shape[0] - 1
    row_end = np.zeros(n_rows * TILE_H if store else 0, np.int64)
    slot = np.empty(n_pairs, np.int32)
    col = np.empty(n_pairs, np.int32)
    alpha = np.empty(n_pairs, image.dtype)
    trans = np.empty(n_pairs, image.dtype)
    mx, my = (_numpy(t) for t in means2d.t())
    a, b, c = (_numpy(t) for t in conics.t())
    args = (bins.tile_start, bins.tile_ids, bins.x0, bins.x1, bins.y0, bins.y1, bins.level, bins.inv_a,
            bins.exp_neg_a, mx, my, a, b, c, _numpy(opacities), _numpy(features), bins.tiles_x, bins.tiles_y, width,
            height, image, trans_final, store, bins.pair_start, row_end, slot, col, alpha, trans)
    run_threads(lambda tiles: _rasterize(tiles, *args), tile_chunks(bins.tiles, torch.get_num_threads()))
    image_t, trans_t = torch.from_numpy(image).to(dtype), torch.from_numpy(trans_final).to(dtype)
    return image_t, trans_t, (row_end, slot, col, alpha, trans, trans_final)


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
    """Composite visible projected Gaussians -> (features [C, H, W, D], T_final [C, H, W, 1]).

    Same contract as render_cpu.composite. Without gradients (torch.no_grad, or no input
    requiring one) no pair is recorded: the forward-only path. The kernel holds 4 channels
    (render()'s RGB + depth); fewer are padded, more go to the torch compositor.
    """
    n_feat = features.shape[1]
    if n_feat > FEATURES:
        return render_cpu.composite(means2d, conics, opacities, features, depths, cams, n_cams, width, height)
    if n_feat < FEATURES:
        features = torch.nn.functional.pad(features, (0, FEATURES - n_feat))
    n_pixels = n_cams * height * width
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (means2d, conics, opacities, features))
    bins = bin_tiles(means2d, conics, opacities, depths, cams, n_cams, width, height, with_bound=needs_grad)
    if needs_grad:
        image, trans_final = _Composite.apply(means2d, conics, opacities, features, bins, n_pixels, width, height)
    else:
        image, trans_final, _ = _forward(means2d, conics, opacities, features, bins, n_pixels, width, height, False)
    return image[:, :n_feat].reshape(n_cams, height, width, n_feat), trans_final.reshape(n_cams, height, width, 1)
