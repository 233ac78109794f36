"""The device's privacy ledger: one sample-level accountant for the device's whole life.

Every round of DP-SGD appends a :class:`~fedser.common.privacy.SpendRecord` (plus round, model
version and time) to a JSON file. Epsilon is always recomputed from the full history with an
Opacus accountant, so it covers every round since the ledger was created, across restarts.

Durability, because the ledger must never under-count:

* ``record`` writes the new state before it returns, and the trainer calls it before it
  replies with the update: a device killed after the update left has the spend on disk.
* Writes are atomic (temp file in the same folder, flush, fsync, ``os.replace``, fsync of the
  folder) and go to the main file and then to a ``.bak`` mirror. A reader takes the valid copy
  that spends more, so a torn or corrupt main file falls back to the mirror (with a warning).
* A ledger that exists but cannot be read is never treated as empty: :class:`LedgerCorruptError`
  says which files are bad and how to recover.

File layout (JSON)::

    {"format": "fedser-privacy-ledger", "version": 1, "sha256": "<hex of the entries>",
     "entries": [{"noise_multiplier": 1.1, "sample_rate": 0.02, "steps": 150,
                  "round": 3, "model_version": "7", "timestamp": 1700000000.0}, ...]}
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedser.common.errors import ConfigError, FedserError, PrivacyBudgetExceeded, collect
from fedser.common.fsutil import atomic_write_text
from fedser.common.privacy import ACCOUNTANTS, SpendRecord, calibrate_noise, epsilon_of, plan_spend

log = logging.getLogger(__name__)

FORMAT = "fedser-privacy-ledger"
VERSION = 1


class LedgerCorruptError(FedserError):
    """The ledger file exists but neither it nor its backup can be read."""


@dataclass(frozen=True)
class LedgerEntry:
    """One round's sample-level spend as the device recorded it."""

    spend: SpendRecord
    round: int
    model_version: str | int | None
    timestamp: float

    def to_dict(self) -> dict[str, Any]:
        return {**self.spend.to_dict(), "round": self.round, "model_version": self.model_version,
                "timestamp": self.timestamp}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LedgerEntry":
        if not isinstance(d, Mapping):
            raise ConfigError(f"ledger entry must be an object; got {type(d).__name__}: {d!r}")
        problems = [f"missing key {k!r}" for k in ("round", "model_version", "timestamp") if k not in d]
        collect(problems, ConfigError, prefix=f"ledger entry {dict(d)!r}")
        if not isinstance(d["round"], int) or isinstance(d["round"], bool):
            raise ConfigError(f"ledger entry round={d['round']!r} must be an integer")
        if d["model_version"] is not None and not isinstance(d["model_version"], (str, int)):
            raise ConfigError(f"ledger entry model_version={d['model_version']!r} must be a string, int or null")
        if not isinstance(d["timestamp"], (int, float)) or isinstance(d["timestamp"], bool):
            raise ConfigError(f"ledger entry timestamp={d['timestamp']!r} must be a number")
        return cls(SpendRecord.from_dict(d), d["round"], d["model_version"], float(d["timestamp"]))


