"""The command line shared by the top-level scripts: ``script.py CONFIG [section.key=value ...]``.

``run`` is every script's one error path: a ``ProjectError`` (a bad config, dataset, FLAME file,
checkpoint, GEM file, bundle, a held lock, a full disk) ends the script with ``error: <message>`` on
one line and exit code 1; ``--debug`` (or ``GEM_DEBUG=1``) shows its traceback too. Any other
exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import os
import signal
import sys
import traceback
from typing import Callable

from lib.config import Config, load_config
from lib.errors import ProjectError, disk_full_error

# run.sh exports its pid here; its children end when it ends, even by SIGKILL (no orphan trains on).
PARENT_ENV = "GEM_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def parse(description: str, extra: Callable | None = None, source: bool = False,
          argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse ``CONFIG`` and ``section.key=value`` overrides (before or after any option) and load the
    config; a bad config raises ConfigError.

    source: a second config may follow the first (``CONFIG SOURCE_CONFIG [overrides]``, the overrides
    apply to CONFIG); it is loaded into ``args.source`` (None when absent).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config", help="YAML config, e.g. configs/synthetic_a.yml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.ds_rate=2")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also GEM_DEBUG=1)")
    if extra is not None:
        extra(parser)
    args = parser.parse_intermixed_args(argv)
    overrides, args.source = list(args.overrides), None
    if source and overrides and "=" not in overrides[0]:
        args.source = load_config(overrides.pop(0))
    return load_config(args.config, overrides), args


def run(body: Callable[[], object], debug: bool | None = None) -> None:
    """Call ``body`` and exit with its code (an int; anything else it returns means 0); a ProjectError
    or a full disk becomes one line and exit code 1."""
    die_with_parent()
    debug = debug if debug is not None else ("--debug" in sys.argv[1:] or os.environ.get("GEM_DEBUG") == "1")
    try:
        code = body()
    except ProjectError as e:
        _fail(e, debug)
    except OSError as e:
        full = disk_full_error(e.filename or "a file", e) if e.errno in (errno.ENOSPC, errno.EDQUOT) else None
        if full is None:
            raise
        _fail(full, debug, e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)


def main(description: str, body: Callable[[Config, argparse.Namespace], object],
         extra: Callable | None = None, source: bool = False) -> None:
    """A script's whole ``__main__``: parse the command line, then ``body(cfg, args)`` under ``run``."""
    run(lambda: body(*parse(description, extra, source)))


def _fail(error: BaseException, debug: bool, raised: BaseException | None = None) -> None:
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()  # now, not at exit after our message: the error stays the last line
    if debug:
        traceback.print_exception(raised or error)
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


def progress_bar(total: int, initial: int = 0, enabled: bool = True, **kwargs):
    """A tqdm bar, redrawn at most every 30 s when stderr is a file or a pipe (run.sh's logs), not ten
    times a second."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0, **kwargs)


def die_with_parent() -> None:
    """Under run.sh (``GEM_PARENT_PID``), ask Linux for SIGTERM when the parent dies, so a killed
    run.sh leaves no orphan stage running."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    if str(os.getppid()) != parent:
        if not _alive(int(parent)):  # run.sh was killed while this process started up
            os.kill(os.getpid(), signal.SIGTERM)
        return  # else not run.sh's own child (e.g. a torchrun worker: torchrun ends those)
    end_with_parent(int(parent), signal.SIGTERM)


def end_with_parent(parent: int, sig: int) -> None:
    """Linux sends this process ``sig`` when its parent (pid ``parent``) dies; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def not_implemented(stage: str) -> None:
    """Exit code 2 marks a stage that this version does not have yet (run.sh stops there)."""
    print(f"{stage}: not implemented yet in this version", file=sys.stderr)
    sys.exit(2)
