"""Stage 4: the mapping network, a driving signal -> GEM coefficients (sigma units).

Driving signals are relative to the actor's identity (neutral) frame, so that a neutral face maps to
a signal of zero whoever the actor is:

    flame     [expr, jaw_pose, eyes_pose](t) - the same at actor.identity_timestep   (E + 3 + 6 values)
    mesh_pca  whitened mesh-PCA coefficients of the head-space mesh (t) - those of the identity frame

    encoder   a user's TorchScript image encoder's features of a face crop (t) - those of the identity
              frame, on a per-actor PCA (``lib.models.image_encoder``)

The network holds one MLP per GEM part (one for all coefficients when the GEM has no parts); a part's
MLP predicts that part's coefficients of every attribute. Each MLP is 5 linear layers, LeakyReLU 0.1,
dropout after the second, and its output is tanh * 2.9, bounding every coefficient to +-2.9 sigma.
The "attention" architecture (GEM's global-aware variant) gates each part's input with a global
context: a small MLP of the whole signal gives every part a gate per signal channel, 2 * sigmoid(.),
whose last layer starts at zero, so the variant starts as the plain per-part network and learns which
channels each part listens to (e.g. the eyes part to gaze, the mouth part to the jaw).
The signal is divided by a fixed per-channel scale (its spread over the training frames, stored as a
buffer so a checkpoint carries it).

Coefficients travel as one flat vector [B, D]: the attributes of ``lib.models.gem.ATTRIBUTES`` in
order, each as ``GaussianEigenModel.coefficients`` lays it out (its parts' blocks in block order).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lib.models.gem import ATTRIBUTES, GaussianEigenModel, GemError

BOUND = 2.9  # sigma: the bound of every predicted coefficient
FLAME_SIGNAL_KEYS = ("expr", "jaw_pose", "eyes_pose")


def flame_signal(params: dict[str, Tensor]) -> Tensor:
    """FLAME expression, jaw and eye parameters of B frames as one vector. -> [B, E + 3 + 6]"""
    return torch.cat([params[k] for k in FLAME_SIGNAL_KEYS], dim=-1)


def relative_to_identity(signal: Tensor, identity: Tensor) -> Tensor:
    """Signal [B, S] minus the identity frame's signal [S] (or [1, S]). -> [B, S]"""
    return signal - identity.reshape(1, -1)


def coefficient_parts(gem: GaussianEigenModel) -> tuple[list[str], Tensor]:
    """The part of every entry of the flat coefficient vector. -> (part names, labels [D] long)"""
    names = gem.parts
    labels = [names.index(part) for attr in ATTRIBUTES for part, _ in gem.component_labels(attr)]
    return names, torch.tensor(labels, dtype=torch.long)


def flatten_coefficients(coefficients: dict[str, Tensor]) -> Tensor:
    """attribute -> [B, K_a]  ->  [B, D] (ATTRIBUTES order)."""
    return torch.cat([coefficients[a] for a in ATTRIBUTES], dim=-1)


def split_coefficients(gem: GaussianEigenModel, flat: Tensor) -> dict[str, Tensor]:
    """[B, D] -> attribute -> [B, K_a], the inverse of ``flatten_coefficients``."""
    sizes = [gem.n_components(a) for a in ATTRIBUTES]
    return dict(zip(ATTRIBUTES, flat.split(sizes, dim=-1)))


def part_mlp(n_in: int, n_out: int, width: int, dropout: float) -> nn.Sequential:
    """5 linear layers, LeakyReLU 0.1 between them, dropout after the second."""
    act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
    return nn.Sequential(
        nn.Linear(n_in, width), act(),
        nn.Linear(width, width), act(), nn.Dropout(dropout),
        nn.Linear(width, width), act(),
        nn.Linear(width, width), act(),
        nn.Linear(width, n_out),
    )


