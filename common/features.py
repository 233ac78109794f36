"""The feature front end shared by devices, the server and on-device inference.

``FeatureSpec`` says what features a model eats; ``FrontEnd`` is the one
``nn.Module`` that turns a batch of 16 kHz waveforms into them. The spec travels
with every model bundle, so a device builds exactly the front end the model was
trained with.

Feature kinds (stacked along the feature axis in the order given in ``kinds``):

- ``"speech-embedding"`` (default): Google's speech_embedding, a frozen public encoder,
  96 rows, one frame every 80 ms (``fedser.common.encoders``).
- ``"egemaps"`` (default): openSMILE's eGeMAPSv02 functionals, 88 rows, one per clip,
  repeated along the frames of any sequence kind it is stacked with.
- ``"logmel"``: log power mel spectrogram in dB (``n_mels`` rows).
- ``"mfcc"``: DCT-II (orthonormal) of that log-mel spectrogram (``n_mfcc`` rows).
- ``"chroma"``: chroma filterbank of the power spectrum, each frame scaled so its
  largest bin is 1 (``n_chroma`` rows).
- ``"waveform"``: the samples themselves (one row, one frame per sample) for raw-waveform
  encoders such as ``m5``; it stacks with no other kind.

The spectral kinds (log-mel, MFCC, chroma) share one STFT: centred frames, zero
("constant") padding, periodic Hann window of ``win_length`` zero-padded to ``n_fft``,
power 2. The mel filterbank is librosa's default (Slaney mel scale, Slaney area
normalisation), so the raw features match ``librosa.feature.melspectrogram`` /
``power_to_db`` / ``mfcc`` / ``chroma_stft(tuning=0)`` called with the same settings.
Stacked with speech_embedding, spectral frames are averaged onto its 80 ms grid.

The frozen kinds run once per clip under their own runtimes and are cached with the
other features; they have no trainable weights, so nothing of them ever travels.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import librosa
import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
import torchaudio.transforms as AT
from torch import nn

from . import encoders
from .errors import ConfigError, collect

SPECTRAL_KINDS = ("logmel", "mfcc", "chroma")
FROZEN_KINDS = tuple(encoders.STAGES)
# The samples themselves, one row, for raw-waveform encoders (``m5``); stacks with nothing.
WAVEFORM = "waveform"
KINDS = FROZEN_KINDS + SPECTRAL_KINDS + (WAVEFORM,)
TASK_SECONDS_FIELD = {"kws": "kws_seconds", "emotion": "emotion_seconds"}
# "speaker": no per-clip normalisation here; each speaker's features are standardised with that
# speaker's own statistics (``fedser.common.normalization``). "utterance": each clip by itself.
NORMALIZE_MODES = ("speaker", "utterance", "none")
FIT_MODES = ("center", "random", "start")

# Log floor: absolute (power 1e-10, i.e. -100 dB) and relative (80 dB below the
# loudest mel bin of the same utterance), librosa's power_to_db defaults. The
# relative floor keeps digital silence (zero padding) from producing -100 dB
# outliers that would dominate the per-utterance statistics.
AMIN = 1e-10
TOP_DB = 80.0
# Floor of the per-row standard deviation in utterance normalisation; keeps
# constant rows (silence, a masked band) finite.
STD_FLOOR = 1e-3


@dataclass(frozen=True)
class FeatureSpec:
    """What features a model eats, and how long its clips are.

    Attributes:
        kinds: feature kinds among ``KINDS``, stacked in this order.
        sample_rate: waveform sample rate in Hz (the front end does not resample).
        n_fft: FFT size in samples.
        win_length: analysis window in samples (``<= n_fft``); 400 = 25 ms at 16 kHz.
        hop_length: hop between frames in samples; 160 = 10 ms at 16 kHz.
        n_mels: mel bands of ``"logmel"`` (and the mel stage of ``"mfcc"``).
        n_mfcc: cepstral coefficients of ``"mfcc"`` (``<= n_mels``).
        n_chroma: chroma bins of ``"chroma"``.
        kws_seconds: clip length for the keyword-spotting task.
        emotion_seconds: clip length for the emotion task.
        normalize: ``"speaker"`` (each feature row standardised with the statistics of its
            speaker's own clips, after the front end: ``fedser.common.normalization``),
            ``"utterance"`` (each row to zero mean, unit variance over the frames of its own
            clip, inside the front end) or ``"none"``.

    Construction validates every field and raises ``ConfigError`` listing all problems.
    """

    kinds: tuple[str, ...] = ("speech-embedding", "egemaps")
    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 40
    n_mfcc: int = 20
    n_chroma: int = 12
    kws_seconds: float = 1.0
    emotion_seconds: float = 3.0
    normalize: str = "speaker"

    def __post_init__(self) -> None:
        # Accept a list (e.g. from JSON) but store a tuple so the spec stays hashable.
        if isinstance(self.kinds, (list, tuple)):
            object.__setattr__(self, "kinds", tuple(self.kinds))
        collect(_problems(asdict(self)), ConfigError, prefix="FeatureSpec")
        # Plain Python types (numpy ints, an int number of seconds) so to_dict() is JSON-ready
        # and equal specs compare and fingerprint equal.
        for name, value in _coerce(asdict(self)).items():
            object.__setattr__(self, name, value)

    # -- sizes ---------------------------------------------------------------
    def n_features(self) -> int:
        """Rows of the stacked feature matrix (the ``F`` of ``(B, F, frames)``)."""
        size = {"logmel": self.n_mels, "mfcc": self.n_mfcc, "chroma": self.n_chroma, WAVEFORM: 1,
                **encoders.STAGE_DIMS}
        return sum(size[k] for k in self.kinds)

    def frozen_kinds(self) -> tuple[str, ...]:
        """The frozen public encoder stages among ``kinds`` (computed outside torch, never trained)."""
        return tuple(k for k in self.kinds if k in FROZEN_KINDS)

    def clip_samples(self, task: str) -> int:
        """Samples in one clip of ``task`` (``"kws"`` or ``"emotion"``)."""
        if task not in TASK_SECONDS_FIELD:
            raise ConfigError(f"task: unknown task {task!r}; allowed: {', '.join(TASK_SECONDS_FIELD)}")
        return int(round(getattr(self, TASK_SECONDS_FIELD[task]) * self.sample_rate))

    def n_frames(self, n_samples: int) -> int:
        """Frames the front end yields for ``n_samples`` samples.

        The coarsest sequence kind sets the grid: speech_embedding's 80 ms steps when it is
        stacked, else the centred STFT's hops; eGeMAPS alone is one frame per clip.
        """
        if WAVEFORM in self.kinds:
            return int(n_samples)
        if "speech-embedding" in self.kinds:
            return encoders.embedding_frames(n_samples)
        if any(k in SPECTRAL_KINDS for k in self.kinds):
            return 1 + int(n_samples) // self.hop_length
        return 1

    # -- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``FeatureSpec.from_dict(spec.to_dict()) == spec``."""
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeatureSpec":
        """Build a spec from a dict; missing keys take their defaults.

        Raises:
            ConfigError: naming every unknown key and every bad value with its allowed values.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"FeatureSpec: expected a mapping; got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        problems = [
            f"{k}: unknown field; allowed: {', '.join(names)}" for k in d if k not in names
        ]
        values = {**asdict(cls()), **{k: v for k, v in d.items() if k in names}}
        problems += _problems(values)
        collect(problems, ConfigError, prefix="FeatureSpec")
        return cls(**values)

    def fingerprint(self) -> str:
        """Stable 16-hex-digit hash of ``to_dict()``; equal specs have equal fingerprints."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def spec_for(kinds: str | tuple[str, ...] | list[str]) -> FeatureSpec:
    """The spec for ``kinds`` (a tuple, or a comma-separated string as run settings carry it) with
    their natural normalisation: per speaker when a frozen encoder is stacked, else per utterance."""
    if isinstance(kinds, str):
        kinds = tuple(k.strip() for k in kinds.split(",") if k.strip())
    kinds = tuple(kinds)
    frozen = any(k in FROZEN_KINDS for k in kinds)
    return FeatureSpec(kinds=kinds, normalize="speaker" if frozen else "utterance")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _problems(v: dict[str, Any]) -> list[str]:
    """Every problem with the field values ``v`` (all fields present), as messages."""
    problems: list[str] = []

    kinds = v["kinds"]
    if isinstance(kinds, str) or not isinstance(kinds, (list, tuple)) or not kinds:
        problems.append(f"kinds: expected a non-empty list drawn from {', '.join(KINDS)}; got {kinds!r}")
    else:
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            problems.append(f"kinds: unknown kind(s) {', '.join(map(repr, bad))}; allowed: {', '.join(KINDS)}")
        if WAVEFORM in kinds and len(kinds) > 1:
            problems.append(f"kinds: {WAVEFORM!r} is the raw samples and stacks with no other kind; got {list(kinds)}")
        dup = sorted({k for k in kinds if list(kinds).count(k) > 1 and k in KINDS})
        if dup:
            problems.append(f"kinds: {', '.join(dup)} listed more than once")

    def int_in(name: str, lo: int, hi: int | None = None, hint: str = "") -> bool:
        x = v[name]
        if _is_int(x) and x >= lo and (hi is None or x <= hi):
            return True
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        problems.append(f"{name}: expected an integer {rng}{hint}; got {x!r}")
        return False

    int_in("sample_rate", 1000)
    fft_ok = int_in("n_fft", 16)
    n_fft = int(v["n_fft"]) if fft_ok else None
    int_in("win_length", 1, n_fft, " (n_fft)" if n_fft else "")
    int_in("hop_length", 1)
    n_freq = n_fft // 2 + 1 if n_fft else None
    mels_ok = int_in("n_mels", 1, n_freq, " (n_fft // 2 + 1)" if n_freq else "")
    n_mels = int(v["n_mels"]) if mels_ok else None
    int_in("n_mfcc", 1, n_mels, " (n_mels)" if n_mels else "")
    int_in("n_chroma", 1, n_freq, " (n_fft // 2 + 1)" if n_freq else "")

    for name in TASK_SECONDS_FIELD.values():
        x = v[name]
        if not (_is_number(x) and 0 < float(x) <= 600):
            problems.append(f"{name}: expected a number of seconds in (0, 600]; got {x!r}")

    if v["normalize"] not in NORMALIZE_MODES:
        problems.append(f"normalize: expected one of {', '.join(NORMALIZE_MODES)}; got {v['normalize']!r}")
    return problems


def _coerce(v: dict[str, Any]) -> dict[str, Any]:
    """Plain Python types for already-validated values (numpy ints, ints given as seconds)."""
    out = dict(v)
    out["kinds"] = tuple(v["kinds"])
    for f in fields(FeatureSpec):
        if f.name in ("kinds", "normalize"):
            continue
        out[f.name] = float(v[f.name]) if f.name in TASK_SECONDS_FIELD.values() else int(v[f.name])
    return out


def chroma_filterbank(spec: FeatureSpec) -> torch.Tensor:
    """librosa's chroma filterbank, ``(n_chroma, n_fft // 2 + 1)`` float32; tuning fixed at 0 so
    the front end never estimates pitch per clip."""
    bank = librosa.filters.chroma(sr=spec.sample_rate, n_fft=spec.n_fft, n_chroma=spec.n_chroma, tuning=0.0)
    return torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))


