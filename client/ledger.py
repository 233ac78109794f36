"""The device's privacy ledger: one sample-level accountant for the device's whole life.

Every round of DP-SGD appends a :class:`~fedser.common.privacy.SpendRecord` (plus round, model
version and time) to a JSON file. Epsilon is always recomputed from the full history with an
Opacus accountant, so it covers every round since the ledger was created, across restarts.

The ledger must never under-count, so:

* **Durable.** ``record`` writes the new state before it returns, and the trainer calls it
  before training: a device killed mid-round has the spend on disk. Writes are atomic (temp
  file, fsync, ``os.replace``, fsync of the folder) and go to the main file and then to a
  ``.bak`` mirror; a reader takes the valid copy that spends more.
* **Serialised.** An exclusive ``flock`` on the ledger's folder is held by every write, and by
  :meth:`PrivacyLedger.round_lock` across the read, the budget check and the record of a round,
  so two agents (or ClientApp processes) on one ledger neither drop each other's records nor
  both plan on the same history.
* **Signed.** Each device has an identity in the fedser home (``device.json``, ``0600``): a
  random id and a secret. A ledger names the device it belongs to and carries an HMAC-SHA256 of
  its content under that secret; a copy without it, with a wrong one or of another device is
  unreadable. Editing the noise and recomputing a plain checksum no longer passes.
* **Never silently empty.** A copy that exists but cannot be read is never treated as empty:
  :class:`LedgerCorruptError` says which files are bad and how to recover. The identity lists
  the ledgers it has signed, so a ledger whose main file and backup are both gone is refused
  (:class:`LedgerMissingError`) rather than restarted at zero; ``fedser-client ledger reset
  --yes`` starts over knowingly and logs it (:func:`reset_ledger`).

Version-1 ledgers (a plain, optional SHA-256) are migrated once: a copy whose SHA-256 is present
and matches is re-signed as version 2 and the migration is logged. Refusing them would leave an
upgraded device two choices, a manual reset that forgets its real spend or no training at all;
the SHA-256 at least rules out damage, and a version-1 file is refused at any path this device
has already signed (no downgrade).

File layout (JSON)::

    {"format": "fedser-privacy-ledger", "version": 2, "device_id": "<16 hex>",
     "entries": [{"noise_multiplier": 1.1, "sample_rate": 0.02, "steps": 150,
                  "round": 3, "model_version": "7", "timestamp": 1700000000.0}, ...],
     "sha256": "<hex of the entries>", "hmac": "<HMAC-SHA256 of format, version, device_id, entries>"}

``sha256`` stays for readers without the device's secret (``fedser audit`` checks it for
damage); the device itself trusts only ``hmac``.
"""
from __future__ import annotations

import getpass
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedser.common.errors import ConfigError, FedserError, PrivacyBudgetExceeded, collect
from fedser.common.fsutil import PRIVATE, LockBusy, atomic_write_text, exclusive_lock, lock_is_held
from fedser.common.privacy import ACCOUNTANTS, SpendRecord, calibrate_noise, epsilon_of, plan_spend

log = logging.getLogger(__name__)

FORMAT = "fedser-privacy-ledger"
VERSION = 2
LEGACY_VERSION = 1                   # unsigned; read once and re-signed (see the module docstring)
IDENTITY_FORMAT = "fedser-device-identity"
IDENTITY_FILE = "device.json"        # in the fedser home: the device's id, secret and signed ledgers
RESET_LOG = "ledger-resets.log"      # in the fedser home: one JSON line per `ledger reset`


class LedgerCorruptError(FedserError):
    """The ledger file exists but neither it nor its backup can be read."""


class LedgerMissingError(LedgerCorruptError):
    """A ledger this device has recorded spend in is gone, main file and backup."""


class DeviceIdentityError(LedgerCorruptError):
    """The device identity cannot be read, so none of the device's ledgers can be verified."""


