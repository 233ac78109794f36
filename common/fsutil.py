"""Atomic file writes (a reader sees the old file or the new one, never a torn one) and exclusive
locks across processes (a read, a decision and a write made as one step)."""
from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable

PRIVATE = 0o600   # the default: only the owner reads it (ledgers, keys, checkpoints, bundles)
PUBLIC = 0o644    # others may read it (manifests, certificates, configs a container user reads)


def atomic_write(target: str | Path, write: Callable[[BinaryIO], None], mode: int = PRIVATE) -> Path:
    """Call ``write`` on a temp file beside ``target``, fsync it, rename it over ``target``, fsync the folder.

    The file is created ``0600`` and gets ``mode`` before it is renamed into place, so a private
    file is never readable by others, not even for a moment.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(target: str | Path, text: str, mode: int = PRIVATE) -> Path:
    """:func:`atomic_write` of ``text`` as UTF-8."""
    return atomic_write(target, lambda f: f.write(text.encode("utf-8")), mode)


# -- exclusive locks ----------------------------------------------------------------------------
#
# flock(2) locks belong to an open file description, so two opens of one path in one process
# exclude each other: a thread that already holds a lock and asks for it again would wait for
# itself. The registry below makes the lock re-entrant within a process (the same thread passes,
# other threads wait on a threading lock) and leaves only processes to flock.


class _Held:
    """One path's lock in this process: who holds it (the thread lock), how often, and the flocked fd."""

    def __init__(self) -> None:
        self.thread_lock = threading.RLock()
        self.depth = 0
        self.fd: int | None = None


_held: dict[str, _Held] = {}
_held_guard = threading.Lock()


def _forget_inherited_locks() -> None:
    # A forked child shares its parent's lock descriptions but does not hold the locks.
    global _held_guard
    _held.clear()
    _held_guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_inherited_locks)


class LockBusy(OSError):
    """A non-blocking :func:`exclusive_lock` found the lock held by another process or thread."""


def _open_for_lock(path: Path) -> int:
    if path.is_dir():
        return os.open(path, os.O_RDONLY)
    return os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE)


@contextmanager
def exclusive_lock(path: str | Path, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (a folder, or a file created ``0600``) while inside.

    Other processes wait (or, with ``blocking=False``, get :class:`LockBusy`); inside one process
    the lock is re-entrant for the thread that holds it and excludes the others. The lock goes
    with the process: a killed holder never leaves a stale lock behind.
    """
    key = os.path.realpath(path)
    with _held_guard:
        held = _held.setdefault(key, _Held())
    if not held.thread_lock.acquire(blocking=blocking):
        raise LockBusy(f"{path} is locked by another thread of this process")
    try:
        if held.depth == 0:
            fd = _open_for_lock(Path(key))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError as exc:
                os.close(fd)
                raise LockBusy(f"{path} is locked by another process") from exc
            except BaseException:
                os.close(fd)
                raise
            held.fd = fd
        held.depth += 1
    except BaseException:
        held.thread_lock.release()
        raise
    try:
        yield
    finally:
        held.depth -= 1
        if held.depth == 0 and held.fd is not None:
            fd, held.fd = held.fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        held.thread_lock.release()


def lock_is_held(path: str | Path) -> bool:
    """Whether another process holds :func:`exclusive_lock` on ``path`` now (a cheap, racy look)."""
    if not Path(path).exists():
        return False
    try:
        with exclusive_lock(path, blocking=False):
            return False
    except LockBusy:
        return True
