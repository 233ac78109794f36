"""The exporter behind ``fedser export``: a run's model bundle to one verified TorchScript or ONNX file.

Every export is checked against the PyTorch model before it is kept (``verify_export``): the
largest absolute difference of the probabilities and the share of identical top-1 classes on a
batch of clips. The file format is ``fedser.common.export_format``; devices load it with
``fedser.client.runtime.open_model``.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedser.client.runtime import OnnxRuntime, Runtime, TorchRuntime, TorchScriptRuntime
from fedser.common.bundle import Bundle
from fedser.common.errors import BundleError, ConfigError
from fedser.common.export_format import (
    EXTRA_FILE,
    FORMATS,
    METADATA_KEY,
    ONNX_OPSET,
    SUFFIXES,
    InferencePipeline,
    build_pipeline,
    export_metadata,
    takes_features,
)
from fedser.common.keys import TASKS

DEFAULT_ATOL = 1e-4
# Trace with a batch of 2 and one KWS clip: every size in the graph stays symbolic.
_TRACE_BATCH = 2


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
    name = "features" if example.dim() == 3 else "wave"
    with warnings.catch_warnings():
        # The TorchScript-based exporter: the torch.export-based one cannot yet export
        # nn.GRU with a dynamic sequence length, and it needs onnxscript.
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(pipeline, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=[name], output_names=list(TASKS),
                              dynamic_axes={name: {0: "batch", example.dim() - 1: "frames" if name == "features" else "samples"},
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
    spec = bundle.feature_spec
    n_samples = spec.clip_samples("kws")
    shape = ((_TRACE_BATCH, spec.n_features(), spec.n_frames(n_samples)) if takes_features(spec)
             else (_TRACE_BATCH, n_samples))
    example = torch.zeros(shape).normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
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
