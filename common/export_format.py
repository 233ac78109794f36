"""The exported-model format: what a file made by ``fedser export`` holds and how it is recognised.

An exported file is one self-contained inference pipeline a device can run without fedser's
training stack: waveform in, both heads' probabilities out (``InferencePipeline``: the feature
front end, the encoder and both heads), traced into TorchScript or ONNX. With the default
features (frozen public encoders, per-speaker normalisation) the file starts after the front
end: normalised feature maps in (``takes_features``); the device runs the frozen stages from
their own packages and keeps its running speaker statistics (``fedser.client.runtime``). It carries its own
metadata (FeatureSpec, label sets, class order, model and KWS head versions, privacy figures,
training corpus) in TorchScript's ``_extra_files`` (``fedser.json``) or ONNX ``metadata_props``
(key ``fedser``). The exporter is ``fedser.tools.export``; the runtimes that load it are
``fedser.client.runtime``.

Two substitutions make the traced graphs portable; the exporter's verification checks both
against the original modules:

- ONNX has no complex tensors, so the ONNX pipeline computes the power spectrogram
  as a strided convolution with a windowed DFT basis (``DFTFrontEnd``), the same
  centred, zero-padded, periodic-Hann STFT as ``FrontEnd``.
- Opacus' ``DPGRU`` (a Python loop over time steps, which tracing would unroll to a
  fixed length) is swapped for ``nn.GRU`` with the same weights (``inference_copy``).
"""
from __future__ import annotations

import json
import math
import time
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bundle import Bundle, fedser_version
from .errors import BundleError, ConfigError
from .features import FeatureSpec, FrontEnd
from .keys import TASKS
from .models import MultiTaskNet, build_model

EXPORT_FORMAT = "fedser-export"
EXPORT_VERSION = 1
FORMATS = ("torchscript", "onnx")
SUFFIXES = {"torchscript": ".pt", "onnx": ".onnx"}
METADATA_KEY = "fedser"            # ONNX metadata_props key
EXTRA_FILE = "fedser.json"         # TorchScript _extra_files name
ONNX_OPSET = 17
REQUIRED_METADATA = ("format", "version", "feature_spec", "labels", "classes")


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

    def __init__(self, frontend: nn.Module, model: MultiTaskNet, labels: dict[str, list[str]],
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


def takes_features(spec: FeatureSpec) -> bool:
    """Whether an exported pipeline of ``spec`` takes feature maps instead of waveforms.

    Frozen public encoders run under their own runtimes (onnxruntime, openSMILE), not inside a
    traced graph, and per-speaker normalisation needs the device's running statistics; so for
    such specs the device computes the features (``FrontEnd`` + ``RunningNormalizer``) and the
    exported file holds the trained part: ``(B, F, frames)`` normalised features in.
    """
    return bool(spec.frozen_kinds()) or spec.normalize == "speaker"


def build_pipeline(bundle: Bundle, for_onnx: bool = False) -> InferencePipeline:
    """The eval-mode pipeline of ``bundle`` (``DFTFrontEnd`` when ``for_onnx``; no front end at all
    when the pipeline ``takes_features``)."""
    if takes_features(bundle.feature_spec):
        frontend: nn.Module = nn.Identity()
    else:
        frontend = (DFTFrontEnd if for_onnx else FrontEnd)(bundle.feature_spec).eval()
    return InferencePipeline(frontend, inference_copy(bundle.build_model()), bundle.labels, bundle.classes).eval()


def export_metadata(bundle: Bundle, fmt: str, verification: dict | None = None) -> dict[str, Any]:
    """What an exported file carries besides the graph (JSON-ready)."""
    spec = bundle.feature_spec
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "fedser_version": fedser_version(),
        "input": ({"name": "features", "shape": ["batch", spec.n_features(), "frames"], "dtype": "float32",
                   "made_by": f"the frozen stages {', '.join(spec.frozen_kinds()) or 'none'} and per-speaker "
                              "normalisation (fedser.client.runtime)", "sample_rate": spec.sample_rate}
                  if takes_features(spec) else
                  {"name": "wave", "shape": ["batch", "samples"], "dtype": "float32",
                   "sample_rate": spec.sample_rate}),
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
