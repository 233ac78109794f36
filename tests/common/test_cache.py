"""FeatureCache: hits skip compute, corrupt entries are recomputed, writes are atomic, root=None."""
from __future__ import annotations

import os

import numpy as np
import pytest

from fedser.common.cache import FeatureCache


class Counter:
    """A compute function that counts its calls."""

    def __init__(self, value: np.ndarray):
        self.value = value
        self.calls = 0

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return self.value


KEY = ("3f2a" * 16, "a1b2c3d4e5f60718", 0.0, None)


def test_second_get_reads_disk_and_does_not_compute(tmp_path):
    # Prepare
    cache = FeatureCache(tmp_path / "cache")
    compute = Counter(np.random.default_rng(0).standard_normal((40, 101)).astype(np.float32))

    # Execute
    first = cache.get(KEY, compute)
    second = FeatureCache(tmp_path / "cache").get(KEY, compute)  # a new process would see the same

    # Assert
    assert compute.calls == 1
    np.testing.assert_array_equal(first, compute.value)
    np.testing.assert_array_equal(second, compute.value)
    assert second.dtype == np.float32
    assert cache.path_for(KEY).is_file()


def test_any_key_part_makes_a_different_entry(tmp_path):
    # Prepare
    cache = FeatureCache(tmp_path)
    a, b = Counter(np.zeros(3)), Counter(np.ones(3))

    # Execute
    cache.get(("h", "spec1", 0.0), a)
    out = cache.get(("h", "spec2", 0.0), b)
    out_int = cache.get(("h", "spec1", 0), b)  # 0 and 0.0 are different parts

    # Assert
    assert a.calls == 1 and b.calls == 2
    np.testing.assert_array_equal(out, np.ones(3))
    np.testing.assert_array_equal(out_int, np.ones(3))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_entry_is_recomputed_and_rewritten(tmp_path, damage):
    # Prepare
    cache = FeatureCache(tmp_path)
    compute = Counter(np.arange(1000, dtype=np.float32).reshape(10, 100))
    cache.get(KEY, compute)
    path = cache.path_for(KEY)
    blob = path.read_bytes()
    path.write_bytes({"truncate": blob[: len(blob) // 2], "garbage": os.urandom(300), "empty": b""}[damage])

    # Execute
    out = cache.get(KEY, compute)
    again = cache.get(KEY, compute)

    # Assert
    assert compute.calls == 2
    np.testing.assert_array_equal(out, compute.value)
    np.testing.assert_array_equal(again, compute.value)
    np.testing.assert_array_equal(np.load(path), compute.value)


def test_no_root_computes_every_time(tmp_path):
    # Prepare
    cache = FeatureCache(None)
    compute = Counter(np.ones(5))

    # Execute
    cache.get(KEY, compute)
    cache.get(KEY, compute)

    # Assert
    assert compute.calls == 2
    assert cache.path_for(KEY) is None
    assert list(tmp_path.iterdir()) == []


def test_writes_leave_no_temporary_files(tmp_path):
    # Prepare
    cache = FeatureCache(tmp_path)

    # Execute
    for i in range(5):
        cache.get(("clip", i), lambda i=i: np.full(4, i))

    # Assert
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 5
    assert all(p.suffix == ".npy" and not p.name.startswith(".tmp-") for p in files)
    assert (cache.hits, cache.misses) == (0, 5)


def test_unwritable_root_still_returns_the_value(tmp_path):
    # Prepare: the cache root is a file, so no entry can be written under it
    root = tmp_path / "file"
    root.write_text("x")
    cache = FeatureCache(root)

    # Execute
    out = cache.get(KEY, lambda: np.arange(3))

    # Assert
    np.testing.assert_array_equal(out, np.arange(3))


def test_key_parts_without_stable_form_are_refused(tmp_path):
    # Execute / Assert
    with pytest.raises(TypeError, match="no stable form"):
        FeatureCache(tmp_path).get(("h", object()), lambda: np.zeros(1))
