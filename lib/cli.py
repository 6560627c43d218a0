"""The command line shared by the top-level scripts: ``script.py CONFIG [section.key=value ...]``."""
from __future__ import annotations

import argparse
import sys

from lib.config import Config, ConfigError, load_config


def parse(description: str, extra: callable = None, source: bool = False) -> tuple[Config, argparse.Namespace]:
    """Parse ``CONFIG`` and ``section.key=value`` overrides; exit with the config error's text.

    source: a second config may follow the first (``CONFIG SOURCE_CONFIG [overrides]``, the overrides
    apply to CONFIG); it is loaded into ``args.source`` (None when absent).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config", help="YAML config, e.g. configs/synthetic_a.yml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.ds_rate=2")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    overrides, args.source = list(args.overrides), None
    try:
        if source and overrides and "=" not in overrides[0]:
            args.source = load_config(overrides.pop(0))
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    return cfg, args


def not_implemented(stage: str) -> None:
    """Exit code 2 marks a stage that this version does not have yet (run.sh stops there)."""
    print(f"{stage}: not implemented yet in this version", file=sys.stderr)
    sys.exit(2)
