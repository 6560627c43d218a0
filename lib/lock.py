"""Advisory locks on the folders a process writes: one writer per run folder or generated dataset.

``locked(folder, what)`` holds ``folder/.lock`` (``fcntl.flock``, released by the kernel when the
process ends, even by SIGKILL, so a lock is never stale; the file is removed when the block ends, and a
file left by a killed holder is simply locked again). A second process that wants the same folder
gets ``LockHeld`` naming the holder (pid, command, start time) instead of writing beside it. While the
lock is held, the partial files that killed writers left behind (``lib.atomic`` temp files) are
removed from the folder and its subfolders, except subfolders with a lock of their own (another
writer's domain, e.g. ``regressor/eval/`` of test.py inside ``regressor/`` of train.py).
"""
from __future__ import annotations

import fcntl
import functools
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from lib.atomic import is_partial
from lib.errors import ProjectError, naming_full_disk

LOCK_NAME = ".lock"


class LockHeld(ProjectError):
    """Another process holds the lock of a folder this process must write."""


@contextmanager
def locked(folder: str | Path, what: str, lock_file: str | Path | None = None, clean: bool = True) -> Iterator[Path]:
    """Hold the lock of ``folder`` (``lock_file``, default ``folder/.lock``) for the block. -> folder

    what: the folder's role in the message a second process gets, e.g. "the regressor run folder".
    clean: remove the partial files of killed writers from the folder once the lock is held.
    """
    folder = Path(folder)
    lock_file = Path(lock_file) if lock_file is not None else folder / LOCK_NAME
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock_file, what, folder)
    try:
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
        with naming_full_disk(lock_file):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} ({command}), started "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        if clean and folder.is_dir():
            remove_partials(folder)
        yield folder
    finally:
        lock_file.unlink(missing_ok=True)  # while still held: a waiter that opened it sees it vanish
        os.close(fd)


def _acquire(lock_file: Path, what: str, folder: Path) -> int:
    """Open and flock ``lock_file``; -> its descriptor. Retries when the holder removed the file between
    our open and our flock (we would hold a lock on a file nobody else can see)."""
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockHeld(f"{what} {folder} is in use by {holder}; wait for it to finish or stop it, then run "
                           f"again (lock file {lock_file})") from None
        try:
            if os.stat(lock_file).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def remove_partials(folder: Path) -> list[Path]:
    """Delete the partial writes of killed processes under ``folder`` (call with its lock held).
    Subfolders holding a lock file of their own are left to their writer. -> what was removed"""
    removed = []
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            if not (entry / LOCK_NAME).exists():
                removed += remove_partials(entry)
        elif is_partial(entry):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def locks_run_folder(folder_of: Callable[..., Path], what: str) -> Callable:
    """Decorator: ``fn(cfg, ...)`` runs holding the lock of ``folder_of(cfg)``. Under torchrun only rank 0
    takes it (the ranks of one run write the same folder together)."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(cfg, *args, **kwargs):
            if os.environ.get("RANK", "0") != "0":
                return fn(cfg, *args, **kwargs)
            with locked(folder_of(cfg), what):
                return fn(cfg, *args, **kwargs)
        return inner
    return wrap