class LedgerBusyError(FedserError):
    """The ledger is being written by another process."""


def _default_home() -> Path:
    from .device import default_state_dir   # here, not at the top: device imports this module lazily

    return default_state_dir()


def _path_key(path: str | Path) -> str:
    """How the identity names a ledger: its absolute path with links resolved."""
    return os.path.realpath(path)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _digest(entries: list[dict[str, Any]]) -> str:
    return hashlib.sha256(_canonical(entries)).hexdigest()


def _signed_payload(device_id: str, entries: list[dict[str, Any]]) -> bytes:
    """What the HMAC covers: everything but the checksums, so no field can change unnoticed."""
    return _canonical({"format": FORMAT, "version": VERSION, "device_id": device_id, "entries": entries})


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the device identity ------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceIdentity:
    """Who keeps a ledger: a random id and the secret that signs the device's ledgers.

    It lives in the fedser home, not beside the data or the ledger, so neither moving the data
    folder nor deleting a ledger changes it. ``ledgers`` names every ledger it has signed (with
    when it first did): a signed ledger that disappears is noticed.
    """

    home: Path
    device_id: str
    secret: bytes = field(repr=False)
    created: float
    ledgers: Mapping[str, float] = field(default_factory=dict)

    @staticmethod
    def file_in(home: str | Path) -> Path:
        return Path(home) / IDENTITY_FILE

    @property
    def file(self) -> Path:
        return self.file_in(self.home)

    @property
    def default_ledger(self) -> Path:
        """The device's own ledger: named by its id, so it follows the device, not its data."""
        return self.home / f"ledger-{self.device_id}.json"

    @classmethod
    def load(cls, home: str | Path) -> "DeviceIdentity | None":
        """The identity stored in ``home``; None when there is none yet.

        Raises :class:`DeviceIdentityError` when the file exists but cannot be read.
        """
        path = cls.file_in(home)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise DeviceIdentityError(cls._unreadable(path, str(exc))) from exc
        try:
            state = json.loads(raw)
            if not isinstance(state, Mapping) or state.get("format") != IDENTITY_FORMAT:
                raise ValueError(f"not a fedser device identity (expected format {IDENTITY_FORMAT!r})")
            device_id, secret, ledgers = state["device_id"], bytes.fromhex(state["secret"]), state["ledgers"]
            if not isinstance(device_id, str) or not device_id or len(secret) < 16:
                raise ValueError("device_id or secret is malformed")
            if not isinstance(ledgers, Mapping) or not all(isinstance(t, (int, float)) for t in ledgers.values()):
                raise ValueError("'ledgers' must map ledger paths to times")
            return cls(Path(home), device_id, secret, float(state["created"]), dict(ledgers))
        except (ValueError, KeyError, TypeError) as exc:
            raise DeviceIdentityError(cls._unreadable(path, str(exc))) from exc

    @staticmethod
    def _unreadable(path: Path, problem: str) -> str:
        return (f"device identity {path} cannot be read ({problem}). It holds the secret that signs this "
                "device's privacy ledgers: restore it from a backup. Without it no ledger of this device can "
                "be verified, and a new identity would start every privacy budget from zero.")

    @classmethod
    def load_or_create(cls, home: str | Path) -> "DeviceIdentity":
        """The identity in ``home``, made (``0600``, under the home's lock) on first use."""
        home = Path(home)
        found = cls.load(home)
        if found is not None:
            return found
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        with exclusive_lock(home):
            found = cls.load(home)   # another process may have made it while this one waited
            if found is not None:
                return found
            made = cls(home, secrets.token_hex(8), secrets.token_bytes(32), time.time(), {})
            made._save()
        log.info("new device identity %s in %s", made.device_id, made.file)
        return made

    def _save(self) -> None:
        state = {"format": IDENTITY_FORMAT, "version": 1, "device_id": self.device_id,
                 "secret": self.secret.hex(), "created": self.created, "ledgers": dict(self.ledgers)}
        atomic_write_text(self.file, json.dumps(state, indent=1) + "\n", PRIVATE)

    def sign(self, payload: bytes) -> str:
        return hmac.new(self.secret, payload, hashlib.sha256).hexdigest()

    def has_ledgered(self, path: str | Path) -> bool:
        return _path_key(path) in self.ledgers

    def first_recorded(self, path: str | Path) -> float | None:
        return self.ledgers.get(_path_key(path))

    def _update(self, change: Any) -> "DeviceIdentity":
        """Re-read the file under the home's lock, apply ``change`` to its ledgers and save it."""
        with exclusive_lock(self.home):
            current = self.load(self.home)
            if current is None or current.device_id != self.device_id:
                raise DeviceIdentityError(
                    f"device identity {self.file} changed while in use (device {self.device_id} is "
                    f"{'gone' if current is None else 'now ' + current.device_id}); restore the file of device "
                    f"{self.device_id} from a backup")
            ledgers = dict(current.ledgers)
            if not change(ledgers):
                return current
            updated = replace(current, ledgers=ledgers)
            updated._save()
            return updated

    def register(self, path: str | Path) -> "DeviceIdentity":
        """Note that this device has signed the ledger at ``path`` (once; later calls change nothing)."""
        if self.has_ledgered(path):
            return self
        key = _path_key(path)

        def add(ledgers: dict[str, float]) -> bool:
            if key in ledgers:
                return False
            ledgers[key] = time.time()
            return True

        return self._update(add)

    def forget(self, path: str | Path) -> "DeviceIdentity":
        """Drop ``path`` from the signed ledgers (``ledger reset`` only)."""
        key = _path_key(path)
        return self._update(lambda ledgers: ledgers.pop(key, None) is not None)