def _digest(entries: list[dict[str, Any]]) -> str:
    canonical = json.dumps(entries, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RoundPlan:
    """What one round will cost a device: the DP-SGD noise it trains with and the spend per task."""

    noise_multiplier: float
    spend: list[SpendRecord]       # one record per task, to record before training starts
    projected_epsilon: float       # epsilon after this round, at the ledger's delta


def plan_round(history: Sequence[SpendRecord], max_epsilon: float, delta: float, example_counts: Sequence[int],
               batch_size: int, epochs: int, rounds_left: int, floor: float = 0.0,
               accountant: str = "rdp") -> RoundPlan:
    """The DP-SGD noise for this round of a device that has spent ``history``.

    The device spreads what is left of its budget over the rounds still planned (this one
    included): the noise is the smallest that keeps every remaining round of every task
    (``example_counts``, one per task) within ``max_epsilon``, never below the server's
    ``floor``. Raises ``PrivacyBudgetExceeded`` when even heavy noise cannot afford it.
    """
    history = list(history)
    per_round = [plan_spend(int(n), int(batch_size), int(epochs), 1.0) for n in example_counts]
    rounds_left = max(1, int(rounds_left))
    z = calibrate_noise(history, max_epsilon, delta, [(r.sample_rate, r.steps * rounds_left) for r in per_round],
                        floor=float(floor), accountant=accountant)
    if z is None:
        raise PrivacyBudgetExceeded(
            f"epsilon spent {epsilon_of(history, delta, accountant):.2f} of budget {max_epsilon} "
            f"(delta {delta}) leaves too little for {rounds_left} more round(s)")
    planned = [SpendRecord(z, r.sample_rate, r.steps) for r in per_round]
    projected = epsilon_of(history + planned, delta, accountant)
    if projected > max_epsilon:
        raise PrivacyBudgetExceeded(
            f"this round would raise epsilon from {epsilon_of(history, delta, accountant):.2f} to "
            f"{projected:.2f}, over the device budget {max_epsilon} (delta {delta})")
    return RoundPlan(z, planned, projected)


class PrivacyLedger:
    """Persistent sample-level privacy ledger of one device.

    Args:
        path: the ledger file (its folder is created); ``<path>.bak`` mirrors it.
        max_epsilon: lifetime budget at ``delta`` (``inf`` = no budget).
        delta: the delta every epsilon is reported at.
        accountant: Opacus accountant used to compute epsilon ("rdp" or "prv").

    The state is read when the ledger is opened and again by ``reload`` and ``record``
    (``record`` appends to what is on disk, so two ledger objects on one path never drop each
    other's entries).
    """

    def __init__(self, path: str | Path, max_epsilon: float, delta: float, accountant: str = "rdp"):
        problems: list[str] = []
        if not isinstance(max_epsilon, (int, float)) or isinstance(max_epsilon, bool) \
                or math.isnan(max_epsilon) or max_epsilon <= 0:
            problems.append(f"max_epsilon={max_epsilon!r} must be a number > 0 (inf for no budget)")
        if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0.0 < delta < 1.0:
            problems.append(f"delta={delta!r} must be a number in (0, 1), e.g. 1e-5")
        if accountant not in ACCOUNTANTS:
            problems.append(f"accountant={accountant!r} must be one of {ACCOUNTANTS}")
        collect(problems, ConfigError, prefix="PrivacyLedger")
        self.path = Path(path)
        self.backup_path = self.path.with_name(self.path.name + ".bak")
        self.max_epsilon = float(max_epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self.entries: list[LedgerEntry] = []
        self.reload()

    # -- reading ---------------------------------------------------------------------------

    def _parse(self, path: Path) -> list[LedgerEntry]:
        """Entries of one ledger file; raises ValueError/OSError describing what is wrong."""
        raw = path.read_text(encoding="utf-8")
        try:
            state = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e}); the file may be truncated") from e
        return self._entries_from_state(state)

    @staticmethod
    def _entries_from_state(state: Any) -> list[LedgerEntry]:
        if not isinstance(state, Mapping) or state.get("format") != FORMAT:
            raise ValueError(f"not a fedser privacy ledger (expected format {FORMAT!r})")
        if state.get("version") != VERSION:
            raise ValueError(f"ledger version {state.get('version')!r} is not supported (expected {VERSION})")
        entries = state.get("entries")
        if not isinstance(entries, list):
            raise ValueError("'entries' is missing or not a list")
        if "sha256" in state and state["sha256"] != _digest(entries):
            raise ValueError("checksum mismatch: the entries were altered or damaged")
        return [LedgerEntry.from_dict(e) for e in entries]

    def reload(self) -> None:
        """Re-read the ledger from disk (main file and backup).

        Takes the valid copy that spends more; a missing pair means a new, empty ledger. Raises
        :class:`LedgerCorruptError` when a copy exists but none can be read.
        """
        found: dict[Path, list[LedgerEntry]] = {}
        errors: dict[Path, str] = {}
        for p in (self.path, self.backup_path):
            if not p.exists():
                continue
            try:
                found[p] = self._parse(p)
            except (OSError, UnicodeDecodeError, ValueError) as e:  # ConfigError is a ValueError
                errors[p] = str(e)
        if not found and not errors:
            self.entries = []
            return
        if not found:
            detail = "; ".join(f"{p}: {msg}" for p, msg in errors.items())
            missing = [str(p) for p in (self.path, self.backup_path) if p not in errors]
            raise LedgerCorruptError(
                f"privacy ledger {self.path} cannot be read ({detail}"
                + (f"; {', '.join(missing)} is missing" if missing else "")
                + "). Refusing to start from zero spend, which would under-count the privacy this "
                "device has already spent. Restore the file from a backup; or, only if you accept that "
                "the recorded spend is lost and earlier rounds are no longer covered, move "
                f"{self.path} and {self.backup_path} aside to start a new ledger.")
        best = self._newest(found)
        for p, msg in errors.items():
            log.warning("privacy ledger copy %s is unreadable (%s); using %s", p, msg, best)
        if best != self.path and self.path not in errors:
            if self.path in found:
                log.warning("privacy ledger %s holds less spend than its backup %s; using the backup",
                            self.path, best)
            else:
                log.warning("privacy ledger %s is missing; using its backup %s", self.path, best)
        self.entries = found[best]

    def _newest(self, found: dict[Path, list[LedgerEntry]]) -> Path:
        """The readable copy to trust: histories are append-only, so the longer of a prefix pair."""
        if len(found) == 1:
            return next(iter(found))
        main, bak = found[self.path], found[self.backup_path]
        if main[: len(bak)] == bak:
            return self.path
        if bak[: len(main)] == main:
            return self.backup_path
        # Diverged copies (edited or copied by hand): trust the one that spends more.
        spent = {p: epsilon_of([e.spend for e in es], self.delta, self.accountant) for p, es in found.items()}
        best = max(found, key=lambda p: (spent[p], len(found[p]), p == self.path))
        log.warning("privacy ledger %s and its backup %s disagree (epsilon %.4g vs %.4g); using %s, "
                    "which spends more", self.path, self.backup_path, spent[self.path],
                    spent[self.backup_path], best)
        return best

    # -- figures ---------------------------------------------------------------------------

    @property
    def history(self) -> list[SpendRecord]:
        return [e.spend for e in self.entries]

    @property
    def rounds_joined(self) -> int:
        return len(self.entries)

    @property
    def steps(self) -> int:
        return sum(e.spend.steps for e in self.entries)

    @property
    def last_model_version(self) -> str | int | None:
        return self.entries[-1].model_version if self.entries else None

    def epsilon(self) -> float:
        """Epsilon at ``delta`` spent over the whole recorded history."""
        return epsilon_of(self.history, self.delta, self.accountant)

    def plan_round(self, example_counts: Sequence[int], batch_size: int, epochs: int, rounds_left: int,
                   floor: float = 0.0) -> "RoundPlan":
        """This round's DP-SGD noise and spend (:func:`plan_round` over this ledger's history and budget).

        Raises ``PrivacyBudgetExceeded`` when the device cannot afford the round; records nothing.
        """
        return plan_round(self.history, self.max_epsilon, self.delta, example_counts, batch_size, epochs,
                          rounds_left, floor, self.accountant)

    def summary(self) -> dict[str, Any]:
        """Figures for ``fedser-client status``."""
        eps = self.epsilon()
        return {"path": str(self.path), "epsilon": eps, "max_epsilon": self.max_epsilon,
                "remaining_epsilon": max(0.0, self.max_epsilon - eps), "exhausted": eps >= self.max_epsilon,
                "delta": self.delta, "accountant": self.accountant, "rounds_joined": self.rounds_joined,
                "last_round": self.entries[-1].round if self.entries else None,
                "last_model_version": self.last_model_version, "steps": self.steps,
                "last_update": self.entries[-1].timestamp if self.entries else None}

    # -- writing ---------------------------------------------------------------------------

    def record(self, spend: SpendRecord, round: int, model_version: str | int | None) -> LedgerEntry:
        """Append ``spend`` and make it durable before returning.

        Call it before the update leaves the device. It never refuses: spend that happened is
        always recorded (plan the round with ``plan_round`` before training).
        """
        if not isinstance(spend, SpendRecord):
            raise ConfigError(f"record: spend must be a SpendRecord; got {type(spend).__name__}: {spend!r}")
        if not isinstance(round, int) or isinstance(round, bool):
            raise ConfigError(f"record: round={round!r} must be an integer")
        if model_version is not None and not isinstance(model_version, (str, int)):
            raise ConfigError(f"record: model_version={model_version!r} must be a string, int or None")
        self.reload()  # append to what is on disk, not to a stale copy
        entry = LedgerEntry(spend, round, model_version, time.time())
        self._write([*self.entries, entry])
        self.entries.append(entry)
        return entry

    def _write(self, entries: list[LedgerEntry]) -> None:
        dicts = [e.to_dict() for e in entries]
        text = json.dumps({"format": FORMAT, "version": VERSION, "sha256": _digest(dicts), "entries": dicts},
                          indent=1, allow_nan=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Main first, then the mirror: at every instant one readable copy holds all returned records.
        atomic_write_text(self.path, text)
        atomic_write_text(self.backup_path, text)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (the file's content)."""
        dicts = [e.to_dict() for e in self.entries]
        return {"format": FORMAT, "version": VERSION, "sha256": _digest(dicts), "entries": dicts}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the ledger by ``state`` and persist it.

        Refused unless ``state`` extends the recorded history (same entries first): loading less
        would under-count.
        """
        try:
            entries = self._entries_from_state(state)
        except ValueError as e:
            raise ConfigError(f"PrivacyLedger.load_state_dict: {e}") from e
        self.reload()
        if entries[: len(self.entries)] != self.entries:
            raise ConfigError(
                f"PrivacyLedger.load_state_dict: the state does not extend the {self.rounds_joined} entries "
                f"recorded in {self.path}; loading it would under-count the spend")
        self._write(entries)
        self.entries = entries
