"""A disk cache of computed arrays (decoded audio, features), one ``.npy`` file per key.

The caller names an entry by ``key_parts``: everything its value depends on, for
instance ``(audio.content_hash(path), spec.fingerprint(), offset, duration)``. A
change to any part is a different entry, so the cache never needs invalidating.
The cache is an optimisation only: an entry that cannot be read is recomputed and
rewritten, and a failed write is logged and ignored.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .fsutil import atomic_write

log = logging.getLogger(__name__)


def _canonical(part: Any) -> Any:
    # Only values with one stable textual form may name a cache entry; repr() of an
    # arbitrary object can hold a memory address and would silently never hit.
    if part is None or isinstance(part, (str, bool, int)):
        return part
    if isinstance(part, np.integer):
        return int(part)
    if isinstance(part, (float, np.floating)):
        return repr(float(part))  # exact, and distinct from the int of the same value
    if isinstance(part, Path):
        return str(part)
    if isinstance(part, (tuple, list)):
        return [_canonical(p) for p in part]
    raise TypeError(
        f"cache key part {part!r} of type {type(part).__name__} has no stable form; "
        "use str, int, float, bool, None or tuples of them"
    )


class FeatureCache:
    """``get(key_parts, compute)`` returns the cached array or computes, stores and returns it.

    Args:
        root: cache folder (created on first write), or None to compute every time.

    Attributes:
        hits, misses: counts of ``get`` calls served from disk and computed.
    """

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    def key(self, key_parts: tuple) -> str:
        """sha256 hex digest naming the entry for ``key_parts``."""
        blob = json.dumps(_canonical(tuple(key_parts)), separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def path_for(self, key_parts: tuple) -> Path | None:
        """Where the entry for ``key_parts`` lives (None without a root)."""
        if self.root is None:
            return None
        key = self.key(key_parts)
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key_parts: tuple, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The array for ``key_parts``: from disk if a readable entry exists, else ``compute()``.

        A freshly computed array is written atomically (temporary file in the same
        folder, fsync, ``os.replace``), so readers never see a half-written entry.
        """
        path = self.path_for(key_parts)
        if path is None:
            self.misses += 1
            return np.asarray(compute())
        if path.exists():
            try:
                value = np.load(path, allow_pickle=False)
                self.hits += 1
                return value
            except (OSError, ValueError, EOFError) as e:
                log.warning("feature cache entry %s unreadable (%s): recomputing", path, e)
        self.misses += 1
        value = np.asarray(compute())
        self._write(path, value)
        return value

    def _write(self, path: Path, value: np.ndarray) -> None:
        try:
            atomic_write(path, lambda f: np.save(f, value, allow_pickle=False))
        except (OSError, ValueError) as e:
            log.warning("feature cache could not write %s (%s): continuing without it", path, e)
