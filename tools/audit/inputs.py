"""What the audit reads: speaker genders and a federated run directory.

Speaker gender (the attribute the attribute-inference attack predicts) comes from each corpus's
documentation:

=============  ==============================================================
corpus         rule
=============  ==============================================================
``ravdess``    odd actor number = male, even = female (RAVDESS documentation);
               ``fedser synth`` follows the same rule for its voices
``emodb``      the speaker table below (EmoDB documentation)
any other      a CSV file ``speaker,gender`` given with ``--gender-csv``
=============  ==============================================================

In the CSV, ``speaker`` is the corpus's own speaker id (``01``) or the merged id
(``ravdess:01``) and ``gender`` is ``m``/``male`` or ``f``/``female``. CSV rows override the
built-in rules.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from fedser.common.errors import ConfigError

MALE, FEMALE = "m", "f"
GENDERS = (MALE, FEMALE)

EMODB_GENDER: dict[str, str] = {
    "03": MALE, "08": FEMALE, "09": FEMALE, "10": MALE, "11": MALE,
    "12": MALE, "13": FEMALE, "14": FEMALE, "15": MALE, "16": FEMALE,
}
"""EmoDB speakers (Burkhardt et al., 2005): speaker id -> gender."""

RUN_SETTINGS_FILE = "run_settings.json"   # written by the ServerApp at the start of a run
METRICS_FILE = "metrics.json"
BUNDLE_FILE = "model.fedser"


class AuditInputError(ConfigError):
    """An audit input is missing or unusable (run directory, corpus, gender table, split)."""


def _ravdess_gender(speaker: str) -> str | None:
    return (MALE if int(speaker) % 2 else FEMALE) if speaker.isdigit() else None


BUILTIN_RULES = {"ravdess": _ravdess_gender, "emodb": EMODB_GENDER.get}
"""corpus layout name -> speaker id -> gender (None when unknown)."""


def _bare(speaker: str) -> str:
    return speaker.split(":", 1)[1] if ":" in speaker else speaker


def load_gender_csv(path: str | Path) -> dict[str, str]:
    """``speaker -> "m" | "f"`` from a CSV with header ``speaker,gender``; every bad row is named."""
    path = Path(path)
    if not path.is_file():
        raise AuditInputError(f"--gender-csv {path}: no such file")
    out: dict[str, str] = {}
    problems: list[str] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip().lower() for h in reader.fieldnames or []]
        if "speaker" not in header or "gender" not in header:
            raise AuditInputError(f"{path}: expected a header 'speaker,gender'; got {','.join(header) or 'none'}")
        for i, row in enumerate(reader, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            g = row["gender"].lower()[:1]
            if not row["speaker"] or g not in GENDERS:
                problems.append(f"row {i}: speaker={row['speaker']!r} gender={row['gender']!r} "
                                "(gender must be m, male, f or female)")
                continue
            out[row["speaker"]] = g
    if problems:
        raise AuditInputError(f"{path}: " + "; ".join(problems))
    if not out:
        raise AuditInputError(f"{path}: no speaker rows")
    return out


def speaker_genders(utterances: Iterable, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Gender of every speaker of ``utterances`` that has a known one (``speaker id -> m|f``)."""
    extra = dict(extra or {})
    out: dict[str, str] = {}
    for u in utterances:
        if u.speaker in out:
            continue
        g = extra.get(u.speaker) or extra.get(_bare(u.speaker))
        if g is None and u.corpus in BUILTIN_RULES:
            g = BUILTIN_RULES[u.corpus](_bare(u.speaker))
        if g is not None:
            out[u.speaker] = g
    return out


# ----------------------------------------------------------------------------- run directory


@dataclass
class RunInfo:
    """A federated run directory as the audit sees it."""

    run_dir: Path
    bundle: object                           # fedser.common.bundle.Bundle
    settings: dict                           # run settings (snake_case keys), from run_settings.json
    metrics: dict                            # metrics.json ({"summary", "rounds"})
    ledgers: list[Path] = field(default_factory=list)
    member_manifests: list[Path] = field(default_factory=list)
    test_manifest: Path | None = None
    initial: dict | None = None              # the model the devices started from (initial_model.npz)


def load_run(run_dir: str | Path) -> RunInfo:
    """Read a run directory written by ``fedser-server start`` / ``fedser demo``.

    Raises ``AuditInputError`` naming what is missing: the folder, the final model bundle, the
    metrics or the run settings.
    """
    from fedser.common.bundle import load_bundle
    from fedser.common.errors import BundleError

    root = Path(run_dir)
    if not root.exists():
        raise AuditInputError(f"run directory {root} does not exist")
    if not root.is_dir():
        raise AuditInputError(f"{root} is not a folder; pass the run directory of a federated run "
                              "(the --run-dir of fedser-server start or the --out of fedser demo)")
    if not (root / METRICS_FILE).exists() and not (root / "checkpoint.pt").exists():
        raise AuditInputError(f"{root} is not a federated run directory (no {METRICS_FILE} or checkpoint.pt); "
                              "pass the --run-dir of fedser-server start or the --out of fedser demo")
    if not (root / BUNDLE_FILE).exists():
        raise AuditInputError(f"{root} has no final model ({BUNDLE_FILE}): the run has not finished; "
                              "audit it after its last round")
    try:
        bundle = load_bundle(root)
    except BundleError as exc:
        raise AuditInputError(str(exc)) from exc
    settings_path = root / RUN_SETTINGS_FILE
    if not settings_path.exists():
        raise AuditInputError(f"{root} has no {RUN_SETTINGS_FILE} (runs of older fedser versions do not write it): "
                              "write it as JSON with the run's settings (clip_norm, noise_multiplier, noise_mode, "
                              "dp, local_epochs, batch_size, learning_rate, ...) to audit this run")
    try:
        settings = json.loads(settings_path.read_text())
        metrics = json.loads((root / METRICS_FILE).read_text()) if (root / METRICS_FILE).exists() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise AuditInputError(f"{root}: unreadable run files ({exc})") from exc
    if not isinstance(settings, dict):
        raise AuditInputError(f"{settings_path}: expected a JSON object of run settings")
    settings = {k.replace("-", "_"): v for k, v in settings.items()}
    problems = []
    mc, spec = bundle.model_config, bundle.feature_spec
    if mc.n_features != spec.n_features():
        problems.append(f"the model reads {mc.n_features} feature rows but its FeatureSpec makes "
                        f"{spec.n_features()}: the bundle is inconsistent (re-export it)")
    if settings.get("encoder", mc.encoder) != mc.encoder:
        problems.append(f"{RUN_SETTINGS_FILE} says encoder {settings['encoder']!r} but the model uses "
                        f"{mc.encoder!r}: the settings belong to another run")
    if problems:
        raise AuditInputError(f"{root}: " + "; ".join(problems))
    from fedser.common.errors import FedserError
    from fedser.server.checkpoint import load_initial_model

    try:
        initial = load_initial_model(root)
    except FedserError as exc:
        raise AuditInputError(str(exc)) from exc
    if initial is not None and set(initial) != set(bundle.state):
        raise AuditInputError(f"{root}: its initial model's arrays differ from the final model's: the files "
                              "belong to different runs")
    devices = root / "devices"
    return RunInfo(
        run_dir=root, bundle=bundle, settings=settings, metrics=metrics,
        ledgers=sorted(devices.glob("device-*/ledger.json")),
        member_manifests=sorted(devices.glob("device-*/data.csv")),
        test_manifest=(devices / "test.csv") if (devices / "test.csv").exists() else None,
        initial=initial,
    )
