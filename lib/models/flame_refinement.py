"""Per-timestep refinement of the tracked FLAME parameters, learnt with the avatar (``train.refine_flame``).

A tracker's FLAME fit jitters from frame to frame; the Gaussians ride that mesh, so the jitter reaches
them. As GaussianAvatars does, the regressor's training can correct the tracked parameters of each
training timestep while it learns the avatar: the head's rotation and translation, the neck, the jaw, the
eyes and the expression (GaussianAvatars' set). Each correction is a learnt value p times a fixed unit
(``UNITS``: 0.01 rad, 1 mm, 0.1 of an expression coefficient), so one Adam rate (``train.lr_flame``)
moves them all at comparable speeds and one weight (``loss.flame_refine``) pulls them back towards the
tracker: the loss of a step adds loss.flame_refine · mean(p_t²) over the step's own timestep t.

Which parameters: ``train.refine_keys``. The global pose alone (rotation, translation: ``RIGID``) leaves the
head-space mesh as tracked, so training keeps the posed meshes and turns them (``ActorData.driving``)
instead of evaluating FLAME every step; corrections of the others re-pose FLAME per step.

Which timesteps: those of the train split, and only them. The val split shows the same timesteps from
the held-out camera, so its renders use the refined parameters (as a novel view of a refined sequence);
the test split is a held-out sequence whose images the training never saw, so its parameters are not
refined here (``lib.train.fit_tracking`` refits them to their unscored cameras when they are scored). The corrections are saved in the regressor's checkpoints (``flame_refinement``); stage 3 (GEM),
stage 4 (the mapping network's GEM poses) and the evaluations read them back (``load_refinement``) and
pose those timesteps refined.

Which point a rotation correction turns the head about (``pivot``). FLAME's global rotation turns the head
about its root joint at the base of the neck, a lever of ten centimetres or more to the face: a correction of
the rotation alone swings the face sideways too, so the rotation and translation corrections pull against
each other and a first-order optimiser zigzags between them. With a pivot (the head-space offset from the
root joint to the head's centre, ``ActorData.rotation_pivot``) the translation follows every rotation
correction so that the pivot stays where it was: R' (c - j0) + j0 + t' = R (c - j0) + j0 + t + tau. The
corrections then mean "turn about the head's centre, then move by tau", the two act nearly independently,
and the same fit needs about half the steps (README, "Tracking jitter"). The pivot is stored with the
corrections; one saved without it (zero) turns about the root joint, as FLAME does.

The mean correction over the timesteps is a gauge: shifting every timestep's head one way and the
avatar's Gaussians the other renders the same training images. Left free, the corrections drift into a
common offset (a regressor trained on exact tracking moved its heads 0.5 mm on average, nearly all of it
common), which the held-out sequences, posed as their tracker put them, do not share. With
``train.refine_centred`` each training step ends by removing each key's mean (``centre_``), so the
tracker's average pose stays the reference and only the frame-to-frame part is corrected.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lib.config import REFINABLE
from lib.dataset.vhap import FLAME_PARAM_SHAPES
from lib.geometry.rotations import axis_angle_to_matrix

UNITS = {"rotation": 0.01, "translation": 0.001, "neck_pose": 0.01, "jaw_pose": 0.01, "eyes_pose": 0.01,
         "expr": 0.1}  # rad, m, rad, rad, rad, coefficient
assert tuple(UNITS) == REFINABLE, "lib.config.REFINABLE names the keys of UNITS, in order"
RIGID = ("rotation", "translation")  # the head's global pose: the head-space mesh does not depend on it


class FlameRefinement(nn.Module):
    """Corrections of the tracked parameters of ``timesteps`` (all zero at first). ``keys``: those learnt
    (the others stay zero and frozen); with only ``RIGID`` ones the head-space meshes are the tracked ones,
    so training keeps them posed (``rigid``). ``pivot`` [3]: the head-space offset from FLAME's root joint
    to the point a rotation correction turns the head about (None: the root joint itself)."""

    def __init__(self, timesteps: list[int], n_expr: int, keys=tuple(UNITS), pivot: Tensor | None = None):
        super().__init__()
        unknown = set(keys) - set(UNITS)
        if unknown or not keys:
            raise ValueError(f"FlameRefinement: keys must be some of {tuple(UNITS)}, got {tuple(keys)}")
        self.register_buffer("timesteps", torch.as_tensor(sorted(timesteps), dtype=torch.long))
        self.register_buffer("pivot", torch.zeros(3) if pivot is None else pivot.detach().float().reshape(3).clone())
        T = len(timesteps)
        for key in UNITS:
            width = FLAME_PARAM_SHAPES[key][-1] or n_expr  # the exported width; expr: the model's
            setattr(self, key, nn.Parameter(torch.zeros(T, width)))
        self.keys = tuple(k for k in UNITS if k in keys)
        for key in UNITS:
            getattr(self, key).requires_grad_(key in self.keys)
        self._row = {int(t): i for i, t in enumerate(self.timesteps.tolist())}

    @property
    def rigid(self) -> bool:
        """Only the global pose is learnt: the head-space mesh of a timestep is its tracked one."""
        return set(self.keys) <= set(RIGID)

    def learnt(self) -> list[nn.Parameter]:
        """The parameters of the learnt keys (the optimiser's)."""
        return [getattr(self, key) for key in self.keys]

    def rows(self, timesteps: list[int]) -> tuple[list[int], list[int]]:
        """Which of ``timesteps`` are refined: (their positions in the list, their rows here)."""
        pairs = [(i, self._row[int(t)]) for i, t in enumerate(timesteps) if int(t) in self._row]
        return [i for i, _ in pairs], [r for _, r in pairs]

    def corrected(self, params: dict[str, Tensor | None], timesteps: list[int]) -> dict[str, Tensor | None]:
        """Parameters [B, ...] of ``timesteps`` (one per row) with the corrections of the refined ones added
        (differentiable in the corrections). The expression correction covers the first n_expr columns."""
        at, rows = self.rows(timesteps)
        if not rows:
            return params
        out = dict(params)
        idx = torch.as_tensor(at, device=self.rotation.device)
        for key in self.keys:  # the others are zero
            delta = getattr(self, key)[rows] * UNITS[key]
            value = params[key]
            if key == "expr":
                n = min(delta.shape[1], value.shape[1])
                delta = torch.nn.functional.pad(delta[:, :n], (0, value.shape[1] - n))
            out[key] = value.index_add(0, idx, delta.to(value))
        if "rotation" in self.keys and bool(self.pivot.any()):
            # the translation that keeps the pivot in place: (R - R') (c - j0)
            turn = axis_angle_to_matrix(params["rotation"][idx]) - axis_angle_to_matrix(out["rotation"][idx])
            shift = turn @ self.pivot.to(turn)
            out["translation"] = out["translation"].index_add(0, idx, shift.to(out["translation"]))
        return out

    def penalty(self, timesteps: list[int]) -> Tensor:
        """mean(p²) over the learnt corrections of the refined ones among ``timesteps`` (0 when none is)."""
        _, rows = self.rows(timesteps)
        if not rows:
            return self.rotation.new_zeros(())
        return torch.cat([getattr(self, key)[rows].flatten() for key in self.keys]).pow(2).mean()

    @torch.no_grad()
    def centre_(self) -> None:
        """Subtract each learnt key's mean over the timesteps from its corrections (the gauge, above)."""
        for key in self.keys:
            value = getattr(self, key)
            value -= value.mean(0, keepdim=True)

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        if "pivot" not in state:  # saved before corrections had a pivot: they turn about the root joint
            state = {**state, "pivot": torch.zeros(3)}
        # saved before the neck and the eyes could be refined: theirs are zero
        state = {**{k: torch.zeros_like(getattr(self, k)) for k in UNITS}, **state}
        out = super().load_state_dict(state, strict, assign)
        self._row = {int(t): i for i, t in enumerate(self.timesteps.tolist())}
        return out


def refinement_from_state(state: dict | None) -> FlameRefinement | None:
    """The refinement a regressor checkpoint holds (``flame_refinement``), or None."""
    if not state:
        return None
    refinement = FlameRefinement(state["timesteps"].tolist(), int(state["expr"].shape[1]))
    refinement.load_state_dict(state)
    return refinement.requires_grad_(False)


def load_refinement(paths) -> FlameRefinement | None:
    """The FLAME refinement of a run's regressor (``paths``: its ``ActorPaths``), from its newest checkpoint:
    what GEM and the mapping network's poses were made with. None without a checkpoint, or trained without."""
    from lib.atomic import load_torch
    from lib.errors import check_finite
    from lib.train.checkpoint import CheckpointError, latest_checkpoint

    checkpoint = latest_checkpoint(paths.regressor_checkpoints)
    if checkpoint is None:
        return None
    # mapped, not read: only the corrections are touched, not the regressor's weights and optimiser state
    state = load_torch(checkpoint, CheckpointError, "delete it to fall back to the previous checkpoint, or retrain",
                       mmap=True).get("flame_refinement")
    if state:
        for name, value in state.items():
            check_finite(value, f"flame_refinement.{name}", f"checkpoint {checkpoint}", CheckpointError)
    return refinement_from_state(state)
