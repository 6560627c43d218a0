"""The training loop both trainers share (lib.train.loop), on a one-parameter model: phases, the
schedule, the time budget, checkpoint cadence and TensorBoard tags."""
import pytest
import torch
from types import SimpleNamespace

from lib.train.distributed import DistInfo
from lib.train.loop import NanGuard, Phase, StepOutput, TrainingDiverged, TrainingLoop

QUIET = lambda *a, **k: None  # noqa: E731
CFG = SimpleNamespace(train=SimpleNamespace(grad_clip=0.0, log_every=2, image_every=3, checkpoint_every=4))
INFO = DistInfo(0, 1, 0, torch.device("cpu"))


def make_loop(tmp_path, lr=0.1):
    model = torch.nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.param_groups[0]["base_lr"] = lr
    saved = []
    loop = TrainingLoop(CFG, INFO, opt, NanGuard(model, opt, 5, "hint"), lambda s, e: saved.append(s),
                        tmp_path / "tb", 20, 0, QUIET)
    return model, opt, loop, saved


def test_phases_run_their_steps_with_their_schedules_and_checkpoint_at_cadence_and_end(tmp_path):
    model, opt, loop, saved = make_loop(tmp_path)
    seen, lrs = [], []

    def step_fn(step):
        seen.append(step)
        lrs.append(opt.param_groups[0]["lr"])  # the rate of the previous step (set after step_fn)
        return StepOutput({"l": model.weight.pow(2).sum()}, torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 2, 3))

    step, _ = loop.run(Phase("a", 0, 5), step_fn, 0)
    assert step == 5 and seen == list(range(5)) and saved == [4, 5]  # cadence 4, and the phase's end
    step, _ = loop.run(Phase("b", 5, 10, schedule=lambda p: 1.0 - p), step_fn, step)
    loop.close()
    assert step == 10 and seen == list(range(10)) and saved == [4, 5, 8, 10]
    # the second phase's rate follows its own progress: 1, 0.8, 0.6, 0.4 (seen at the next step)
    assert lrs[6:] == pytest.approx([0.1, 0.08, 0.06, 0.04])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02)
    assert loop.run(Phase("b", 5, 10), step_fn, 10) == (10, 0.0)  # a finished phase does nothing
    assert loop.run(Phase("empty", 10, 10), step_fn, 10) == (10, 0.0)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(tmp_path / "tb")).Reload().Tags()
    assert {"a/l", "a/total", "b/l", "b/total", "train/lr", "train/grad_norm"} <= set(tags["scalars"])
    assert tags["images"] == ["render|gt"]


def test_a_time_budget_ends_the_phase_and_elapsed_resumes(tmp_path):
    model, opt, loop, saved = make_loop(tmp_path)
    # 1e-6 minutes: the first step already spends the budget, from 0 seconds or resumed past it
    step, elapsed = loop.run(Phase("p", 0, 1000, minutes=1e-6), lambda s: StepOutput({"l": model.weight.sum()}), 0)
    assert step == 1 and elapsed > 0 and saved == [1]
    assert loop.run(Phase("p", 0, 1000, minutes=1e-6), lambda s: StepOutput({"l": model.weight.sum()}), 1,
                    elapsed=1.0) == (1, 1.0)


def test_non_finite_losses_restore_and_then_stop(tmp_path):
    model, opt, loop, _ = make_loop(tmp_path)
    w0 = model.weight.detach().clone()
    with pytest.raises(TrainingDiverged, match="hint"):
        loop.run(Phase("p", 0, 100), lambda s: StepOutput({"l": model.weight.sum() * float("nan")}), 0)
    assert torch.equal(model.weight.detach(), w0)


def test_an_optimiser_without_base_rates_is_refused(tmp_path):
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="base_lr"):
        TrainingLoop(CFG, INFO, opt, NanGuard(model, opt, 5, ""), QUIET, tmp_path, 1, 0, QUIET)
