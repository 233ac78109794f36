"""Model bundles: everything a device or evaluator needs to use a trained model.

A bundle is one file (``model.fedser``) written by ``torch.save`` and read back with
``weights_only=True`` (no pickled code is ever executed on load). It holds the weights,
the ``ModelConfig``, the ``FeatureSpec`` the model was trained with, the label set of
each head it was trained on, the class order of each head's outputs, and metadata (model
version, KWS head version, privacy figures, training corpus description, the fedser
version that wrote it).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import BundleError
from .fsutil import atomic_write
from .features import FeatureSpec
from .models import ModelConfig, MultiTaskNet, build_model
from .params import arrays_to_state, state_to_arrays
from .taxonomy import CLASSES

BUNDLE_FILE = "model.fedser"
BUNDLE_FORMAT = "fedser-bundle"
BUNDLE_VERSION = 1
REQUIRED_PARTS = ("format", "version", "model_config", "feature_spec", "labels", "state")


@dataclass
class Bundle:
    model_config: ModelConfig
    feature_spec: FeatureSpec
    labels: dict[str, list[str]]          # task -> class names the head was trained on
    state: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)
    # task -> class names in the order of the head's outputs (the taxonomy's order when written)
    classes: dict[str, tuple[str, ...]] = field(default_factory=lambda: {t: tuple(c) for t, c in CLASSES.items()})

    @property
    def tasks(self) -> list[str]:
        return [t for t in ("emotion", "kws") if self.labels.get(t)]

    def build_model(self) -> MultiTaskNet:
        model = build_model(self.model_config)
        arrays_to_state(self.state, model)
        model.eval()
        return model

    @classmethod
    def from_model(cls, model: torch.nn.Module, model_config: ModelConfig, feature_spec: FeatureSpec,
                   labels: dict[str, list[str]], meta: dict | None = None) -> "Bundle":
        return cls(model_config, feature_spec, {k: list(v) for k, v in labels.items()},
                   state_to_arrays(model), dict(meta or {}))


def fedser_version() -> str:
    """The installed fedser distribution's version ("unknown" when run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedser")
    except PackageNotFoundError:
        return "unknown"


def bundle_path(path: str | Path) -> Path:
    """The bundle file for a run directory or a bundle file path."""
    p = Path(path)
    return p / BUNDLE_FILE if p.is_dir() else p


def save_bundle(bundle: Bundle, path: str | Path) -> Path:
    """Write atomically (temp file, fsync, rename); ``path`` is a run directory or a file."""
    target = bundle_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    meta = {"saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fedser_version": fedser_version(), **bundle.meta}
    payload = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "model_config": json.dumps(bundle.model_config.to_dict()),
        "feature_spec": json.dumps(bundle.feature_spec.to_dict()),
        "labels": json.dumps(bundle.labels),
        "classes": json.dumps({t: list(c) for t, c in bundle.classes.items()}),
        "meta": json.dumps(meta, default=str),
        "state": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in bundle.state.items()},
    }
    return atomic_write(target, lambda f: torch.save(payload, f))


def load_bundle(path: str | Path) -> Bundle:
    """Read a bundle from a run directory or a bundle file, with errors that name what is wrong."""
    target = bundle_path(path)
    if not target.exists():
        hint = " (is this a run directory of `fedser train` or `fedser demo`?)" if Path(path).is_dir() else ""
        raise BundleError(f"no model bundle at {target}{hint}")
    try:
        payload = torch.load(target, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, ...
        raise BundleError(f"{target}: not a readable fedser bundle (truncated or corrupt?): {exc}") from exc
    if not isinstance(payload, dict):
        raise BundleError(f"{target}: not a fedser bundle (unexpected content)")
    missing = [k for k in REQUIRED_PARTS if k not in payload]
    if missing:
        raise BundleError(f"{target}: bundle is missing {', '.join(missing)}; re-export it with this fedser version")
    if payload["format"] != BUNDLE_FORMAT:
        raise BundleError(f"{target}: format {payload['format']!r} is not {BUNDLE_FORMAT!r}")
    if int(payload["version"]) > BUNDLE_VERSION:
        raise BundleError(f"{target}: bundle version {payload['version']} is newer than this fedser "
                          f"understands ({BUNDLE_VERSION}); upgrade fedser")
    try:
        model_config = ModelConfig.from_dict(json.loads(payload["model_config"]))
        feature_spec = FeatureSpec.from_dict(json.loads(payload["feature_spec"]))
        labels = json.loads(payload["labels"])
        meta = json.loads(payload.get("meta") or "{}")
        # Bundles written before the class order was stored used the taxonomy's order.
        classes = {t: tuple(c) for t, c in json.loads(payload.get("classes") or "{}").items()}
    except Exception as exc:
        raise BundleError(f"{target}: bundle metadata is invalid: {exc}") from exc
    classes = {**{t: tuple(c) for t, c in CLASSES.items()}, **classes}
    problems = [f"{t} head has {model_config.n_classes(t)} outputs but {len(classes[t])} class names"
                for t in CLASSES if len(classes[t]) != model_config.n_classes(t)]
    problems += [f"{t} labels {sorted(set(names) - set(classes.get(t, ())))} are not classes of the {t} head"
                 for t, names in labels.items() if set(names) - set(classes.get(t, ()))]
    if problems:
        raise BundleError(f"{target}: bundle is inconsistent: " + "; ".join(problems))
    state = {k: v.numpy() for k, v in payload["state"].items()}
    return Bundle(model_config, feature_spec, labels, state, meta, classes)
