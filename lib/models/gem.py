"""GEM, the Gaussian eigen model (stage 3): a linear basis per Gaussian attribute.

The regressor's Gaussians over an actor's training frames, expressed in *GEM space* (head space
with the neck rotation undone: the global rotation / translation and the neck joint's rigid motion
removed, jaw, eyes and expression kept), are compressed attribute by attribute:

    x = mean + sum_k c_k * sqrt(lambda_k) * basis_k          (c in sigma units)

over the flattened values of all Gaussians of one attribute (a PCA over frames x (Gaussians .
channels), not whitened: ``basis`` holds orthonormal rows, ``lambda`` the variances). Attributes
and their channels, as the renderer takes them (activated, not logits / logs):

    positions [N, 3] metres    rotations [N, 4] raw wxyz quaternions    scales [N, 3] linear
    opacities [N, 1] in [0, 1]                                          colours: fixed (frame 0)

After reconstruction quaternions are normalised, scales clamped at 0 and opacities to [0, 1].
Quaternions q and -q are the same rotation; before fitting or projecting, each Gaussian's
quaternion is flipped into the hemisphere of its reference (frame 0 when fitting, the mean when
projecting), so the PCA sees one continuous signal and not sign jumps.

"Parts": optionally each attribute gets one PCA per face region (a block); a Gaussian belongs to
the region of its nearest canonical vertex (``assign_parts``). The coefficient vector of an
attribute is the concatenation of its blocks' coefficients, in block order.

Fitting uses the T x T Gram matrix of the centred data (T frames, few; N . C values, many), so a
fit over 262k Gaussians costs a few matrix products. At most T - 1 components exist; components
whose variance is below 1e-10 of the largest (numerically zero) are dropped. The data is read twice in
column blocks (all T frames of a range of Gaussians, ``CHUNK_BYTES`` at a time: once for the Gram
matrix, once for the basis), from a ``FrameSource``: a GaussianSet in memory (``FramesInMemory``), or
stage 3's frame store on disk (``lib.models.frame_store``), so memory grows with T^2, not with T x N.

File (``save`` / ``load``): a ``torch.save`` dict of tensors, strings and numbers only, read with
``torch.load(weights_only=True)``; written atomically (temp file + rename). Bases may be stored in
float16 (``half=True``); means, variances and coefficients stay float32.
"""
from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

from lib.atomic import load_torch, save_torch
from lib.errors import ProjectError, check_finite
from lib.flame.model import FlameModel
from lib.gaussians.render import RenderOutput, render
from lib.geometry.rotations import axis_angle_to_matrix, matrix_to_quat, normalize_quat, quat_multiply

ATTRIBUTES = {"positions": 3, "rotations": 4, "scales": 3, "opacities": 1}  # name -> channels
FORMAT = "gem-v1"
# Part name -> FLAME_masks regions, in priority order: a vertex in several regions (FLAME's masks
# overlap: "face" contains nose, lips and eyes) goes to the first part that claims it. Regions a
# model's masks lack are skipped; vertices no part claims form the part "rest".
PART_REGIONS = (
    ("eyeballs", ("left_eyeball", "right_eyeball")),
    ("ears", ("left_ear", "right_ear")),
    ("mouth", ("lips", "mouth")),
    ("nose", ("nose",)),
    ("eye_region", ("left_eye_region", "right_eye_region", "eye_region")),
    ("forehead", ("forehead",)),
    ("jaw", ("jaw",)),
    ("face", ("face",)),
    ("scalp", ("scalp",)),
    ("neck", ("neck",)),
)
_RANK_TOL = 1e-10  # variance ratio below which a component is numerical noise
# float64 bytes of one column block [T, d] of the fit (its transient memory beside the T x T Gram matrix)
CHUNK_BYTES = 64 << 20


class GemError(ProjectError, ValueError):
    """A GEM file or input that cannot be used; the message names the file and what to do."""