class MappingNetwork(nn.Module):
    """Relative driving signal [B, S] -> flat GEM coefficients [B, D] in (-2.9, 2.9) sigma.

    labels: [D] long, the part (0 .. P-1) of every output entry (``coefficient_parts``);
    signal_scale: [S] positive divisor of the signal's channels.
    """

    def __init__(self, n_signal: int, labels: Tensor, width: int = 256, dropout: float = 0.2,
                 signal_scale: Tensor | None = None, attention: bool = False):
        super().__init__()
        labels = torch.as_tensor(labels, dtype=torch.long)
        n_parts = int(labels.max()) + 1
        order = torch.cat([(labels == p).nonzero().squeeze(1) for p in range(n_parts)])
        # the parts' outputs are concatenated part after part; this permutation puts each entry back
        self.register_buffer("inverse_order", torch.argsort(order))
        self.register_buffer("signal_scale", torch.ones(n_signal) if signal_scale is None else signal_scale.float())
        self.mlps = nn.ModuleList(part_mlp(n_signal, int((labels == p).sum()), width, dropout)
                                  for p in range(n_parts))
        self.context = None
        if attention:
            self.context = nn.Sequential(nn.Linear(n_signal, width), nn.LeakyReLU(0.1),
                                         nn.Linear(width, n_parts * n_signal))
            nn.init.zeros_(self.context[-1].weight)
            nn.init.zeros_(self.context[-1].bias)

    def gates(self, x: Tensor) -> Tensor:
        """Per-part gates of the scaled signal x [B, S] (all ones without attention). -> [B, P, S]"""
        if self.context is None:
            return x.new_ones(x.shape[0], len(self.mlps), x.shape[1])
        return 2.0 * torch.sigmoid(self.context(x)).view(x.shape[0], len(self.mlps), x.shape[1])

    def forward(self, signal: Tensor) -> Tensor:
        x = signal / self.signal_scale
        if self.context is None:
            out = [mlp(x) for mlp in self.mlps]
        else:
            gates = self.gates(x)
            out = [mlp(x * gates[:, p]) for p, mlp in enumerate(self.mlps)]
        return BOUND * torch.tanh(torch.cat(out, dim=-1)[:, self.inverse_order])


def hold_at_mean(flat: Tensor, gem: GaussianEigenModel, parts: list[str]) -> Tensor:
    """Flat coefficients [B, D] with those of the named GEM parts set to 0 (the part's mean shape).

    The method holds the hair at its mean at test time: the driving signal says nothing about it.
    A name that is not a part of a GEM built with parts is an error; a GEM without parts has none
    to hold (the caller says so). -> [B, D]
    """
    names, labels = coefficient_parts(gem)
    if names == ["all"]:
        return flat
    unknown = [p for p in parts if p not in names]
    if unknown:
        raise GemError(f"mapping.hold_at_mean names {unknown}, not parts of this GEM (it has {names})")
    held = torch.isin(labels, torch.tensor([names.index(p) for p in parts], dtype=torch.long)).to(flat.device)
    return flat.masked_fill(held, 0.0)


def variance_weights(gem: GaussianEigenModel) -> Tensor:
    """Weight of every flat coefficient: sqrt of its share of its attribute's variance, mean 1. -> [D]

    A sigma-unit error on a leading component moves the Gaussians far more than one on the hundredth;
    these weights make the L1 follow that (its RMS effect within the attribute).
    """
    shares = []
    for attr in ATTRIBUTES:
        ev = torch.cat([b.eigenvalues.float() for b in gem.blocks[attr]])
        shares.append((ev / ev.sum().clamp_min(1e-30)).sqrt())
    w = torch.cat(shares)
    return w / w.mean()


def coefficient_loss(pred: Tensor, target: Tensor, magnitude: float = 0.001, weights: Tensor | None = None) -> Tensor:
    """Regression on ground-truth coefficients [B, D]: L1(pred, target) (each entry times weights [D] when
    given) + magnitude * mean(pred^2). -> []"""
    err = (pred - target).abs()
    return (err if weights is None else err * weights).mean() + magnitude * pred.pow(2).mean()
