"""The partition-folder format: what ``fedser partition`` writes and both sides read.

A partition folder shares corpora out by speaker (a device is a person)::

    DIR/device-0/data.csv ... DIR/device-<N-1>/data.csv   one manifest per device
    DIR/test.csv                                          held-out speakers (the server's test set)
    DIR/public.csv                                        optional public share (server pretraining)
    DIR/partitions.json                                   how it was made, and per-device counts

A device (or a virtual client of the Simulation Engine) with ``partition-id`` i reads
``device_manifest(DIR, i)``; the server reads ``test.csv`` and checks the folder with
``read_partitions``.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError

PARTITIONS_FILE = "partitions.json"
TEST_MANIFEST = "test.csv"
PUBLIC_MANIFEST = "public.csv"


def device_manifest(root: str | Path, partition_id: int) -> Path:
    """Where device ``partition_id``'s manifest lives under a partition folder."""
    return Path(root) / f"device-{int(partition_id)}" / "data.csv"


def read_partitions(root: str | Path) -> dict:
    """The ``partitions.json`` of a partition folder, checked against the manifests present.

    Raises ``ConfigError`` naming the folder when it is not a partition folder or a device
    manifest is missing.
    """
    root = Path(root)
    meta_path = root / PARTITIONS_FILE
    if not meta_path.is_file():
        raise ConfigError(f"{root}: no {PARTITIONS_FILE}; make the folder with "
                          f"`fedser partition --data PATH --clients N --out {root}`")
    try:
        meta = json.loads(meta_path.read_text())
        n = int(meta["num-partitions"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{meta_path}: unreadable ({exc}); partition again") from None
    missing = [str(device_manifest(root, i)) for i in range(n) if not device_manifest(root, i).is_file()]
    if missing:
        raise ConfigError(f"{root}: {len(missing)} device manifest(s) missing, e.g. {missing[0]}; partition again")
    return meta