def default_ledger_path(home: str | Path | None = None, legacy: str | Path | None = None) -> Path:
    """The device's own ledger in ``home`` (the fedser home by default), named by its identity.

    ``legacy`` is where this device's ledger was kept when ledgers were named by the data
    folder's path: a ledger (or backup) found there is moved to the identity's name once, so an
    upgrade keeps the spend. A legacy ledger beside an existing identity ledger is refused:
    silently picking either would hide the other's spend.
    """
    identity = DeviceIdentity.load_or_create(home if home is not None else _default_home())
    target = identity.default_ledger
    if legacy is None:
        return target
    legacy = Path(legacy)
    pairs = [(legacy, target), (legacy.with_name(legacy.name + ".bak"), target.with_name(target.name + ".bak"))]
    if not any(src.exists() for src, _ in pairs):
        return target
    with exclusive_lock(target.parent):
        clashes = [(src, dst) for src, dst in pairs if src.exists() and dst.exists()]
        if clashes:
            raise ConfigError(
                f"privacy ledger {legacy} (named by a data folder, as ledgers were before they followed the "
                f"device) exists beside this device's ledger {target}: a fedser home is one device, so one of "
                f"the two belongs to another agent that used this home. Give that agent its own FEDSER_HOME and "
                f"move {legacy} and its .bak there, or name the ledger to use with --ledger.")
        moved = []
        for src, dst in pairs:
            if src.exists():
                os.replace(src, dst)
                moved.append(f"{src} -> {dst}")
        _fsync_dir(target.parent)
    log.warning("privacy ledger adopted by device %s: %s", identity.device_id, "; ".join(moved))
    return target


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



@dataclass(frozen=True)
class _Copy:
    """One readable file of a ledger."""

    entries: list[LedgerEntry]
    version: int
    device_id: str | None   # None for an unsigned version-1 copy


