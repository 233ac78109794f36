"""Device settings (from ``--node-config``) and the device's local data.

A device is a person: its data folder (or manifest) holds its own recordings. Part of
them is held back for federated evaluation, deterministically, so the same utterances
are never trained on in one round and evaluated on in another.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedser.common.errors import ConfigError, CorpusError
from fedser.common.keys import TIERS, parse_tiers
from fedser.common.partitions import device_manifest

from .policy import PrivacyPolicy

if TYPE_CHECKING:
    # The resident agent (`fedser-client start`) imports this module for DeviceSettings; torch and
    # the feature stack load only where data is featurised (the ClientApp, feature preparation).
    from fedser.common.corpora import Corpus
    from fedser.common.data import TaskData
    from fedser.common.features import FeatureSpec


def default_state_dir() -> Path:
    return Path(os.environ.get("FEDSER_HOME", Path.home() / ".fedser"))


def device_ledger_path(data: str | Path | None = None) -> Path:
    """This device's privacy ledger: named by the device identity in the fedser home, not by its data.

    A ledger named by the data folder's path started a fresh budget whenever the folder moved.
    ``data`` only finds a ledger named that way (``ledger-<hash of the data path>.json``) so it
    is adopted once; a broken identity is a ConfigError that names its file and the fix.
    """
    from .ledger import LedgerCorruptError, default_ledger_path

    home = default_state_dir()
    legacy = None
    if data:
        legacy = home / f"ledger-{hashlib.sha256(str(Path(data).resolve()).encode()).hexdigest()[:12]}.json"
    try:
        return default_ledger_path(home, legacy)
    except LedgerCorruptError as exc:
        raise ConfigError(str(exc)) from exc


@dataclass(frozen=True)
class DeviceSettings:
    data: str                      # corpus folder or manifest CSV
    tier: float = 1.0              # width tier; "auto" is resolved before this is built
    max_epsilon: float = 8.0       # sample-level budget of this device
    delta: float = 1e-5
    ledger: str = ""               # privacy ledger path
    cache: str = ""                # feature cache folder ("" = none)
    holdout: float = 0.2           # share of local utterances held back for evaluation
    policy: PrivacyPolicy = PrivacyPolicy()   # what no server instruction can make it do

    @classmethod
    def from_node_config(cls, node_config: dict, run_config: dict | None = None) -> "DeviceSettings":
        """Validate ``--node-config`` values (collecting every problem) into settings.

        A virtual client of Flower's Simulation Engine has no ``data`` in its node config,
        only ``partition-id`` (and ``num-partitions``): it then reads
        ``<partitions-dir>/device-<partition-id>/data.csv`` from the run config, takes its
        tier from ``partition-tiers``, its budget from ``partition-max-epsilon`` and whether its
        policy requires DP-SGD from ``partition-require-dp`` (the simulation's operator runs both
        sides), and keeps its ledger under the run directory
        (``devices/device-<partition-id>/ledger.json``).
        Values in the node config always win.
        """
        run_config = run_config or {}
        problems = []
        data = str(node_config.get("data", "")).strip()
        partition = node_config.get("partition-id")
        partitions_dir = str(run_config.get("partitions-dir", "") or "").strip()
        defaults: dict[str, object] = {}
        if not data and partition is not None:
            if not partitions_dir:
                problems.append(f"partition-id {partition} but the run config sets no partitions-dir "
                                "(a folder made by `fedser partition`)")
            else:
                try:
                    defaults = _partition_defaults(int(partition), partitions_dir, run_config)
                    data = str(defaults.pop("data"))
                except (TypeError, ValueError) as exc:
                    problems.append(f"partition-id {partition!r}: {exc}")
                except ConfigError as exc:
                    problems.append(str(exc))
        if not data and not problems:
            problems.append("data is required (a corpus folder or manifest CSV on this device)")
        tier = node_config.get("tier", defaults.get("tier", 1.0))
        if str(tier) == "auto":
            from .probe import auto_tier
            tier = auto_tier()
        try:
            tier = float(tier)
        except (TypeError, ValueError):
            problems.append(f"tier must be one of {TIERS} or auto, got {tier!r}")
            tier = 1.0
        if tier not in TIERS:
            problems.append(f"tier must be one of {TIERS} or auto, got {tier}")
        max_eps = float(node_config.get("max-epsilon", defaults.get("max-epsilon", 8.0)))
        if not max_eps > 0:
            problems.append(f"max-epsilon must be > 0, got {max_eps}")
        delta = float(node_config.get("delta", 1e-5))
        if not 0 < delta < 1:
            problems.append(f"delta must be in (0, 1), got {delta}")
        holdout = float(node_config.get("holdout", 0.2))
        if not 0 <= holdout < 1:
            problems.append(f"holdout must be in [0, 1), got {holdout}")
        policy = PrivacyPolicy.from_node_config(node_config, defaults, problems)
        if problems:
            raise ConfigError("node config: " + "; ".join(problems))
        state = default_state_dir()
        ledger = str(node_config.get("ledger") or defaults.get("ledger") or device_ledger_path(data))
        cache = str(node_config.get("cache", state / "features"))
        return cls(data=data, tier=tier, max_epsilon=max_eps, delta=delta, ledger=ledger,
                   cache="" if cache == "none" else cache, holdout=holdout, policy=policy)


def _partition_defaults(partition: int, partitions_dir: str, run_config: dict) -> dict[str, object]:
    """Data, tier, budget and ledger of simulated device ``partition`` (see ``from_node_config``)."""
    if partition < 0:
        raise ValueError("must be >= 0")
    out: dict[str, object] = {"data": str(device_manifest(partitions_dir, partition))}
    tiers = parse_tiers(str(run_config.get("partition-tiers", "1.0") or "1.0"))
    out["tier"] = tiers[partition % len(tiers)]
    out["max-epsilon"] = float(run_config.get("partition-max-epsilon", 8.0))
    out["require-dp"] = run_config.get("partition-require-dp", True)
    run_dir = str(run_config.get("run-dir", "") or "").strip()
    if run_dir:
        out["ledger"] = str(Path(run_dir) / "devices" / f"device-{partition}" / "ledger.json")
    else:
        key = hashlib.sha256(str(Path(partitions_dir).resolve()).encode()).hexdigest()[:12]
        out["ledger"] = str(default_state_dir() / "simulation" / key / f"device-{partition}-ledger.json")
    return out


def _held_back(path: str, offset: float, share: float) -> bool:
    """Deterministic per-utterance choice, stable across rounds and restarts."""
    h = int(hashlib.sha256(f"{path}#{offset}".encode()).hexdigest()[:8], 16)
    return (h % 10_000) / 10_000 < share


@dataclass
class LocalData:
    corpus: Corpus
    train: dict[str, TaskData]
    holdout: dict[str, TaskData]

    @property
    def tasks(self) -> list[str]:
        return [t for t in ("emotion", "kws") if t in self.train and len(self.train[t]) > 0]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        out = list(self.corpus.skipped)
        for d in list(self.train.values()) + list(self.holdout.values()):
            out += d.skipped
        return out


def load_local_data(settings: DeviceSettings, spec: FeatureSpec, keep_waves: bool = False,
                    progress: bool = False) -> LocalData:
    """Load and featurise the device's data; raises CorpusError when nothing usable is there."""
    from fedser.common.cache import FeatureCache
    from fedser.common.corpora import load_corpus
    from fedser.common.data import build_task_data

    if not Path(settings.data).exists():
        raise CorpusError(f"data {settings.data} does not exist on this device")
    corpus = load_corpus(settings.data)
    cache = FeatureCache(settings.cache or None)
    train, holdout = {}, {}
    for task in sorted(corpus.tasks()):
        utts = [u for u in corpus.utterances if u.task == task]
        held = [u for u in utts if _held_back(u.path, u.offset, settings.holdout)]
        kept = [u for u in utts if not _held_back(u.path, u.offset, settings.holdout)]
        train[task] = build_task_data(kept, spec, task, cache, keep_waves=keep_waves, progress=progress,
                                      desc=f"features {task}")
        holdout[task] = build_task_data(held, spec, task, cache, progress=progress, desc=f"features {task} (held out)")
    data = LocalData(corpus, train, holdout)
    if not data.tasks:
        raise CorpusError(f"no usable utterances in {settings.data} "
                          f"({len(data.skipped)} file(s) skipped)")
    return data
