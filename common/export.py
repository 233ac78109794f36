"""Exported inference pipelines: waveform in, both heads' probabilities out.

``fedser export`` turns a run's model bundle into one self-contained file a device can
run without fedser's training stack: the feature front end, the encoder and both heads,
traced into TorchScript or ONNX. The file carries its own metadata (FeatureSpec, label
sets, class order, model and KWS head versions, privacy figures, training corpus), in
TorchScript's ``_extra_files`` (``fedser.json``) or ONNX ``metadata_props`` (key
``fedser``), so ``fedser-client listen`` can run from the exported file alone.

Every export is checked against the PyTorch model before it is kept
(``verify_export``): the largest absolute difference of the probabilities and the
share of identical top-1 classes on a batch of clips.

``open_model`` loads any of the three forms (bundle / run directory, TorchScript,
ONNX) behind one ``Runtime`` interface: ``probs(waves) -> {task: (B, n_classes)}``.

Two substitutions make the traced graphs portable; both are checked by the
verification against the original modules:

- ONNX has no complex tensors, so the ONNX pipeline computes the power spectrogram
  as a strided convolution with a windowed DFT basis (``DFTFrontEnd``), the same
  centred, zero-padded, periodic-Hann STFT as ``FrontEnd``.
- Opacus' ``DPGRU`` (a Python loop over time steps, which tracing would unroll to a
  fixed length) is swapped for ``nn.GRU`` with the same weights (``inference_copy``).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bundle import Bundle, fedser_version, load_bundle
from .errors import BundleError, ConfigError
from .features import FeatureSpec, FrontEnd
from .models import ModelConfig, MultiTaskNet, build_model
from .taxonomy import TASKS

EXPORT_FORMAT = "fedser-export"
EXPORT_VERSION = 1
FORMATS = ("torchscript", "onnx")
SUFFIXES = {"torchscript": ".pt", "onnx": ".onnx"}
METADATA_KEY = "fedser"            # ONNX metadata_props key
EXTRA_FILE = "fedser.json"         # TorchScript _extra_files name
ONNX_OPSET = 17
REQUIRED_METADATA = ("format", "version", "feature_spec", "labels", "classes")
DEFAULT_ATOL = 1e-4
# Trace with a batch of 2 and one KWS clip: every size in the graph stays symbolic.
_TRACE_BATCH = 2


# --------------------------------------------------------------------------- modules


class DFTFrontEnd(FrontEnd):
    """``FrontEnd`` whose power spectrogram is a real-valued strided convolution.

    Same shapes and values as ``FrontEnd`` (to float32 rounding: ~1e-6 relative on the
    power, a few 1e-6 on normalised features); used for ONNX, which has no complex
    tensors. The DFT basis ``(2 * n_freq, 1, win_length)`` holds the periodic Hann window
    times the DFT rows over the ``win_length`` samples the window covers, centred in
    ``n_fft`` as ``torch.stft`` places it.
    """

    def __init__(self, spec: FeatureSpec | None = None):
        super().__init__(spec)
        s = self.spec
        n_freq = s.n_fft // 2 + 1
        # Only the win_length samples under the window contribute: the kernel spans them,
        # with their phase taken at their position inside the n_fft frame.
        left = (s.n_fft - s.win_length) // 2
        window = torch.hann_window(s.win_length, periodic=True, dtype=torch.float64)
        position = torch.arange(left, left + s.win_length, dtype=torch.float64)
        angle = (2 * math.pi / s.n_fft) * torch.outer(torch.arange(n_freq, dtype=torch.float64), position)
        basis = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window])  # (2 * n_freq, win_length)
        self.register_buffer("dft_basis", basis.unsqueeze(1).to(torch.float32))
        self.n_freq = n_freq
        # torch.stft pads n_fft // 2 on each side; the kernel starts `left` samples into each frame.
        self.pad = s.n_fft // 2 - left
        self.hop = s.hop_length

    def power(self, wave: Tensor) -> Tensor:
        """``(B, T)`` or ``(T,)`` -> ``(B, n_fft // 2 + 1, 1 + T // hop_length)`` power spectrogram."""
        x = F.pad(self._batch(wave).unsqueeze(1), (self.pad, self.pad))  # (B, 1, T + win_length), centred frames
        z = F.conv1d(x, self.dft_basis, stride=self.hop)  # (B, 2 * n_freq, frames)
        re, im = z[:, : self.n_freq], z[:, self.n_freq:]
        return re.square() + im.square()


class InferencePipeline(nn.Module):
    """Front end + encoder + both heads: ``(B, T)`` waveform -> per-head probabilities.

    Returns ``(emotion (B, n_emotions), kws (B, n_keywords))`` softmax probabilities in
    the order of ``TASKS``. A head's classes outside the label set it was trained on
    get probability 0 (logit ``-inf``), as ``training.predict`` scores with ``allowed``.
    """

    def __init__(self, frontend: FrontEnd, model: MultiTaskNet, labels: dict[str, list[str]],
                 classes: dict[str, Sequence[str]]):
        super().__init__()
        self.frontend = frontend
        self.model = model
        for task in TASKS:
            names = list(classes[task])
            trained = labels.get(task) or names  # an untrained head: no mask (listen ignores it)
            mask = torch.tensor([0.0 if c in trained else float("-inf") for c in names])
            self.register_buffer(f"mask_{task}", mask)

    def forward(self, wave: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.model.embed(self.frontend(wave))  # (B, D)
        emotion = torch.softmax(self.model.heads["emotion"](emb) + self.mask_emotion, dim=-1)  # (B, n_emotions)
        kws = torch.softmax(self.model.heads["kws"](emb) + self.mask_kws, dim=-1)  # (B, n_keywords)
        return emotion, kws


def inference_copy(model: MultiTaskNet) -> MultiTaskNet:
    """An eval-mode copy of ``model`` with every Opacus ``DPGRU`` replaced by ``nn.GRU``.

    ``DPGRU`` keeps its weights under ``nn.GRU``'s names, so they load unchanged; the
    fused ``nn.GRU`` is faster and traces to a graph that accepts any sequence length.
    """
    clone = build_model(model.cfg)
    clone.load_state_dict(model.state_dict())
    clone.eval()
    for owner in list(clone.modules()):
        for name, child in list(owner.named_children()):
            if type(child).__name__ == "DPGRU":
                gru = nn.GRU(child.input_size, child.hidden_size, num_layers=child.num_layers, bias=child.bias,
                             batch_first=child.batch_first, bidirectional=child.bidirectional)
                gru.load_state_dict(child.state_dict())
                setattr(owner, name, gru.eval())
    return clone


def build_pipeline(bundle: Bundle, for_onnx: bool = False) -> InferencePipeline:
    """The eval-mode pipeline of ``bundle`` (``DFTFrontEnd`` when ``for_onnx``)."""
    frontend = (DFTFrontEnd if for_onnx else FrontEnd)(bundle.feature_spec).eval()
    return InferencePipeline(frontend, inference_copy(bundle.build_model()), bundle.labels, bundle.classes).eval()


# --------------------------------------------------------------------------- metadata


def export_metadata(bundle: Bundle, fmt: str, verification: dict | None = None) -> dict[str, Any]:
    """What an exported file carries besides the graph (JSON-ready)."""
    spec = bundle.feature_spec
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "fedser_version": fedser_version(),
        "input": {"name": "wave", "shape": ["batch", "samples"], "dtype": "float32",
                  "sample_rate": spec.sample_rate},
        "outputs": {t: {"shape": ["batch", len(bundle.classes[t])], "meaning": "probabilities"} for t in TASKS},
        "feature_spec": spec.to_dict(),
        "model_config": bundle.model_config.to_dict(),
        "labels": bundle.labels,
        "classes": {t: list(c) for t, c in bundle.classes.items()},
        "meta": bundle.meta,
        "export": {"format": fmt, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "torch": torch.__version__, **({"onnx_opset": ONNX_OPSET} if fmt == "onnx" else {}),
                   "verification": verification},
    }


def parse_metadata(raw: str | None, source: Path) -> dict[str, Any]:
    """Validate an exported file's metadata; ``BundleError`` names every missing part."""
    if not raw:
        raise BundleError(f"{source}: the file has no fedser metadata (feature_spec, labels, classes, versions); "
                          "export it with `fedser export` so it can be used on its own")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise BundleError(f"{source}: fedser metadata is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{source}: fedser metadata is not a JSON object")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise BundleError(f"{source}: exported model metadata is missing {', '.join(missing)}; "
                          "re-export it with this fedser version")
    if meta["format"] != EXPORT_FORMAT:
        raise BundleError(f"{source}: metadata format {meta['format']!r} is not {EXPORT_FORMAT!r}")
    if not isinstance(meta["version"], int) or meta["version"] > EXPORT_VERSION:
        raise BundleError(f"{source}: export version {meta['version']!r} is newer than this fedser understands "
                          f"({EXPORT_VERSION}); upgrade fedser or re-export with this version")
    try:
        meta["feature_spec"] = FeatureSpec.from_dict(meta["feature_spec"])
    except ConfigError as exc:
        raise BundleError(f"{source}: feature_spec in the metadata is invalid: {exc}") from exc
    return meta


# --------------------------------------------------------------------------- runtimes


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

    @property
    def tasks(self) -> list[str]:
        """Heads that were trained (and so give meaningful probabilities)."""
        return [t for t in TASKS if self.labels.get(t)]

    def probs(self, waves: np.ndarray) -> dict[str, np.ndarray]:
        """``(B, T)`` (or ``(T,)``) float32 at ``spec.sample_rate`` -> task -> ``(B, n_classes)``."""
        raise NotImplementedError

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

    def probs(self, waves: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = self.pipeline(torch.from_numpy(self._batch(waves)))
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

    def probs(self, waves: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = self.module(torch.from_numpy(self._batch(waves)))
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

    def probs(self, waves: np.ndarray) -> dict[str, np.ndarray]:
        out = self.session.run(None, {self.input_name: self._batch(waves)})
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


def detect_kind(path: str | Path) -> str:
    """``"bundle"``, ``"torchscript"`` or ``"onnx"``: by suffix first, then by content."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".fedser":
        return "bundle"
    if p.suffix == ".onnx":
        return "onnx"
    if p.suffix in (".pt", ".ts", ".torchscript", ".pth"):
        return "torchscript"
    if not p.exists():
        raise BundleError(f"no model at {p}")
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
        if any("/code/" in n or n.endswith("constants.pkl") for n in names):
            return "torchscript"
        return "bundle"
    with open(p, "rb") as fh:
        head = fh.read(1)
    if head == b"\x08":  # protobuf field 1 (ir_version), how every ONNX model starts
        return "onnx"
    raise BundleError(f"{p}: not a fedser bundle, TorchScript or ONNX model (unknown content; truncated?)")


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


# --------------------------------------------------------------------------- export + verification


@dataclass
class Verification:
    """Exported model vs the PyTorch pipeline on the same clips."""

    clips: dict[str, int]                       # task -> clips compared
    source: str                                 # where the clips came from
    max_abs_diff: dict[str, float]              # task -> largest |p_export - p_torch|
    top1_agreement: dict[str, float]            # task -> share of clips with the same top-1 class
    atol: float = DEFAULT_ATOL
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"clips": self.clips, "source": self.source, "max_abs_diff": self.max_abs_diff,
                "top1_agreement": self.top1_agreement, "atol": self.atol, "ok": self.ok}


def verify_export(reference: Runtime, exported: Runtime, clips: dict[str, np.ndarray], source: str,
                  atol: float = DEFAULT_ATOL) -> Verification:
    """Compare ``exported`` with ``reference`` on ``clips`` (task -> ``(N, T)`` waveforms).

    Each task's clips are scored by both heads; the task's own head is compared on
    top-1 and every head on the largest absolute probability difference.
    """
    diffs: dict[str, float] = {}
    agree: dict[str, float] = {}
    for task, waves in clips.items():
        ref, exp = reference.probs(waves), exported.probs(waves)
        for t in TASKS:
            diffs[t] = max(diffs.get(t, 0.0), float(np.abs(ref[t] - exp[t]).max()))
        agree[task] = float(np.mean(ref[task].argmax(1) == exp[task].argmax(1)))
    problems = [f"{t}: max abs difference {d:.2e} > {atol:.0e}" for t, d in diffs.items() if not d <= atol]
    problems += [f"{t}: top-1 differs on {1 - a:.1%} of {clips[t].shape[0]} clips" for t, a in agree.items()
                 if a < 1.0]
    return Verification({t: int(w.shape[0]) for t, w in clips.items()}, source, diffs, agree, atol, problems)


def _trace(pipeline: InferencePipeline, example: Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream in favour of torch.export, but it is still the
        # format the PyTorch Mobile / LibTorch runtimes on devices load.
        warnings.simplefilter("ignore")
        with torch.no_grad():
            return torch.jit.trace(pipeline, example, check_trace=False)


def _write_torchscript(traced: torch.jit.ScriptModule, meta: dict, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(meta, default=str)})


def _write_onnx(pipeline: InferencePipeline, example: Tensor, meta: dict, path: Path) -> None:
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs the onnx package: pip install 'fedser[tools]' "
                          "(or pip install onnx onnxruntime)") from None
    with warnings.catch_warnings():
        # The TorchScript-based exporter: the torch.export-based one cannot yet export
        # nn.GRU with a dynamic sequence length, and it needs onnxscript.
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(pipeline, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["wave"], output_names=list(TASKS),
                              dynamic_axes={"wave": {0: "batch", 1: "samples"},
                                            **{t: {0: "batch"} for t in TASKS}})
    set_onnx_metadata(path, meta)


def set_onnx_metadata(path: str | Path, meta: dict | None) -> None:
    """Write (or with ``None`` remove) the fedser entry of an ONNX file's metadata_props."""
    import onnx

    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    if meta is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(meta, default=str)
    onnx.save(model, str(path))


@dataclass
class ExportResult:
    path: Path
    fmt: str
    size_bytes: int
    verification: Verification
    seconds: float


def export_bundle(bundle: Bundle, fmt: str, out: str | Path, clips: dict[str, np.ndarray], clip_source: str,
                  atol: float = DEFAULT_ATOL) -> ExportResult:
    """Export ``bundle``'s pipeline to ``out`` and verify it on ``clips``.

    The file is written next to ``out`` under a temporary name, loaded back through
    ``open_model``'s runtime, compared with the PyTorch pipeline, and renamed into place
    only when the verification passes; otherwise ``BundleError`` lists the differences
    and nothing is left at ``out``.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format: expected one of {', '.join(FORMATS)}; got {fmt!r}")
    if not clips:
        raise ConfigError("export verification needs at least one clip")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    reference = TorchRuntime(bundle, Path("<bundle>"))
    example = torch.zeros(_TRACE_BATCH, bundle.feature_spec.clip_samples("kws"))
    example.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=".export-", suffix=SUFFIXES[fmt])
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if fmt == "torchscript":
            traced = _trace(build_pipeline(bundle), example)
            _write_torchscript(traced, export_metadata(bundle, fmt), tmp)
            exported: Runtime = TorchScriptRuntime(tmp)
        else:
            _write_onnx(build_pipeline(bundle, for_onnx=True), example, export_metadata(bundle, fmt), tmp)
            exported = OnnxRuntime(tmp)
        check = verify_export(reference, exported, clips, clip_source, atol)
        if not check.ok:
            raise BundleError(f"the {fmt} export does not match the PyTorch model on {clip_source}: "
                              + "; ".join(check.problems))
        meta = export_metadata(bundle, fmt, check.to_dict())
        if fmt == "torchscript":
            _write_torchscript(traced, meta, tmp)
        else:
            set_onnx_metadata(tmp, meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would keep the file from other users
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, fmt, out.stat().st_size, check, time.perf_counter() - t0)