class PrivacyLedger:
    """Persistent sample-level privacy ledger of one device.

    Args:
        path: the ledger file (its folder is created); ``<path>.bak`` mirrors it.
        max_epsilon: lifetime budget at ``delta`` (``inf`` = no budget).
        delta: the delta every epsilon is reported at.
        accountant: Opacus accountant used to compute epsilon ("rdp" or "prv").
        home: the fedser home whose device identity signs and verifies the ledger (default
            ``$FEDSER_HOME`` or ``~/.fedser``). A ledger is readable only with the identity of
            the device that wrote it.

    The state is read when the ledger is opened and again by ``reload``, ``round_lock`` and
    ``record`` (``record`` appends to what is on disk under the ledger's lock, so two ledger
    objects or processes on one path never drop each other's entries).
    """

    def __init__(self, path: str | Path, max_epsilon: float, delta: float, accountant: str = "rdp",
                 home: str | Path | None = None):
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
        self.home = Path(home) if home is not None else _default_home()
        self.max_epsilon = float(max_epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self.entries: list[LedgerEntry] = []
        self.device_id: str | None = None     # the device whose identity verified (or will sign) it
        self.verified: bool | None = None     # the HMAC of the copy in use held; None: nothing recorded yet
        self.reload()

    # -- locking ---------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # The folder, not a lock file beside the ledger: the folder always exists once the ledger
        # does, holds no extra file, and its lock covers the temp files of the atomic writes too.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.path.parent):
            yield

    @contextmanager
    def round_lock(self) -> Iterator["PrivacyLedger"]:
        """Hold the ledger for one device round: re-read it, then plan and record with no one between.

        Without it two processes can plan on the same history and together spend more than the
        budget allows. Inside, :meth:`plan_round` sees every record on disk and :meth:`record`
        appends without waiting (the lock is re-entrant in this process); other processes wait.
        Hold it only across planning and recording, never across training::

            with ledger.round_lock():
                plan = ledger.plan_round(counts, batch_size, epochs, rounds_left, floor)
                for spend in plan.spend:
                    ledger.record(spend, round=r, model_version=v)
        """
        with self._locked():
            self.reload()
            yield self

    def lock_held(self) -> bool:
        """Whether another process holds the ledger's lock right now (it is planning or recording)."""
        return lock_is_held(self.path.parent)

    # -- reading ---------------------------------------------------------------------------

    def _parse(self, path: Path, identity: DeviceIdentity | None) -> _Copy:
        """One ledger file; raises ValueError/OSError describing what is wrong."""
        raw = path.read_text(encoding="utf-8")
        try:
            state = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e}); the file may be truncated") from e
        return self._check_state(state, identity, from_disk=True)

    def _check_state(self, state: Any, identity: DeviceIdentity | None, from_disk: bool) -> _Copy:
        """The entries of ``state`` once its checksum holds (``from_disk``: read from the main file or backup)."""
        if not isinstance(state, Mapping) or state.get("format") != FORMAT:
            raise ValueError(f"not a fedser privacy ledger (expected format {FORMAT!r})")
        version = state.get("version")
        entries = state.get("entries")
        if not isinstance(entries, list):
            raise ValueError("'entries' is missing or not a list")
        device_id: str | None = None
        if version == VERSION:
            mac, device_id = state.get("hmac"), state.get("device_id")
            if not isinstance(mac, str):
                raise ValueError("no HMAC-SHA256 checksum ('hmac' is missing): every version-2 ledger is "
                                 "signed, so the file was altered")
            if not isinstance(device_id, str):
                raise ValueError("'device_id' is missing: every version-2 ledger names its device")
            if identity is None:
                raise ValueError(f"signed by device {device_id}, but there is no device identity at "
                                 f"{DeviceIdentity.file_in(self.home)}: restore that file (it holds the secret "
                                 "that verifies the ledger), or set FEDSER_HOME to the home of that device")
            if device_id != identity.device_id:
                raise ValueError(f"signed by device {device_id}, not by this device {identity.device_id} "
                                 f"({identity.file}); a ledger is kept by one device: read it with that "
                                 "device's FEDSER_HOME")
            if not hmac.compare_digest(mac, identity.sign(_signed_payload(device_id, entries))):
                raise ValueError("checksum mismatch (HMAC-SHA256 under this device's secret): the entries "
                                 "were altered or damaged")
        elif version == LEGACY_VERSION:
            if state.get("sha256") != _digest(entries):
                raise ValueError("checksum mismatch or missing: a version-1 ledger is migrated only when its "
                                 "SHA-256 is present and matches its entries")
            # The identity names the ledger by its main file; the backup is refused the same way.
            if from_disk and identity is not None and identity.has_ledgered(self.path):
                raise ValueError(f"an unsigned version-1 ledger where device {identity.device_id} already keeps "
                                 "a signed one; a signed ledger is never rewritten as version 1")
        else:
            raise ValueError(f"ledger version {version!r} is not supported (expected {VERSION}, or "
                             f"{LEGACY_VERSION} to migrate)")
        return _Copy([LedgerEntry.from_dict(e) for e in entries], version, device_id)

    def _read(self, identity: DeviceIdentity | None) -> _Copy | None:
        """The copy to trust; None for a ledger that was never written. Raises when none can be trusted."""
        found: dict[Path, _Copy] = {}
        errors: dict[Path, str] = {}
        for p in (self.path, self.backup_path):
            if not p.exists():
                continue
            try:
                found[p] = self._parse(p, identity)
            except (OSError, UnicodeDecodeError, ValueError) as e:  # ConfigError is a ValueError
                errors[p] = str(e)
        if not found and not errors:
            if identity is not None and identity.has_ledgered(self.path):
                raise LedgerMissingError(self._missing_message(identity))
            return None
        if not found:
            detail = "; ".join(f"{p}: {msg}" for p, msg in errors.items())
            missing = [str(p) for p in (self.path, self.backup_path) if p not in errors]
            raise LedgerCorruptError(
                f"privacy ledger {self.path} cannot be read ({detail}"
                + (f"; {', '.join(missing)} is missing" if missing else "")
                + "). Refusing to start from zero spend, which would under-count the privacy this "
                "device has already spent. Restore the file from a backup; or, only if you accept that "
                "the recorded spend is lost and earlier rounds are no longer covered, run "
                f"`fedser-client ledger reset --yes --ledger {self.path}` (it moves both files aside and logs "
                f"the reset in {self.home / RESET_LOG}).")
        best = self._newest(found)
        for p, msg in errors.items():
            log.warning("privacy ledger copy %s is unreadable (%s); using %s", p, msg, best)
        if best != self.path and self.path not in errors:
            if self.path in found:
                log.warning("privacy ledger %s holds less spend than its backup %s; using the backup",
                            self.path, best)
            else:
                log.warning("privacy ledger %s is missing; using its backup %s", self.path, best)
        return found[best]

    def _missing_message(self, identity: DeviceIdentity) -> str:
        since = identity.first_recorded(self.path)
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(since)) if since else "an earlier run"
        return (f"privacy ledger {self.path} and its backup {self.backup_path} are both missing, but device "
                f"{identity.device_id} ({identity.file}) has recorded privacy spend in it since {when}. Refusing "
                "to start from zero spend, which would under-count the privacy this device has already spent. "
                "Restore both files from a backup; or, only if you accept that the recorded spend is lost, run "
                f"`fedser-client ledger reset --yes --ledger {self.path}` to start over (the reset is logged in "
                f"{self.home / RESET_LOG}).")

    def reload(self) -> None:
        """Re-read the ledger from disk (main file and backup).

        Takes the valid copy that spends more; a pair that was never written means a new, empty
        ledger. Raises :class:`LedgerCorruptError` when a copy exists but none can be read, and
        :class:`LedgerMissingError` when both copies of a ledger this device has signed are gone.
        A valid version-1 copy is re-signed as version 2 here, once, under the lock.
        """
        identity = DeviceIdentity.load(self.home)
        copy = self._read(identity)
        if copy is not None and copy.version == LEGACY_VERSION:
            with self._locked():
                identity = DeviceIdentity.load_or_create(self.home)
                copy = self._read(identity)   # another process may have migrated or recorded meanwhile
                if copy is not None and copy.version == LEGACY_VERSION:
                    self._write(copy.entries, identity)
                    log.warning("privacy ledger %s was an unsigned version-1 ledger (%d entries); migrated it "
                                "to version %d, signed by device %s (%s)", self.path, len(copy.entries),
                                VERSION, identity.device_id, identity.file)
                    copy = _Copy(copy.entries, VERSION, identity.device_id)
        if copy is None:
            self.entries, self.verified = [], None
            self.device_id = identity.device_id if identity is not None else None
        else:
            self.entries, self.verified, self.device_id = copy.entries, True, copy.device_id

    def _newest(self, found: dict[Path, _Copy]) -> Path:
        """The readable copy to trust: histories are append-only, so the longer of a prefix pair."""
        if len(found) == 1:
            return next(iter(found))
        main, bak = found[self.path].entries, found[self.backup_path].entries
        if main[: len(bak)] == bak:
            return self.path
        if bak[: len(main)] == main:
            return self.backup_path
        # Diverged copies (edited or copied by hand): trust the one that spends more.
        spent = {p: epsilon_of([e.spend for e in c.entries], self.delta, self.accountant) for p, c in found.items()}
        best = max(found, key=lambda p: (spent[p], len(found[p].entries), p == self.path))
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
        Call it inside :meth:`round_lock` when the plan is to be recorded, so that no other
        process records between the plan and its record.
        """
        return plan_round(self.history, self.max_epsilon, self.delta, example_counts, batch_size, epochs,
                          rounds_left, floor, self.accountant)

    def summary(self) -> dict[str, Any]:
        """Figures for ``fedser-client status``."""
        eps = self.epsilon()
        return {"path": str(self.path), "backup": str(self.backup_path), "device_id": self.device_id,
                "identity": str(DeviceIdentity.file_in(self.home)), "hmac_verified": self.verified,
                "epsilon": eps, "max_epsilon": self.max_epsilon,
                "remaining_epsilon": max(0.0, self.max_epsilon - eps), "exhausted": eps >= self.max_epsilon,
                "delta": self.delta, "accountant": self.accountant, "rounds_joined": self.rounds_joined,
                "last_round": self.entries[-1].round if self.entries else None,
                "last_model_version": self.last_model_version, "steps": self.steps,
                "last_update": self.entries[-1].timestamp if self.entries else None}

    # -- writing ---------------------------------------------------------------------------

    def record(self, spend: SpendRecord, round: int, model_version: str | int | None) -> LedgerEntry:
        """Append ``spend`` and make it durable before returning.

        Call it before the update leaves the device. It never refuses: spend that happened is
        always recorded (plan the round with ``plan_round``, inside ``round_lock``, before training).
        """
        if not isinstance(spend, SpendRecord):
            raise ConfigError(f"record: spend must be a SpendRecord; got {type(spend).__name__}: {spend!r}")
        if not isinstance(round, int) or isinstance(round, bool):
            raise ConfigError(f"record: round={round!r} must be an integer")
        if model_version is not None and not isinstance(model_version, (str, int)):
            raise ConfigError(f"record: model_version={model_version!r} must be a string, int or None")
        with self._locked():
            self.reload()  # append to what is on disk, not to a stale copy
            entry = LedgerEntry(spend, round, model_version, time.time())
            self._write([*self.entries, entry])
            self.entries.append(entry)
        return entry

    def _signed_state(self, entries: list[LedgerEntry], identity: DeviceIdentity) -> dict[str, Any]:
        dicts = [e.to_dict() for e in entries]
        return {"format": FORMAT, "version": VERSION, "device_id": identity.device_id, "entries": dicts,
                "sha256": _digest(dicts), "hmac": identity.sign(_signed_payload(identity.device_id, dicts))}

    def _write(self, entries: list[LedgerEntry], identity: DeviceIdentity | None = None) -> None:
        """Sign and write ``entries``, main file then mirror; the caller holds the lock."""
        identity = identity or DeviceIdentity.load_or_create(self.home)
        text = json.dumps(self._signed_state(entries, identity), indent=1, allow_nan=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Main first, then the mirror: at every instant one readable copy holds all returned records.
        atomic_write_text(self.path, text)
        atomic_write_text(self.backup_path, text)
        # After the files: a crash in between leaves a ledger that is noted on its next write,
        # never a noted ledger that was not written.
        identity.register(self.path)
        self.device_id, self.verified = identity.device_id, True

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (the file's content, signed by this device)."""
        return self._signed_state(self.entries, DeviceIdentity.load_or_create(self.home))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the ledger by ``state`` and persist it.

        ``state`` must be signed by this device (or be a valid version-1 state), and it is
        refused unless it extends the recorded history (same entries first): loading less would
        under-count.
        """
        try:
            entries = self._check_state(state, DeviceIdentity.load(self.home), from_disk=False).entries
        except ValueError as e:
            raise ConfigError(f"PrivacyLedger.load_state_dict: {e}") from e
        with self._locked():
            self.reload()
            if entries[: len(self.entries)] != self.entries:
                raise ConfigError(
                    f"PrivacyLedger.load_state_dict: the state does not extend the {self.rounds_joined} entries "
                    f"recorded in {self.path}; loading it would under-count the spend")
            self._write(entries)
            self.entries = entries


# -- starting over ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerReset:
    """What ``fedser-client ledger reset`` did, as written to the reset log."""

    time: str
    device_id: str | None
    ledger: str
    found: str                 # "missing", "unreadable: ...", or "N entries, ... steps"
    moved_aside: list[str]
    user: str
    reason: str
    log: str

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "log"}


def reset_ledger(path: str | Path, home: str | Path | None = None, reason: str = "") -> LedgerReset:
    """Start the ledger at ``path`` over at zero spend, knowingly, and log it.

    Whatever is there is moved aside (``<name>.reset-<UTC time>``, never deleted), the device
    stops treating the path as one it has signed, and one JSON line goes to ``ledger-resets.log``
    in the fedser home. Refused while another process holds the ledger's lock.
    """
    path = Path(path)
    home = Path(home) if home is not None else _default_home()
    backup = path.with_name(path.name + ".bak")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(path.parent, blocking=False):
            identity = DeviceIdentity.load(home)
            try:
                old = PrivacyLedger(path, math.inf, 1e-5, home=home)
                found = (f"{old.rounds_joined} entries, {old.steps} DP-SGD steps"
                         if old.verified is not None else "missing")
            except LedgerMissingError:
                found = "missing"
            except LedgerCorruptError as exc:
                found = f"unreadable: {exc}"
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            moved = []
            for p in (path, backup):
                if p.exists():
                    aside = p.with_name(f"{p.name}.reset-{stamp}")
                    os.replace(p, aside)
                    moved.append(str(aside))
            _fsync_dir(path.parent)
            if identity is not None:
                identity.forget(path)
            done = LedgerReset(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               identity.device_id if identity else None, str(path), found, moved,
                               getpass.getuser(), reason, str(home / RESET_LOG))
            _append_line(home / RESET_LOG, json.dumps(done.to_dict()))
    except LockBusy as exc:
        raise LedgerBusyError(
            f"privacy ledger {path} is being written right now (its folder {path.parent} is locked): stop the "
            "device agent that uses it, then run the reset again") from exc
    log.warning("privacy ledger %s reset by %s (%s); logged in %s", path, done.user, found, done.log)
    return done


def _append_line(path: Path, line: str) -> None:
    """Append one line durably to a private log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