class GaussianSet(NamedTuple):
    """B sets of N Gaussians with activated attributes (quaternions wxyz)."""

    means: Tensor  # [B, N, 3]
    quats: Tensor  # [B, N, 4]
    scales: Tensor  # [B, N, 3]
    opacities: Tensor  # [B, N]
    colors: Tensor  # [B, N, 3] RGB in [0, 1]

    def attribute(self, name: str) -> Tensor:
        """One GEM attribute as [B, N, C]."""
        values = {"positions": self.means, "rotations": self.quats, "scales": self.scales,
                  "opacities": self.opacities[..., None]}
        return values[name]

    def frame(self, b: int) -> "GaussianSet":
        """The b-th set, keeping a batch axis of 1."""
        return GaussianSet(*(x[b:b + 1] for x in self))


@dataclass
class Block:
    """The PCA of one attribute over one set of Gaussians (all of them, or one part)."""

    part: str
    index: Tensor | None  # [n] long Gaussians of the block; None = all N, in order
    mean: Tensor  # [n * C]
    basis: Tensor  # [K, n * C] orthonormal rows
    eigenvalues: Tensor  # [K] variances, descending

    @property
    def n_components(self) -> int:
        return int(self.eigenvalues.shape[0])


# ---------------------------------------------------------------- PCA of one data matrix