class FrontEnd(nn.Module):
    """Waveforms to stacked features, batched.

    The spectral kinds are computed entirely in torch (and script); the frozen encoder
    stages run under their own runtimes, one clip at a time. Built like ``torchaudio.transforms.MelSpectrogram``: all settings come from the
    ``FeatureSpec`` given to the constructor and the filterbanks are registered
    buffers, so ``.to(device)`` moves everything and ``forward`` runs no numpy.

    Shapes:
        input: ``(B, T)`` or ``(T,)`` float waveform at ``spec.sample_rate``.
        output: ``(B, F, frames)`` float32 with ``F = spec.n_features()`` and
        ``frames = spec.n_frames(T) = 1 + T // hop_length``; a ``(T,)`` input gives ``B = 1``.

    Normalisation (``spec.normalize == "utterance"``; the default, ``"speaker"``, happens after
    the front end, in ``fedser.common.normalization``): every feature row
    is shifted to zero mean and scaled to unit variance over the frames of its own
    clip (standard deviation floored at ``STD_FLOOR``). It is stateless, so no
    corpus-wide statistics have to be estimated, shared or kept in sync between
    devices (which would leak data and drift in a federation); it removes the
    microphone/channel gain that differs from device to device (a constant offset in
    the log domain); and because it lives inside this module, training and inference
    cannot disagree. The cost is that the absolute level of a clip is not a feature;
    relative loudness changes within a clip are kept. Log features are floored at
    -100 dB and at 80 dB below the clip's loudest bin (``AMIN``, ``TOP_DB``) so zero
    padding cannot dominate the statistics.

    Raw (pre-normalisation) features of one kind: ``raw(kind, wave)``. For the same
    settings they match librosa (``melspectrogram`` + ``power_to_db(top_db=80)``,
    ``mfcc``, ``chroma_stft(tuning=0)``) within 0.01 dB for log-mel, 0.01 for MFCC
    coefficients and 1e-4 for chroma on float32 input (checked in
    ``tests/common/test_features.py``).
    """

    def __init__(self, spec: FeatureSpec | None = None):
        super().__init__()
        self.spec = spec if spec is not None else FeatureSpec()
        s = self.spec
        self.kinds = list(s.kinds)
        self.frozen = list(s.frozen_kinds())
        self.has_frozen = bool(self.frozen)  # plain bools, so forward still scripts
        self.raw_waveform = self.kinds == [WAVEFORM]
        self.normalize = s.normalize == "utterance"
        # Constants as attributes so TorchScript can compile forward.
        self.amin = AMIN
        self.top_db = TOP_DB
        self.std_floor = STD_FLOOR
        self.tiny = float(torch.finfo(torch.float32).tiny)
        self.spectrogram = AT.Spectrogram(
            n_fft=s.n_fft,
            win_length=s.win_length,
            hop_length=s.hop_length,
            power=None,  # complex out; power computed in power() (abs() of complex is slow)
            center=True,
            pad_mode="constant",
        )
        self.mel_scale = AT.MelScale(
            n_mels=s.n_mels,
            sample_rate=s.sample_rate,
            f_min=0.0,
            f_max=s.sample_rate / 2,
            n_stft=s.n_fft // 2 + 1,
            norm="slaney",
            mel_scale="slaney",
        )
        # DCT-II, orthonormal: (n_mels, n_mfcc), as torchaudio.transforms.MFCC builds it.
        self.register_buffer("dct_mat", AF.create_dct(s.n_mfcc, s.n_mels, norm="ortho"))
        # Built only for a spec that stacks chroma: librosa's filterbank code loads numba, about
        # 190 MB of a device's memory. ``raw("chroma")`` builds it on first use otherwise.
        self.register_buffer("chroma_fb", chroma_filterbank(s) if "chroma" in self.kinds
                             else torch.zeros(0, s.n_fft // 2 + 1))

    def extra_repr(self) -> str:
        return f"kinds={tuple(self.kinds)}, n_features={self.spec.n_features()}, normalize={self.spec.normalize!r}"

    @staticmethod
    def _batch(wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() == 1:
            wave = wave.unsqueeze(0)
        if wave.dim() != 2:
            raise ValueError("FrontEnd expects a (B, T) or (T,) waveform; got " + str(wave.dim()) + " dimensions")
        return wave.to(torch.float32)

    def power(self, wave: torch.Tensor) -> torch.Tensor:
        """Power spectrogram: ``(B, T)`` or ``(T,)`` -> ``(B, n_fft // 2 + 1, frames)``."""
        spec = self.spectrogram(self._batch(wave))  # complex (B, n_freq, frames)
        # |z|^2 as re^2 + im^2: several times faster than torchaudio's abs().pow(2), same value.
        return spec.real.square() + spec.imag.square()

    def _db(self, power_mel: torch.Tensor) -> torch.Tensor:
        # (B, n_mels, frames) power -> dB with the absolute and per-utterance relative floor.
        db = 10.0 * torch.log10(torch.clamp(power_mel, min=self.amin))
        peak = db.amax(dim=(-2, -1), keepdim=True)
        return torch.maximum(db, peak - self.top_db)

    def _logmel(self, power: torch.Tensor) -> torch.Tensor:
        return self._db(self.mel_scale(power))

    def _mfcc(self, logmel: torch.Tensor) -> torch.Tensor:
        # (B, n_mels, frames) -> (B, n_mfcc, frames)
        return torch.matmul(logmel.transpose(-2, -1), self.dct_mat).transpose(-2, -1)

    def _chroma(self, power: torch.Tensor) -> torch.Tensor:
        raw = torch.matmul(self.chroma_fb, power)  # (B, n_chroma, frames)
        # Each frame scaled so its largest bin is 1 (librosa's norm=inf); silent frames stay 0.
        peak = raw.amax(dim=-2, keepdim=True)
        return raw / torch.clamp(peak, min=self.tiny)

    def raw(self, kind: str, wave: torch.Tensor) -> torch.Tensor:
        """One kind of feature before normalisation.

        ``(B, T)`` or ``(T,)`` -> ``(B, n_kind, frames)``: log-mel in dB, MFCC, or chroma in [0, 1].
        ``kind`` need not be in ``spec.kinds``.
        """
        power = self.power(wave)
        if kind == "logmel":
            return self._logmel(power)
        if kind == "mfcc":
            return self._mfcc(self._logmel(power))
        if kind == "chroma":
            if self.chroma_fb.numel() == 0:
                self.chroma_fb = chroma_filterbank(self.spec).to(self.dct_mat.device)
            return self._chroma(power)
        raise ValueError(f"unknown feature kind {kind!r}; allowed: {', '.join(KINDS)}")

    def _spectral(self, wave: torch.Tensor) -> list[torch.Tensor]:
        # The spectral kinds in ``kinds`` order, each (B, n_kind, stft frames), from one STFT.
        power = self.power(wave)  # (B, n_freq, frames), shared by every kind
        logmel = self._logmel(power) if ("logmel" in self.kinds or "mfcc" in self.kinds) else power
        parts = []
        for kind in self.kinds:
            if kind == "logmel":
                parts.append(logmel)
            elif kind == "mfcc":
                parts.append(self._mfcc(logmel))
            elif kind == "chroma":
                parts.append(self._chroma(power))
        return parts

    def _normalize(self, feats: torch.Tensor) -> torch.Tensor:
        # Shift by the first frame before averaging: constant rows (silence) then come
        # out exactly 0 instead of float32 rounding noise of a large mean.
        feats = feats - feats[..., :1]
        feats = feats - feats.mean(dim=-1, keepdim=True)
        std = feats.pow(2).mean(dim=-1, keepdim=True).sqrt()
        return feats / torch.clamp(std, min=self.std_floor)

    @torch.jit.unused
    def _with_frozen(self, wave):  # no annotations: TorchScript reads this signature, not the body
        # Frozen stages run under their own runtimes, one clip at a time, without gradients.
        n_frames = self.spec.n_frames(wave.shape[-1])
        spectral = iter(self._spectral(wave) if len(self.frozen) < len(self.kinds) else [])
        rows = wave.detach().cpu().numpy()
        parts = []
        for kind in self.kinds:
            if kind in FROZEN_KINDS:
                run = encoders.stage(kind)
                part = torch.from_numpy(np.stack([run(row) for row in rows]))
            else:
                part = next(spectral)
            if part.shape[-1] == 1:
                part = part.expand(-1, -1, n_frames)  # one value per clip, repeated along the sequence
            elif part.shape[-1] != n_frames:
                part = F.adaptive_avg_pool1d(part, n_frames)  # onto the embedding's coarser grid
            parts.append(part)
        return torch.cat(parts, dim=-2).contiguous()

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` or ``(T,)`` waveform -> ``(B, F, frames)`` float32 features."""
        wave = self._batch(wave)
        if self.raw_waveform:
            feats = wave.unsqueeze(1)  # (B, 1, T)
        elif self.has_frozen:
            feats = self._with_frozen(wave)
        else:
            parts = self._spectral(wave)
            feats = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)  # (B, F, frames)
        if self.normalize:
            feats = self._normalize(feats)
        return feats


def fit_length(
    wave: np.ndarray,
    n_samples: int,
    mode: str = "center",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Crop or zero-pad the last axis of ``wave`` to exactly ``n_samples``.

    ``(..., T)`` -> ``(..., n_samples)`` float32, always a new array.

    Modes:
        ``"center"`` (evaluation): crop the middle; pad equally on both sides.
        ``"random"`` (training): crop at a random start; place a short clip at a random
            offset inside the zeros (a time-shift augmentation). Uses ``rng``
            (``np.random.default_rng()`` when None).
        ``"start"``: keep the beginning; pad at the end.
    """
    if mode not in FIT_MODES:
        raise ConfigError(f"mode: expected one of {', '.join(FIT_MODES)}; got {mode!r}")
    if not _is_int(n_samples) or n_samples < 1:
        raise ConfigError(f"n_samples: expected an integer >= 1; got {n_samples!r}")
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 0:
        raise ValueError("fit_length expects a waveform with a time axis; got a scalar")
    n = int(n_samples)
    length = wave.shape[-1]
    slack = abs(length - n)
    if mode == "start" or slack == 0:
        start = 0
    elif mode == "center":
        start = slack // 2
    else:
        start = int((rng if rng is not None else np.random.default_rng()).integers(0, slack + 1))
    if length >= n:
        return np.array(wave[..., start : start + n], dtype=np.float32)
    pad = [(0, 0)] * (wave.ndim - 1) + [(start, slack - start)]
    return np.pad(wave, pad).astype(np.float32, copy=False)
