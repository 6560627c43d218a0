"""Atomic writes: a file is either its old self or completely written, never half.

Every artifact of the pipeline (configs, checkpoints, bases, masks, reports) is written through
``atomic_path``: the content goes to a temp file in the same folder, which is renamed onto the
target only when writing succeeded (a rename within one folder is atomic).
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temp path beside ``path``: renamed onto it when the block succeeds, removed when it fails.

    ``suffix`` matters to writers that append an extension themselves (``np.savez`` needs ``.npz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2))