def pca_of_columns(blocks: Callable[[], Iterable[Tensor]], mean: Tensor, n_frames: int,
                   n_components: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PCA of the rows of X [T, D] through the T x T Gram matrix of the centred rows (float64).

    X is read twice as successive column blocks, once for the Gram matrix and once for the basis
    (basis = U^T X_c / s), so only one block is in memory at a time.
    blocks: () -> X's column blocks [T, d_i] in order (sum d_i = D), any float dtype and device;
    mean: [D] float64 column means of X. -> mean [D], basis [K, D] orthonormal rows, eigenvalues [K]
    (variance, ddof 1), coefficients [T, K] of the rows in sigma units (zero mean, unit variance per
    component), all float32; K = min(n_components, T - 1, numerical rank).
    """
    T = n_frames
    gram = torch.zeros(T, T, dtype=torch.float64, device=mean.device)
    for _, centred in _centred(blocks(), mean):
        gram.addmm_(centred, centred.T)
    values, vectors = torch.linalg.eigh(gram)  # ascending
    values, vectors = values.flip(0), vectors.flip(1)
    keep = int((values > _RANK_TOL * values[0]).sum()) if values[0] > 0 else 0
    k = min(n_components, T - 1, keep)
    s = values[:k].sqrt()  # singular values of the centred data
    u = vectors[:, :k]
    basis = torch.empty(k, mean.shape[0], dtype=torch.float32, device=mean.device)
    for start, centred in _centred(blocks(), mean):
        basis[:, start:start + centred.shape[1]] = ((u.T @ centred) / s[:, None]).float()
    eigenvalues = values[:k] / (T - 1)
    coefficients = u * (T - 1) ** 0.5  # = (centred @ basis.T) / sqrt(eigenvalues)
    return mean.float(), basis, eigenvalues.float(), coefficients.float()


def _centred(blocks: Iterable[Tensor], mean: Tensor) -> Iterator[tuple[int, Tensor]]:
    """(first column, block - its means in float64) of successive column blocks, each written over the
    last one's buffer (valid until the next): a fresh block per step would keep two alive at a time."""
    start, buffer = 0, None
    for block in blocks:
        width = block.shape[1]
        if buffer is None or buffer.shape[1] < width:
            buffer = torch.empty(block.shape[0], width, dtype=torch.float64, device=mean.device)
        centred = buffer[:, :width]
        centred.copy_(block).sub_(mean[start:start + width])
        yield start, centred
        start += width


def gaussians_per_read(n_frames: int, channels: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Gaussians per column block: its float64 copy [T, n * C] stays within chunk_bytes."""
    return max(1, chunk_bytes // (8 * n_frames * channels))


# ---------------------------------------------------------------- quaternion sign continuity

def align_quats(quats: Tensor, reference: Tensor) -> Tensor:
    """Flip each quaternion into the hemisphere of its reference. [..., N, 4], [N, 4] -> [..., N, 4]"""
    sign = torch.where((quats * reference).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(quats)
    return quats * sign


# ---------------------------------------------------------------- parts

def assign_parts(positions: Tensor, canonical_verts: Tensor,
                 masks: dict[str, np.ndarray]) -> tuple[list[str], Tensor]:
    """Part of every Gaussian through its nearest canonical vertex (see PART_REGIONS).

    positions: [N, 3] canonical Gaussian positions; canonical_verts: [V, 3]; masks: FLAME_masks
    (region -> vertex ids). -> (part names, labels [N] long into the names); parts no Gaussian
    falls in are left out.
    """
    tree = cKDTree(canonical_verts.detach().cpu().double().numpy())
    _, nearest = tree.query(positions.detach().cpu().double().numpy())
    vertex_part = np.full(canonical_verts.shape[0], -1, dtype=np.int64)
    names = []
    for name, regions in PART_REGIONS:
        ids = [np.asarray(masks[r], dtype=np.int64) for r in regions if r in masks]
        if not ids:
            continue
        ids = np.concatenate(ids)
        ids = ids[(ids >= 0) & (ids < len(vertex_part))]
        free = ids[vertex_part[ids] < 0]
        vertex_part[free] = len(names)
        names.append(name)
    vertex_part[vertex_part < 0] = len(names)
    names.append("rest")
    labels = vertex_part[nearest]
    used = np.unique(labels)
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return [names[i] for i in used], torch.as_tensor(remap[labels], device=positions.device)


def part_groups(parts: tuple[list[str], Tensor] | None) -> list[tuple[str, Tensor | None]]:
    """(name, Gaussian indices [n] long, ascending) of every block of an attribute: one per part of
    ``assign_parts``' (names, labels [N]), or ("all", None) without parts."""
    if parts is None:
        return [("all", None)]
    return [(name, (parts[1] == i).nonzero().squeeze(1)) for i, name in enumerate(parts[0])]


def gaussian_order(parts: tuple[list[str], Tensor] | None) -> Tensor | None:
    """The order [N] long in which a FrameSource keeps Gaussians for ``fit``: each part's next to each
    other, parts in order, so that a block is one range of read positions. None = 0..N-1 (no parts)."""
    return None if parts is None else torch.cat([index for _, index in part_groups(parts)])


# ---------------------------------------------------------------- what the fit reads

class FrameSource(Protocol):
    """T frames of N GEM-space Gaussians as ``GaussianEigenModel.fit`` reads them: per attribute, in
    column blocks (all T frames of a range of Gaussians). Gaussians are read in ``order``
    (``gaussian_order``: each part one range); rotations come flipped into frame 0's hemisphere."""

    n_frames: int
    n_gaussians: int
    order: Tensor | None  # [N] long, the Gaussian at each read position; None = 0..N-1
    colors: Tensor  # [N, 3] frame 0's, in the Gaussians' own order

    def mean(self, attr: str) -> Tensor:
        """[N, C] float64 mean over the frames, in read order."""

    def columns(self, attr: str, start: int, stop: int) -> Iterator[Tensor]:
        """Read positions start..stop of every frame as successive blocks [T, n * C] of at most
        ``gaussians_per_read`` Gaussians (float32)."""


class FramesInMemory:
    """A GaussianSet [T, N, ...] read as a FrameSource (``fit`` of frames already in memory)."""

    def __init__(self, frames: GaussianSet, order: Tensor | None = None, chunk_bytes: int = CHUNK_BYTES):
        self.n_frames, self.n_gaussians = frames.means.shape[:2]
        self.order = None if order is None else order.to(frames.means.device)
        self.colors = frames.colors[0].detach()
        self.chunk_bytes = chunk_bytes
        self._values = {attr: frames.attribute(attr).detach() for attr in ATTRIBUTES}
        quats = self._values["rotations"]
        self._values["rotations"] = align_quats(quats, quats[0])

    def mean(self, attr: str) -> Tensor:
        mean = self._values[attr].mean(0, dtype=torch.float64)
        return mean if self.order is None else mean[self.order]

    def columns(self, attr: str, start: int, stop: int) -> Iterator[Tensor]:
        x = self._values[attr]
        step = gaussians_per_read(self.n_frames, x.shape[2], self.chunk_bytes)
        for a in range(start, stop, step):
            b = min(a + step, stop)
            block = x[:, a:b] if self.order is None else x[:, self.order[a:b]]
            yield block.reshape(self.n_frames, -1)


# ---------------------------------------------------------------- poses

def gem_pose(flame: FlameModel, params: dict[str, Tensor | None]) -> tuple[Tensor, Tensor]:
    """The rigid map GEM space -> world of FLAME frames: world = x @ R^T + t.

    It is the head's global pose after the neck joint's rigid motion. With rotation and translation
    zero, FLAME moves the neck's children by A = [R_n | p - R_n p] (R_n, p: the posed neck joint's
    frame); the global pose then turns everything about the rest root j0 and translates it
    (see ``lib.models.avatar.split_global_pose``). params: [B, ...] tensors as VHAP writes them.
    -> R [B, 3, 3], t [B, 3]
    """
    args = dict(params)
    rotation, translation = args.pop("rotation"), args.pop("translation")
    _, joints = flame(**args)
    j0 = joints[:, 0, :3, 3]
    R_g = axis_angle_to_matrix(rotation.to(j0))
    t_g = j0 + translation.to(j0) - (R_g @ j0[..., None])[..., 0]
    R_n, p = joints[:, 1, :3, :3], joints[:, 1, :3, 3]
    t_n = p - (R_n @ p[..., None])[..., 0]
    return R_g @ R_n, (R_g @ t_n[..., None])[..., 0] + t_g


def transform(gaussians: GaussianSet, R: Tensor, t: Tensor) -> GaussianSet:
    """Apply the rigid map x -> R x + t (R [B, 3, 3], t [B, 3]) to means and rotations."""
    means = gaussians.means @ R.transpose(-1, -2) + t[:, None]
    quats = quat_multiply(matrix_to_quat(R)[:, None], gaussians.quats)
    return gaussians._replace(means=means, quats=quats)


def to_gem_space(gaussians: GaussianSet, R: Tensor, t: Tensor) -> GaussianSet:
    """Inverse of ``transform``: world Gaussians -> GEM space, given the frame's ``gem_pose``."""
    Rt = R.transpose(-1, -2)
    return transform(gaussians, Rt, -(Rt @ t[..., None])[..., 0])


# ---------------------------------------------------------------- the model

class GaussianEigenModel:
    """Per-attribute linear bases of an actor's Gaussians (see the module docstring).

    blocks:        attribute -> [Block], one per part (one block "all" without parts)
    colors:        [N, 3] fixed RGB
    coefficients:  attribute -> [T, K] sigma-unit coefficients of the training frames
    timesteps:     [T] long, the dataset timestep of each coefficient row
    extras:        tensors the fitting stage keeps beside the model (e.g. the texel index)
    """

    def __init__(self, blocks: dict[str, list[Block]], colors: Tensor,
                 coefficients: dict[str, Tensor], timesteps: Tensor, extras: dict[str, Tensor] | None = None):
        self.blocks = blocks
        self.colors = colors
        self.coefficients = coefficients
        self.timesteps = timesteps
        self.extras = dict(extras or {})
        self._scaled: dict[tuple[str, int], Tensor] = {}

    # ---- fitting ----

    @classmethod
    def fit(cls, frames: GaussianSet | FrameSource, n_components: dict[str, int], timesteps: Tensor | None = None,
            parts: tuple[list[str], Tensor] | None = None, extras: dict[str, Tensor] | None = None
            ) -> "GaussianEigenModel":
        """Fit the bases to T frames of N Gaussians in GEM space: a GaussianSet with B = T, or a
        FrameSource (stage 3's ``FrameStore``, written in ``gaussian_order(parts)``).

        n_components: attribute -> components kept (per block); parts: (names, labels [N]) from
        ``assign_parts``, or None for one block per attribute. Colours are frame 0's.
        """
        missing = [a for a in ATTRIBUTES if a not in n_components]
        if missing:
            raise GemError(f"no component count for {missing}; n_components needs {list(ATTRIBUTES)}")
        groups = part_groups(parts)
        order = gaussian_order(parts)
        source = FramesInMemory(frames, order) if isinstance(frames, GaussianSet) else frames
        T, N = source.n_frames, source.n_gaussians
        if T < 2:
            raise GemError(f"a PCA needs at least 2 frames, got {T}")
        identity = torch.arange(N)
        if not torch.equal(identity if source.order is None else source.order.cpu(),
                           identity if order is None else order.cpu()):
            raise GemError("the frames were stored in another Gaussian order than these parts need; "
                           "write them with order=gaussian_order(parts)")
        timesteps = torch.arange(T) if timesteps is None else torch.as_tensor(timesteps).long()
        blocks, coefficients = {}, {}
        for attr in ATTRIBUTES:
            means = source.mean(attr)  # [N, C] float64, read order
            blocks[attr], coeffs, start = [], [], 0
            for part, index in groups:
                stop = start + (N if index is None else index.shape[0])
                read = functools.partial(source.columns, attr, start, stop)
                mean, basis, eigenvalues, c = pca_of_columns(read, means[start:stop].reshape(-1), T, n_components[attr])
                blocks[attr].append(Block(part, index, mean, basis, eigenvalues))
                coeffs.append(c)
                start = stop
            coefficients[attr] = torch.cat(coeffs, dim=1)
        return cls(blocks, source.colors.detach().clone(), coefficients, timesteps, extras)

    # ---- shape of the coefficient vectors ----

    @property
    def n_gaussians(self) -> int:
        return int(self.colors.shape[0])

    @property
    def parts(self) -> list[str]:
        return [b.part for b in self.blocks["positions"]]

    def n_components(self, attr: str) -> int:
        return sum(b.n_components for b in self.blocks[attr])

    def component_labels(self, attr: str) -> list[tuple[str, int]]:
        """(part, component index within the part) of every entry of an attribute's coefficients."""
        return [(b.part, k) for b in self.blocks[attr] for k in range(b.n_components)]

    def zero_coefficients(self, batch: int = 1) -> dict[str, Tensor]:
        """The mean state: every attribute's coefficients zero. -> attribute -> [batch, K]"""
        return {a: self.colors.new_zeros(batch, self.n_components(a)) for a in ATTRIBUTES}

    # ---- evaluation ----

    def reconstruct(self, coefficients: dict[str, Tensor]) -> GaussianSet:
        """Gaussians in GEM space from sigma-unit coefficients (attribute -> [B, K]; a missing
        attribute is at its mean). -> GaussianSet with B sets of N"""
        batch = max((c.shape[0] for c in coefficients.values()), default=1)
        values = {}
        for attr, C in ATTRIBUTES.items():
            c = coefficients.get(attr)
            if c is not None and c.shape[-1] != self.n_components(attr):
                raise GemError(f"{attr}: got {c.shape[-1]} coefficients, the model has {self.n_components(attr)}")
            values[attr] = self._attribute(attr, C, c, batch)
        colors = self.colors[None].expand(batch, -1, -1)
        return GaussianSet(values["positions"], normalize_quat(values["rotations"]),
                           values["scales"].clamp_min(0.0), values["opacities"][..., 0].clamp(0.0, 1.0), colors)

    def evaluate(self, coefficients: dict[str, Tensor], R: Tensor | None = None,
                 t: Tensor | None = None) -> GaussianSet:
        """Coefficients (+ the frame's ``gem_pose`` R [B, 3, 3], t [B, 3]) -> world Gaussians."""
        gaussians = self.reconstruct(coefficients)
        return gaussians if R is None else transform(gaussians, R, t)

    def project(self, gaussians: GaussianSet) -> dict[str, Tensor]:
        """Sigma-unit coefficients of GEM-space Gaussians (the least-squares fit). -> attribute -> [B, K]"""
        out = {}
        for attr in ATTRIBUTES:
            x = gaussians.attribute(attr).detach()
            coeffs = []
            for block in self.blocks[attr]:
                data = x if block.index is None else x[:, block.index]
                if attr == "rotations":
                    data = align_quats(data, block.mean.view(data.shape[1], 4))
                centred = data.reshape(data.shape[0], -1) - block.mean
                coeffs.append((centred @ block.basis.T.to(centred)) / block.eigenvalues.sqrt())
            out[attr] = torch.cat(coeffs, dim=1)
        return out

    def _attribute(self, attr: str, C: int, c: Tensor | None, batch: int) -> Tensor:
        blocks = self.blocks[attr]
        if len(blocks) == 1 and blocks[0].index is None:
            return self._block_values(attr, 0, c, batch).view(batch, -1, C)
        out = self.colors.new_empty(batch, self.n_gaussians, C)
        start = 0
        for i, block in enumerate(blocks):
            part_c = None if c is None else c[:, start:start + block.n_components]
            start += block.n_components
            out[:, block.index] = self._block_values(attr, i, part_c, batch).view(batch, -1, C)
        return out

    def _block_values(self, attr: str, i: int, c: Tensor | None, batch: int) -> Tensor:
        block = self.blocks[attr][i]
        mean = block.mean.to(self.colors.dtype)
        if c is None or block.n_components == 0:
            return mean.expand(batch, -1)
        if block.basis.requires_grad:  # being fine-tuned: the product changes every step
            return torch.addmm(mean, c.to(mean.dtype), block.eigenvalues.sqrt()[:, None] * block.basis)
        key = (attr, i)
        if key not in self._scaled:  # sqrt(lambda) folded into the basis once: one addmm per block
            self._scaled[key] = (block.eigenvalues.sqrt()[:, None] * block.basis.float()).to(mean.dtype)
        return torch.addmm(mean, c.to(mean.dtype), self._scaled[key])

    # ---- fine-tuning ----

    def fine_tunable(self) -> list[Tensor]:
        """Every block's mean and basis as trainable float32 leaf tensors (stage 4's warm-up fine-tunes
        them photometrically); eigenvalues, colours and coefficients stay fixed. -> the tensors"""
        params = []
        for blocks in self.blocks.values():
            for b in blocks:
                b.mean = b.mean.detach().float().requires_grad_(True)
                b.basis = b.basis.detach().float().requires_grad_(True)
                params += [b.mean, b.basis]
        self._scaled.clear()
        return params

    @torch.no_grad()
    def orthonormalise(self) -> None:
        """Make every block's basis rows orthonormal again after a fine-tuning step moved them.

        Cholesky QR: with G = B B^T = L L^T, the rows of L^-1 B are orthonormal and row k mixes only
        rows 0..k (Gram-Schmidt order, each row keeping its direction's sign, so coefficients keep
        their meaning). Two products of K x (n C), far cheaper than a Householder QR of the tall
        matrix, and exact enough for a basis a small step away from orthonormal.
        """
        for blocks in self.blocks.values():
            for b in blocks:
                if b.n_components == 0:
                    continue
                L = torch.linalg.cholesky(b.basis @ b.basis.T)
                b.basis.copy_(torch.linalg.solve_triangular(L, b.basis, upper=False))
        self._scaled.clear()

    # ---- housekeeping ----

    def to(self, device=None, dtype: torch.dtype | None = None) -> "GaussianEigenModel":
        """A copy on another device; dtype (floating tensors only) also converts stored fp16 bases."""
        def move(x):
            if x is None:
                return None
            return x.to(device=device, dtype=dtype if (dtype is not None and x.is_floating_point()) else None)
        blocks = {a: [Block(b.part, move(b.index), move(b.mean), move(b.basis), move(b.eigenvalues))
                      for b in bl] for a, bl in self.blocks.items()}
        return GaussianEigenModel(blocks, move(self.colors), {a: move(c) for a, c in self.coefficients.items()},
                                  self.timesteps.to(device), {k: move(v) for k, v in self.extras.items()})

    def truncated(self, n_components: dict[str, int]) -> "GaussianEigenModel":
        """The model with only the first n components of every block (attribute -> n)."""
        blocks, coefficients = {}, {}
        for attr, bl in self.blocks.items():
            n = n_components.get(attr, max(b.n_components for b in bl))
            # clone: a slice would keep (and save) the whole basis' storage
            blocks[attr] = [Block(b.part, b.index, b.mean, b.basis[:n].clone(), b.eigenvalues[:n].clone()) for b in bl]
            keep = torch.cat([torch.arange(b.n_components)[:n] + sum(p.n_components for p in bl[:i])
                              for i, b in enumerate(bl)])
            coefficients[attr] = self.coefficients[attr][:, keep.to(self.coefficients[attr].device)]
        return GaussianEigenModel(blocks, self.colors, coefficients, self.timesteps, self.extras)

    # ---- file ----

    def state(self, half: bool = False) -> dict:
        """The file's content: tensors, strings and numbers only (bases in fp16 when half)."""
        def block_state(b: Block) -> dict:
            basis = b.basis.detach()
            state = {"part": b.part, "mean": b.mean.detach().float().cpu(), "eigenvalues": b.eigenvalues.float().cpu(),
                     "basis": (basis.half() if half else basis.float()).cpu()}
            if b.index is not None:
                state["index"] = b.index.long().cpu()
            return state
        return {
            "format": FORMAT,
            "n_gaussians": self.n_gaussians,
            "colors": self.colors.float().cpu(),
            "blocks": {a: [block_state(b) for b in bl] for a, bl in self.blocks.items()},
            "coefficients": {a: c.float().cpu() for a, c in self.coefficients.items()},
            "timesteps": self.timesteps.long().cpu(),
            "extras": {k: v.cpu() for k, v in self.extras.items()},
        }

    def nbytes(self, half: bool = False) -> int:
        """Size in bytes of the file ``save`` writes (give or take the file's name, stored inside)."""
        buffer = io.BytesIO()
        torch.save(self.state(half), buffer)
        return buffer.tell()

    def save(self, path: str | Path, half: bool = False) -> Path:
        """Write the model atomically (temp file + rename)."""
        path = Path(path)
        save_torch(path, self.state(half))
        return path

    @classmethod
    def load(cls, path: str | Path, device=None, dtype: torch.dtype = torch.float32) -> "GaussianEigenModel":
        """Read a GEM file; bases stored in fp16 come back as ``dtype``."""
        path = Path(path)
        hint = "rerun `python pca_gauss.py CONFIG` to rebuild it"
        if not path.is_file():
            raise GemError(f"GEM file not found: {path}; build it with `python pca_gauss.py CONFIG` (stage 3)")
        state = load_torch(path, GemError, hint)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise GemError(f"{path} is not a GEM file of this project (format "
                           f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}, "
                           f"expected {FORMAT!r}); {hint}")
        try:
            model = cls.from_state(state)
        except (KeyError, TypeError, AttributeError, RuntimeError, IndexError) as e:
            raise GemError(f"GEM file {path} is incomplete ({type(e).__name__}: {e}); {hint}") from None
        for name, tensor in _tensors(state):
            check_finite(tensor, name, f"GEM file {path}", GemError)
        return model.to(device, dtype)

    @classmethod
    def from_state(cls, state: dict) -> "GaussianEigenModel":
        """The model of a ``state`` dict (what ``save`` writes; a mapping checkpoint holds one too)."""
        N = int(state["n_gaussians"])
        blocks = {}
        for attr, C in ATTRIBUTES.items():
            blocks[attr] = []
            for b in state["blocks"][attr]:
                n = N if "index" not in b else b["index"].shape[0]
                if "index" in b and n and (int(b["index"].min()) < 0 or int(b["index"].max()) >= N):
                    raise RuntimeError(f"block '{b['part']}' of {attr} indexes Gaussians outside [0, {N})")
                if b["mean"].shape != (n * C,) or b["basis"].shape != (b["eigenvalues"].shape[0], n * C):
                    raise RuntimeError(f"block '{b['part']}' of {attr} has mismatched shapes")
                blocks[attr].append(Block(b["part"], b.get("index"), b["mean"], b["basis"], b["eigenvalues"]))
        model = cls(blocks, state["colors"], state["coefficients"], state["timesteps"], state["extras"])
        for attr in ATTRIBUTES:
            if model.coefficients[attr].shape[1] != model.n_components(attr):
                raise RuntimeError(f"coefficients of {attr} do not match its components")
        return model


def _tensors(value, name: str = "") -> list[tuple[str, Tensor]]:
    """Every tensor in a nested dict / list state, with its path ('blocks.positions.0.basis')."""
    if isinstance(value, Tensor):
        return [(name, value)]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return []
    return [found for key, v in items for found in _tensors(v, f"{name}.{key}" if name else str(key))]


def pose_viewmats(viewmats: Tensor, R: Tensor, t: Tensor) -> Tensor:
    """World-to-camera matrices [C, 4, 4] composed with the GEM pose x -> R x + t (R [3, 3], t [3]):
    a camera looking at the posed head sees exactly what the composed camera sees in GEM space."""
    pose = torch.eye(4, dtype=viewmats.dtype, device=viewmats.device)
    pose[:3, :3] = R
    pose[:3, 3] = t
    return viewmats @ pose


def render_gem(model: GaussianEigenModel, coefficients: dict[str, Tensor], R: Tensor, t: Tensor, viewmats: Tensor,
               Ks: Tensor, width: int, height: int, background: Tensor | None = None) -> RenderOutput:
    """One frame: coefficients (attribute -> [1, K]) and its GEM pose (R [1, 3, 3], t [1, 3]) -> images of
    cameras viewmats [C, 4, 4], Ks [C, 3, 3] (lib.gaussians.render.render).

    The same image as rendering ``model.evaluate(coefficients, R, t)``, but the pose is folded into the
    cameras instead of being applied to every Gaussian: the rasterizer sees identical camera-space
    Gaussians, and GEM costs one small matrix product per attribute on top of the rasterizer.
    """
    g = model.reconstruct(coefficients)
    return render(g.means[0], g.quats[0], g.scales[0], g.opacities[0], g.colors[0],
                  pose_viewmats(viewmats, R[0].to(viewmats), t[0].to(viewmats)), Ks, width, height, background)


def reconstruction_errors(model: GaussianEigenModel,
                          frames: GaussianSet | Iterable[GaussianSet]) -> dict[str, dict[str, float]]:
    """Error of projecting frames on the model and rebuilding them, per attribute:
    rms = RMS over Gaussians and frames of the per-Gaussian error norm; relative = rms / the RMS
    deviation of the frames from their own mean (the share of the motion left unexplained).

    frames: a GaussianSet [T, N, ...], or batches of timesteps (GaussianSets [B, N, ...], e.g. a
    FrameStore's ``batches()``) that are never all in memory. Rotations are compared as rotations (the
    sign of a quaternion is free): unit quaternions, the error min(|q - q'|, |q + q'|).
    """
    errors = ReconstructionErrors(model)
    for batch in ([frames] if isinstance(frames, GaussianSet) else frames):
        errors.add(batch)
    return errors.result()


class ReconstructionErrors:
    """``reconstruction_errors`` as running float64 sums over batches of frames (``add``), for frames
    that arrive one timestep at a time.

    Per attribute: the squared error, and the deviations d = a - a_0 from the first frame (per
    Gaussian), S1 = sum d [N, C] and S2 = sum |d|^2, since sum |a - mean|^2 = S2 - |S1|^2 / T. Taken
    from a frame of the data rather than from 0, the difference does not cancel away the digits of a
    small motion on a large mean (positions), and is exactly 0 for an attribute that does not move.
    """

    def __init__(self, model: GaussianEigenModel):
        self.model = model
        self.frames = 0
        self._first: dict[str, Tensor] = {}  # attribute -> [N, C] first frame (rotations: unit, aligned)
        self._squared_error = dict.fromkeys(ATTRIBUTES, 0.0)
        self._s1: dict[str, Tensor] = {}
        self._s2 = dict.fromkeys(ATTRIBUTES, 0.0)

    @torch.no_grad()
    def add(self, frames: GaussianSet) -> None:
        """Add a batch of frames (GaussianSet [B, N, ...], GEM space, any device)."""
        frames = GaussianSet(*(x.detach().to(self.model.colors.device) for x in frames))
        rebuilt = self.model.reconstruct(self.model.project(frames))
        for attr in ATTRIBUTES:
            a, b = frames.attribute(attr).float(), rebuilt.attribute(attr).float()
            if attr == "rotations":
                a = normalize_quat(a)
                a = align_quats(a, self._first[attr] if attr in self._first else a[0])
                b = align_quats(b, a)
            if attr not in self._first:
                self._first[attr] = a[0].clone()
                self._s1[attr] = torch.zeros(a.shape[1:], dtype=torch.float64, device=a.device)
            self._squared_error[attr] += float((a - b).double().pow(2).sum())
            d = (a - self._first[attr]).double()
            self._s1[attr] += d.sum(0)
            self._s2[attr] += float(d.pow(2).sum())
        self.frames += frames.means.shape[0]

    def result(self) -> dict[str, dict[str, float]]:
        """attribute -> {"rms", "relative"} over the frames added so far."""
        if self.frames == 0:
            raise GemError("no frames to measure the reconstruction error on")
        count = self.frames * self.model.n_gaussians
        errors = {}
        for attr in ATTRIBUTES:
            rms = math.sqrt(self._squared_error[attr] / count)
            deviation = self._s2[attr] - float(self._s1[attr].pow(2).sum()) / self.frames
            spread = math.sqrt(max(deviation, 0.0) / count)
            errors[attr] = {"rms": rms, "relative": rms / spread if spread > 0 else 0.0}
        return errors
