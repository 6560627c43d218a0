"""The one error path of the scripts (lib.cli) and what every writer guarantees: overrides before or
after options, one line per project error, tracebacks only for bugs or with --debug, metrics files
without NaN or Infinity, checkpoint errors that never advise unsafe loading."""
import json
import math

import pytest
import torch

from lib.atomic import write_json
from lib.cli import parse
from lib.config import ConfigError
from lib.dataset.vhap import DatasetError
from lib.train.checkpoint import CheckpointError, load_checkpoint


def _serve_option(parser):
    parser.add_argument("--serve", action="store_true")


@pytest.mark.parametrize("argv", [["CFG", "--serve", "viewer.port=18085", "viewer.sliders=3"],
                                  ["CFG", "viewer.port=18085", "--serve", "viewer.sliders=3"],
                                  ["--serve", "CFG", "viewer.port=18085", "viewer.sliders=3"]])
def test_overrides_work_before_or_after_an_option(argv):
    from lib.paths import REPO_ROOT

    argv = [str(REPO_ROOT / "configs" / "default.yml") if a == "CFG" else a for a in argv]
    cfg, args = parse("viewer", _serve_option, argv=argv)
    assert args.serve and cfg.viewer.port == 18085 and cfg.viewer.sliders == 3


def test_a_project_error_is_one_line_and_exit_1(capsys):
    from lib.cli import run

    def body():
        raise DatasetError("transforms_val.json, frame 3: fl_x = 0; re-export")

    with pytest.raises(SystemExit) as exit_:
        run(body, debug=False)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err == "error: transforms_val.json, frame 3: fl_x = 0; re-export\n"
    with pytest.raises(SystemExit):
        run(body, debug=True)
    assert "Traceback" in capsys.readouterr().err


def test_a_config_error_goes_the_same_way_and_a_bug_keeps_its_traceback(capsys):
    from lib.cli import run

    with pytest.raises(SystemExit) as exit_:
        run(lambda: parse("x", argv=["/nonexistent/config.yml"]), debug=False)
    assert exit_.value.code == 1 and "config file not found" in capsys.readouterr().err
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ZeroDivisionError):
        run(lambda: 1 / 0, debug=False)


def test_metrics_are_never_written_as_nan_or_infinity(tmp_path):
    write_json(tmp_path / "m.json", {"psnr": math.inf, "ssim": math.nan, "rows": [{"l1": -math.inf}, 0.5]})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"psnr": None, "ssim": None, "rows": [{"l1": None}, 0.5]}


class _NotATensor:
    pass


def test_a_checkpoint_holding_objects_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "step_00000001.pt"
    torch.save({"model": {}, "step": 1, "payload": _NotATensor()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "holds Python objects" in message
    assert "weights_only" not in message and "False" not in message


@pytest.mark.parametrize("state, message", [
    ({"model": {}, "step": "ten"}, "malformed training state"),
    ({"model": [], "step": 3}, "malformed training state"),
    ({"model": {"w": torch.tensor([1.0, float("nan")])}, "step": 3}, "'w' holds 1 non-finite"),
])
def test_a_malformed_checkpoint_is_refused_naming_it(tmp_path, state, message):
    path = tmp_path / "step_00000003.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_a_checkpoint_without_optimizer_state_is_refused_by_load_into(tmp_path):
    from lib.train.checkpoint import load_into

    opt = torch.optim.Adam([torch.zeros(2, requires_grad=True)])
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_into(opt, None, tmp_path / "step_00000003.pt", "optimizer")
