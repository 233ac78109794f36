"""Run a model on the device in any of its three forms behind one ``Runtime`` interface:
``probs(waves) -> {task: (B, n_classes)}``.

``open_model`` loads a run directory or bundle (PyTorch), a TorchScript export or an ONNX export
(ONNX Runtime, from the ``fedser[client]`` extra); an exported file needs nothing but its own
metadata (``fedser.common.export_format``).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from fedser.common.bundle import Bundle, load_bundle
from fedser.common.errors import BundleError, ConfigError
from fedser.common.export_format import (
    EXTRA_FILE,
    METADATA_KEY,
    build_pipeline,
    detect_kind,
    parse_metadata,
    takes_features,
)
from fedser.common.features import FeatureSpec, FrontEnd
from fedser.common.normalization import RunningNormalizer
from fedser.common.keys import TASKS
from fedser.common.models import ModelConfig


class Runtime:
    """A loaded model in any form: ``probs(waves)`` and what a listener needs to know.

    Attributes:
        kind: ``"bundle"``, ``"torchscript"`` or ``"onnx"``.
        source: the file it was read from.
        spec: the ``FeatureSpec`` (sample rate and clip lengths of the input).
        labels: task -> class names the head was trained on (only trained heads).
        classes: task -> class names in the order of the head's outputs.
        meta: model version, KWS head version, privacy figures, corpus, ...
        model_config: the ``ModelConfig`` (None if an exported file does not say).
        export_info: how an exported file was made and verified (None for a bundle).
    """

    kind: str
    source: Path
    spec: FeatureSpec
    labels: dict[str, list[str]]
    classes: dict[str, tuple[str, ...]]
    meta: dict
    model_config: ModelConfig | None = None
    export_info: dict | None = None
    normalizer: RunningNormalizer | None = None
    _frontend: FrontEnd | None = None

    @property
    def tasks(self) -> list[str]:
        """Heads that were trained (and so give meaningful probabilities)."""
        return [t for t in TASKS if self.labels.get(t)]

    def probs(self, waves: np.ndarray) -> dict[str, np.ndarray]:
        """``(B, T)`` (or ``(T,)``) float32 at ``spec.sample_rate`` -> task -> ``(B, n_classes)``.

        With frozen encoders the features are computed here and normalised with the running
        statistics of everything this runtime has heard (``normalizer``: the device's speaker).
        """
        return self._run(self._inputs(waves))

    def _run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _inputs(self, waves: np.ndarray) -> np.ndarray:
        batch = self._batch(waves)
        if not takes_features(self.spec):
            return batch
        if self._frontend is None:
            self._frontend = FrontEnd(self.spec).eval()
        if self.normalizer is None:
            self.normalizer = RunningNormalizer()
        with torch.inference_mode():
            feats = self._frontend(torch.from_numpy(batch))
            return np.ascontiguousarray(self.normalizer(feats).numpy(), dtype=np.float32)

    def describe(self) -> str:
        m = self.meta
        return (f"{self.kind} model {self.source} (model version {m.get('model_version', '?')}, "
                f"KWS head version {m.get('kws_head_version', '?')}, heads: {', '.join(self.tasks) or 'none'})")

    @staticmethod
    def _batch(waves: np.ndarray) -> np.ndarray:
        w = np.asarray(waves, dtype=np.float32)
        return np.ascontiguousarray(w[None] if w.ndim == 1 else w)


class TorchRuntime(Runtime):
    """A bundle (or run directory) run with PyTorch; ``pipeline.model`` is the eval-mode model."""

    kind = "bundle"

    def __init__(self, bundle: Bundle, source: Path):
        self.bundle = bundle
        self.source = source
        self.spec = bundle.feature_spec
        self.labels = {t: list(v) for t, v in bundle.labels.items() if v}
        self.classes = dict(bundle.classes)
        self.meta = dict(bundle.meta)
        self.model_config = bundle.model_config
        self.pipeline = build_pipeline(bundle)

    def _run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = self.pipeline(torch.from_numpy(inputs))
        return {t: o.numpy() for t, o in zip(TASKS, out)}


class TorchScriptRuntime(Runtime):
    kind = "torchscript"

    def __init__(self, path: Path):
        extra = {EXTRA_FILE: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                self.module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as exc:
            raise BundleError(f"{path}: not a readable TorchScript model (truncated or corrupt?): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        raw = extra[EXTRA_FILE]
        _init_from_metadata(self, parse_metadata(raw.decode() if isinstance(raw, bytes) else raw, path), path)
        self.module.eval()

    def _run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = self.module(torch.from_numpy(inputs))
        return {t: o.numpy() for t, o in zip(TASKS, out)}


class OnnxRuntime(Runtime):
    kind = "onnx"

    def __init__(self, path: Path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("running an ONNX model needs onnxruntime: pip install 'fedser[client]' "
                              "(or pip install onnxruntime)") from None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BundleError(f"{path}: not a readable ONNX model (truncated or corrupt?): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        _init_from_metadata(self, parse_metadata(raw, path), path)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        out = self.session.run(None, {self.input_name: inputs})
        return dict(zip(self.output_names, out))


def _init_from_metadata(rt: Runtime, meta: dict, path: Path) -> None:
    rt.source = path
    rt.spec = meta["feature_spec"]
    rt.labels = {t: list(v) for t, v in meta["labels"].items() if v}
    rt.classes = {t: tuple(v) for t, v in meta["classes"].items()}
    rt.meta = dict(meta.get("meta") or {})
    rt.export_info = meta.get("export") or {}
    rt.model_config = ModelConfig.from_dict(meta["model_config"]) if meta.get("model_config") else None
    missing = [t for t in TASKS if t not in rt.classes]
    if missing:
        raise BundleError(f"{path}: exported model metadata has no class names for the {', '.join(missing)} head")


def open_model(path: str | Path, threads: int | None = None) -> Runtime:
    """Load a run directory / bundle file, a TorchScript export or an ONNX export.

    ``threads`` sets the intra-op threads of ONNX Runtime sessions (PyTorch's are
    process-wide: set them with ``torch.set_num_threads``). Raises ``BundleError`` naming
    what is missing or unreadable.
    """
    p = Path(path)
    if not p.exists():
        raise BundleError(f"no model at {p} (give a run directory, a model.fedser bundle, or an exported "
                          ".pt / .onnx file)")
    kind = detect_kind(p)
    if kind == "bundle":
        return TorchRuntime(load_bundle(p), p)
    if kind == "torchscript":
        return TorchScriptRuntime(p)
    return OnnxRuntime(p, threads)
