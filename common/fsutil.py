"""Atomic file writes: a reader sees the old file or the new one, never a torn one."""
from __future__ import annotations

import os
import tempfile
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
