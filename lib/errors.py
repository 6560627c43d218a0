"""The project's errors: problems a user can act on, reported as one line by every script.

Every module raises its own subclass (``DatasetError``, ``ConfigError``, ``CheckpointError`` ...), each
also a ``ProjectError``; its message names the file and what to do. ``lib.cli.run`` turns any of
them into ``error: <message>`` and exit code 1, without a traceback (``--debug`` or ``GEM_DEBUG=1``
shows it). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class ProjectError(Exception):
    """An input, file or state the user can fix; the message says which and how."""


class DiskFullError(ProjectError, OSError):
    """A write failed because the file system holding it is full (or over quota)."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message alone, without OSError's "[Errno 28]"


# Below this many free bytes a failed write is taken as a full disk, whatever the writer's own
# message says (torch's serializer and numpy report it as a generic error, without ENOSPC).
_NEARLY_FULL = 1 << 20


def disk_full_error(path: str | Path, error: BaseException) -> DiskFullError | None:
    """A DiskFullError for a failed write of ``path`` when the disk is full, else None."""
    path = Path(path)
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, DiskFullError):
            return cause
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            break
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        try:
            if shutil.disk_usage(path.parent).free >= _NEARLY_FULL:
                return None
        except OSError:
            return None
    return DiskFullError(errno.ENOSPC, f"no space left on device while writing {path}; free space on that "
                         "file system (or point actor.experiments_dir elsewhere) and run again: "
                         "finished files were kept, the partial one was removed")


@contextmanager
def naming_full_disk(path: str | Path) -> Iterator[None]:
    """Within the block, a write of ``path`` that fails on a full disk raises DiskFullError naming it
    (from the original error) instead of the writer's own, often opaque, message."""
    try:
        yield
    except Exception as e:
        full = disk_full_error(path, e)
        if full is None or full is e:
            raise
        raise full from e


def check_finite(array, what: str, where: str, error: type[ProjectError]) -> None:
    """Raise ``error`` when a numpy array or tensor holds NaN or infinity; names the first bad entry."""
    import numpy as np

    values = np.asarray(array.detach().cpu() if hasattr(array, "detach") else array)
    if values.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(values)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise error(f"{where}: '{what}' holds {int(bad.sum())} non-finite value(s) (e.g. {values[index]} at "
                    f"index {index}); fix or re-export that file")
