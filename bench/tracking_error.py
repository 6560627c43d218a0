"""How far a run's FLAME tracking is from a synthetic actor's truth: as tracked, as training refined it
(train.refine_flame) and as test.py refitted it (test.refit_tracking).

    .venv/bin/python bench/tracking_error.py CONFIG [key=value ...]

The truth is the generator's own plan, made again from the actor's ``synthetic`` keys (so only a
synthetic actor has one). For each set of timesteps it prints the mean distance, in mm, between the
posed head vertices and the true ones:
- as tracked (the parameters the export holds, with the tracking noise);
- corrected (training's corrections from the regressor's newest checkpoint, or the refit test.py kept
  for that checkpoint and the config's settings, ``lib.train.fit_tracking.kept_refit``, on top of
  training's corrections where it has any, as test.py poses them), and the same less the corrections'
  mean over the timesteps (a common offset is a gauge the avatar can take up, see
  lib/models/flame_refinement.py);
- the least error any rigid correction of the tracked head could reach (each timestep's tracked mesh
  aligned to the truth by rotation and translation): the floor of a head-pose refinement.
First, over all timesteps, what each key's jitter alone costs (the truth with that one key as written) and
the floor a rigid correction leaves of it: which keys a refinement (``train.refine_keys``) must correct.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lib  # noqa: E402,F401  (before torch: how its OpenMP threads wait, lib/__init__.py)

import torch

from lib.config import REFINABLE, load_config  # noqa: E402
from lib.dataset.synthetic_actor import ActorSpec, HeadFiles, plan_actor  # noqa: E402
from lib.dataset.vhap import VhapExport  # noqa: E402
from lib.eval.evaluate import scored_frames  # noqa: E402
from lib.models.flame_refinement import FlameRefinement, load_refinement, refinement_from_state  # noqa: E402
from lib.paths import ActorPaths  # noqa: E402
from lib.train.checkpoint import latest_checkpoint  # noqa: E402
from lib.train.fit_tracking import kept_refit  # noqa: E402


def rigidly_aligned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each mesh of a [B, V, 3] moved by the rotation and translation that bring it closest to b's (Kabsch)."""
    ca, cb = a.mean(1, keepdim=True), b.mean(1, keepdim=True)
    U, _, Vh = torch.linalg.svd((a - ca).transpose(1, 2) @ (b - cb))
    sign = torch.sign(torch.det(Vh.transpose(1, 2) @ U.transpose(1, 2)))
    D = torch.diag_embed(torch.stack([torch.ones_like(sign), torch.ones_like(sign), sign], -1))
    R = Vh.transpose(1, 2) @ D @ U.transpose(1, 2)
    return (a - ca) @ R.transpose(1, 2) + cb


def centred(refinement: FlameRefinement) -> FlameRefinement:
    """A copy of the corrections with each key's mean over the timesteps removed."""
    copy = refinement_from_state(refinement.state_dict())
    copy.centre_()
    return copy


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    cfg = load_config(argv[0], argv[1:])
    if not cfg.synthetic.enabled:
        sys.exit(f"{cfg.actor.name} is not a synthetic actor (synthetic.enabled is false): it has no truth to compare with")
    truth, kept = HeadFiles.from_config(cfg).ground_truth()
    model, _, _, masks = truth.load()
    plan = plan_actor(ActorSpec.from_config(cfg), model, masks)
    rows = slice(None) if kept is None else torch.as_tensor(kept)  # the tracked model's vertices

    def at(params: dict, timesteps: list[int]) -> dict:  # the plan's shape and static offset are shared
        index = torch.as_tensor(timesteps)
        return {k: v if k in ("shape", "static_offset") else v[index] for k, v in params.items()}

    @torch.no_grad()
    def mesh(params: dict) -> torch.Tensor:
        return model(**params)[0][:, rows]

    def error_mm(verts: torch.Tensor, true: torch.Tensor) -> str:
        return f"{(verts - true).norm(dim=-1).mean().item() * 1000:.3f}"

    true_all = mesh(plan.params)
    for key in REFINABLE:
        alone = mesh({**plan.params, key: plan.written[key]})
        print(f"{key}'s jitter alone: head vertex error in mm {error_mm(alone, true_all)}, "
              f"best rigid correction {error_mm(rigidly_aligned(alone, true_all), true_all)}")

    paths, export = ActorPaths(cfg), VhapExport.from_config(cfg)
    training = load_refinement(paths)
    checkpoint = latest_checkpoint(paths.regressor_checkpoints)
    sets = [("train, training's corrections", training,
             "none (no regressor checkpoint, or trained without train.refine_flame)")]
    for split in ("val", "test") if checkpoint is not None else ():
        refit = kept_refit(cfg, export, split, scored_frames(cfg, export, split), checkpoint)
        sets.append((f"{split}, refitted", refit, "none kept for this checkpoint and these settings (test.py keeps one)"))
    for name, refinement, missing in sets:
        if refinement is None:
            print(f"{name}: {missing}")
            continue
        timesteps = refinement.timesteps.tolist()
        written = at(plan.written, timesteps)
        true, tracked = mesh(at(plan.params, timesteps)), mesh(written)
        start = written if refinement is training or training is None else training.corrected(written, timesteps)
        fixed = {c: mesh(r.corrected(start, timesteps))
                 for c, r in (("corrected", refinement), ("less its mean", centred(refinement)))}
        print(f"{name} ({len(timesteps)} timesteps): head vertex error in mm: as tracked {error_mm(tracked, true)}, "
              f"corrected {error_mm(fixed['corrected'], true)} (less its mean {error_mm(fixed['less its mean'], true)}), "
              f"best rigid correction {error_mm(rigidly_aligned(tracked, true), true)}")


if __name__ == "__main__":
    main(sys.argv[1:])
