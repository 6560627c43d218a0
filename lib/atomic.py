"""Atomic writes: a file is either its old self or completely written, never half.

Every artifact of the pipeline (configs, checkpoints, bases, masks, reports) is written through
``atomic_path``: the content goes to a temp file ``.<name>.<random>.partial<suffix>`` in the same
folder, which is renamed onto the target only when writing succeeded (a rename within one folder is
atomic). A killed writer leaves its temp file behind; ``lib.lock`` removes such partial files the next
time the folder's writer starts; scratch files that live only while their writer runs (stage 3's
frame store) take the same name (``temp_beside``) for the same reason. A write that fails because the
disk is full raises ``lib.errors.DiskFullError`` naming the file. Torch files are read back by
``load_torch``, which runs no code from the file.
"""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lib.errors import naming_full_disk

PARTIAL = ".partial"  # marks the temp files (and folders) of writes in progress


def is_partial(path: Path) -> bool:
    """Whether ``path`` is the temp file of an atomic write (or a generator's temp folder)."""
    return path.name.startswith(".") and PARTIAL in path.name


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temp path beside ``path``: renamed onto it when the block succeeds, removed when it fails.

    ``suffix`` matters to writers that append an extension themselves (``np.savez`` needs ``.npz``).
    """
    path = Path(path)
    tmp = temp_beside(path, suffix)
    try:
        with naming_full_disk(path):
            yield Path(tmp)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def temp_beside(path: str | Path, suffix: str = "") -> Path:
    """A new empty file ``.<name>.<random>.partial<suffix>`` in the folder of ``path`` (created if
    missing): the temp file of an atomic write, or a scratch file its writer deletes when done; named so,
    ``lib.lock`` removes it when a killed writer left it behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL + suffix)
    os.close(fd)
    return Path(tmp)


def write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: dict) -> None:
    """JSON without NaN or Infinity, which strict readers refuse: a non-finite number is written as
    null (a metric that could not be computed)."""
    write_text(path, json.dumps(_finite(data), indent=2, allow_nan=False))


def save_torch(path: str | Path, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically. Serialised in memory first: torch's C++ writer reports a
    full disk as an opaque ``inline_container.cc`` error, a plain file write as ENOSPC."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())


def load_torch(path: str | Path, error: type[Exception], hint: str, map_location="cpu", mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``: tensors, numbers, strings and containers only, never code. A
    truncated, corrupt or foreign file raises ``error`` naming it, with ``hint`` (what to do). mmap: the
    tensors are mapped, not read, so only those used cost I/O."""
    import pickle
    import zipfile

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        if "weights only load failed" in str(e).lower():
            # torch's own message suggests weights_only=False: never for a file that may come from elsewhere.
            why = "it holds Python objects besides tensors and numbers, which this project never writes"
        else:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"{path} is corrupt or not a file of this project ({why}); {hint}") from None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
