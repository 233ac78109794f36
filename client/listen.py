"""On-device streaming inference: keywords as they are spoken, the emotion of each utterance.

A ``Listener`` consumes a 16 kHz mono stream in hops (100 ms by default):

1. Conditioning: NaN/Inf samples become 0 (with a notice) and a one-pole high-pass at
   ``dc_cutoff_hz`` removes any DC offset, so neither reaches the model or the VAD.
2. Voice activity: ``EnergyVAD`` (adaptive noise floor) opens and closes voiced segments.
3. Keywords: while voice was heard in the last ``voice_recent_s`` (the newer half of
   the window; scoring starts once the stream has filled one window), the keyword head
   scores the window, the last KWS clip length (1 s) of audio. Windows holding only the
   tail of a word, at their old edge, are not scored: the model was trained on words
   near the middle of the clip and guesses on tails; probabilities are averaged over the last
   ``smooth_s`` seconds of hops. When a command word becomes the top class with a
   smoothed probability of at least ``threshold`` (and no keyword fired in the last
   ``refractory_s``, and it is not the keyword reported last unless a new voiced
   segment has begun since: one word is reported once however long it stays in the
   window), it becomes a candidate; the candidate follows the rising
   probability and is reported at its peak (the first hop that does not improve on
   it, at most ``peak_wait_s`` after it appeared), so the decision is taken on the window
   that holds the word best. ``_unknown_`` and ``_silence_`` are never reported.
4. Emotion: when a segment closes, the emotion head classifies its audio (shorter
   segments are centred in one emotion clip, longer ones are cut into clips whose
   probabilities are averaged) and the segment is reported with its label.

Every model re-runs the whole window each hop (``recurrent="window"``, the default):
for a recurrent encoder that is a GRU started from zero one window back, exactly the
per-clip computation it was trained on. Recurrent encoders (``crnn``, PyTorch bundles)
can instead keep their GRU state across hops (``recurrent="state"``): the convolutions
run over the current window, the GRU advances only over the new steps, the keyword head
pools the GRU outputs of the last window, and the state is reset when the voiced segment
ends. ``"carry"`` never resets the state and exists to measure what a missing reset
costs. With the per-utterance feature normalisation of ``FrontEnd`` a frame's features
depend on the window it is computed in, so the steps a carried state has seen were
normalised against other windows than the ones it is pooled with: the state modes
detect fewer keywords than re-running the window (see ``bench/results/streaming.md``),
which is why they are not the default.

Events: ``KeywordEvent`` (``12.34s keyword=stop p=0.97``) and ``EmotionEvent``
(``15.10-17.80s emotion=angry p=0.71``); ``to_dict()`` is the ``--json`` line.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np
import torch
from scipy.signal import lfilter

from fedser.common import audio
from fedser.common.errors import AudioDecodeError, ConfigError, collect
from .runtime import Runtime, TorchRuntime, open_model
from fedser.common.features import fit_length
from fedser.common.models import stats_pool
from fedser.common.taxonomy import SILENCE, UNKNOWN

from .vad import EnergyVAD, Segment, VADConfig

RECURRENT_MODES = ("window", "state", "carry")
NOT_KEYWORDS = frozenset({UNKNOWN, SILENCE})
STDIN_FORMATS = ("auto", "wav", "f32", "s16")

Notice = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class KeywordEvent:
    """A spotted command word; ``time`` is the stream time (s) at which it was detected."""

    keyword: str
    time: float
    p: float

    def to_dict(self) -> dict:
        return {"type": "keyword", "keyword": self.keyword, "time": round(self.time, 2), "p": round(self.p, 3)}

    def __str__(self) -> str:
        return f"{self.time:.2f}s keyword={self.keyword} p={self.p:.2f}"


@dataclass(frozen=True)
class EmotionEvent:
    """The emotion of one voiced segment ``[start, end]`` (stream seconds)."""

    emotion: str
    start: float
    end: float
    p: float

    def to_dict(self) -> dict:
        return {"type": "emotion", "emotion": self.emotion, "start": round(self.start, 2),
                "end": round(self.end, 2), "p": round(self.p, 3)}

    def __str__(self) -> str:
        return f"{self.start:.2f}-{self.end:.2f}s emotion={self.emotion} p={self.p:.2f}"


Event = KeywordEvent | EmotionEvent


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ListenConfig:
    """Settings of a ``Listener`` (times in seconds).

    ``hop_s`` is rounded to whole feature frames (and, in ``"state"`` mode, to whole GRU
    steps). ``threshold`` is the smoothed keyword probability needed to report it.
    """

    hop_s: float = 0.1
    threshold: float = 0.5
    refractory_s: float = 0.8
    smooth_s: float = 0.1
    peak_wait_s: float = 0.3
    voice_recent_s: float = 0.5
    min_emotion_s: float = 0.5
    keywords: bool = True
    emotion: bool = True
    recurrent: str = "window"
    dc_cutoff_hz: float = 10.0
    vad: VADConfig = field(default_factory=VADConfig)

    def __post_init__(self) -> None:
        problems = []
        if not 0.01 <= self.hop_s <= 1.0:
            problems.append(f"hop_s: expected 0.01..1.0 seconds; got {self.hop_s!r}")
        if not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold: expected a probability in [0, 1]; got {self.threshold!r}")
        for name in ("refractory_s", "smooth_s", "min_emotion_s", "peak_wait_s", "voice_recent_s"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name}: expected >= 0 seconds; got {getattr(self, name)!r}")
        if self.recurrent not in RECURRENT_MODES:
            problems.append(f"recurrent: expected one of {', '.join(RECURRENT_MODES)}; got {self.recurrent!r}")
        if not self.dc_cutoff_hz > 0:
            problems.append(f"dc_cutoff_hz: expected > 0; got {self.dc_cutoff_hz!r}")
        collect(problems, ConfigError, "ListenConfig")


# --------------------------------------------------------------------------- recurrent KWS


class RecurrentKWS:
    """Keyword probabilities from a ``crnn`` encoder whose GRU state lives across hops.

    Each ``step(window)`` computes features and convolutions over the whole window (so
    utterance normalisation, mean removal and GroupNorm see the window, as in training)
    and advances the GRU only over the steps that are new since the previous hop. The
    newest ``lag`` steps are held back until the next hop: their receptive field still
    reaches past the window's end, into zero padding. The first step after a reset
    primes the GRU with the whole window, which is exactly the per-clip computation.
    The head pools (mean and std) the GRU outputs of the last window.
    """

    def __init__(self, runtime: TorchRuntime, hop_samples: int, lag: int = 2):
        model = runtime.pipeline.model
        encoder = model.encoder
        if not (hasattr(encoder, "convs") and hasattr(encoder, "gru")):
            raise ConfigError(f"recurrent streaming needs a 'crnn' encoder; this model uses {model.cfg.encoder!r}")
        self.model, self.encoder = model, encoder
        self.frontend = runtime.pipeline.frontend
        self.mask = runtime.pipeline.mask_kws
        spec = runtime.spec
        self.stride = self.frames_per_step(encoder)
        step_samples = spec.hop_length * self.stride
        if hop_samples % step_samples:
            raise ConfigError(f"hop of {hop_samples} samples is not a whole number of GRU steps "
                              f"({step_samples} samples)")
        self.new_steps = hop_samples // step_samples
        self.lag = lag
        window_frames = spec.n_frames(spec.clip_samples("kws"))
        self.window_steps = -(-window_frames // self.stride)
        self.reset()

    @staticmethod
    def frames_per_step(encoder: torch.nn.Module) -> int:
        stride = 1
        for m in encoder.convs.modules():
            if isinstance(m, torch.nn.Conv1d):
                stride *= int(m.stride[0])
        return stride

    def reset(self) -> None:
        self.h: torch.Tensor | None = None
        self.outputs: deque[torch.Tensor] = deque(maxlen=self.window_steps)

    @torch.inference_mode()
    def step(self, window: np.ndarray) -> np.ndarray:
        """``(window_samples,)`` -> ``(n_keywords,)`` probabilities; advances the state."""
        feats = self.frontend(torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32)))  # (1, F, frames)
        z = self.encoder.convs(self.model._prepare(feats))  # (1, C, steps)
        usable = z.shape[-1] - self.lag
        first = self.h is None
        new = z[:, :, :usable] if first else z[:, :, max(0, usable - self.new_steps):usable]
        out, self.h = self.encoder.gru(new.transpose(1, 2), self.h)  # (1, n, H), (1, 1, H)
        self.outputs.extend(out[0])
        pooled = stats_pool(torch.stack(list(self.outputs), dim=1).unsqueeze(0))  # (1, 2H)
        logits = self.model.heads["kws"](pooled)[0] + self.mask
        return torch.softmax(logits, dim=-1).numpy()


# --------------------------------------------------------------------------- the listener


class Listener:
    """Streaming keyword spotting and segment emotion over one stream.

    ``feed(samples)`` takes ``(n,)`` float samples at ``runtime.spec.sample_rate`` in
    chunks of any size and returns the events they completed; ``flush()`` ends the
    stream. Memory is bounded: the audio kept is the longest segment plus a window.
    """

    def __init__(self, runtime: Runtime, config: ListenConfig | None = None, notice: Notice = _stderr):
        self.rt = runtime
        self.cfg = cfg = config or ListenConfig()
        self.notice = notice
        spec = runtime.spec
        self.sr = spec.sample_rate
        self.window = spec.clip_samples("kws")
        self.emotion_clip = spec.clip_samples("emotion")
        self.kws_on = cfg.keywords and "kws" in runtime.tasks
        self.emotion_on = cfg.emotion and "emotion" in runtime.tasks
        if cfg.keywords and not self.kws_on:
            notice("the model has no trained keyword head: keyword spotting is off")
        if cfg.emotion and not self.emotion_on:
            notice("the model has no trained emotion head: emotion events are off")
        self.mode = self._mode(cfg.recurrent)
        unit = spec.hop_length
        if self.mode in ("state", "carry"):
            unit *= RecurrentKWS.frames_per_step(runtime.pipeline.model.encoder)
        self.hop = max(unit, int(round(cfg.hop_s * self.sr / unit)) * unit)
        self.recurrent = RecurrentKWS(runtime, self.hop) if self.mode in ("state", "carry") else None
        self.vad = EnergyVAD(self.sr, cfg.vad)
        self.classes = runtime.classes["kws"]
        self.keyword_idx = np.array([i for i, c in enumerate(self.classes) if c not in NOT_KEYWORDS])
        self.n_smooth = max(1, int(round(cfg.smooth_s * self.sr / self.hop)))
        r = float(np.exp(-2 * np.pi * cfg.dc_cutoff_hz / self.sr))
        self._dc = (np.array([1.0, -1.0]), np.array([1.0, -r]))
        self.keep = self.window + int(math.ceil((cfg.vad.max_segment_s + 1.0) * self.sr))
        self.reset()

    def _mode(self, wanted: str) -> str:
        recurrent_ok = (isinstance(self.rt, TorchRuntime) and self.kws_on
                        and hasattr(self.rt.pipeline.model.encoder, "gru"))
        if wanted in ("state", "carry") and not recurrent_ok:
            why = ("exported models run whole windows" if not isinstance(self.rt, TorchRuntime)
                   else f"the {self.rt.model_config.encoder!r} encoder is not recurrent")
            raise ConfigError(f"recurrent mode {wanted!r} needs a 'crnn' model bundle with a keyword head; {why}")
        return wanted

    def reset(self) -> None:
        self.vad.reset()
        self._zi = np.zeros(1)
        self._pending = np.zeros(0, dtype=np.float32)
        self._buf = np.zeros(2 * self.keep, dtype=np.float32)
        self._buf_len = 0            # samples held in _buf
        self._buf_start = 0          # absolute sample index of _buf[0]
        self.samples = 0             # samples processed (whole hops)
        self._recent: deque[np.ndarray] = deque(maxlen=self.n_smooth)
        self._last_fire = -math.inf
        self._last_keyword: int | None = None
        self._candidate: tuple[int, float, float] | None = None  # (class, peak probability, first seen)
        self.nonfinite = 0
        self.clipped = 0
        self._clip_noticed = False
        self.windows_scored = 0
        if self.recurrent is not None:
            self.recurrent.reset()

    @property
    def time(self) -> float:
        return self.samples / self.sr

    # -- input ---------------------------------------------------------------
    def feed(self, samples: np.ndarray) -> list[Event]:
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._pending = np.concatenate([self._pending, x]) if self._pending.size else x
        events: list[Event] = []
        n = self._pending.size // self.hop
        for i in range(n):
            events += self._hop(self._pending[i * self.hop:(i + 1) * self.hop])
        self._pending = self._pending[n * self.hop:].copy()
        return events

    def flush(self) -> list[Event]:
        """End of stream: process the partial hop (zero-padded), report a pending keyword candidate
        and close the open segment."""
        events: list[Event] = []
        if self._pending.size:
            tail = self._pending.size
            events += self._hop(np.pad(self._pending, (0, self.hop - tail)))
            self._pending = np.zeros(0, dtype=np.float32)
        if self._candidate is not None:
            events += self._fire(self.time)
        for seg in self.vad.flush():
            events += self._segment_end(seg)
        return events

    def _condition(self, x: np.ndarray) -> np.ndarray:
        bad = ~np.isfinite(x)
        if bad.any():
            if self.nonfinite == 0:
                self.notice(f"{self.time:.2f}s: NaN/Inf samples in the input are replaced by 0")
            self.nonfinite += int(bad.sum())
            x = np.where(bad, 0.0, x).astype(np.float32)
        loud = int(np.count_nonzero(np.abs(x) >= 0.999))
        if loud > 0.01 * x.size and not self._clip_noticed:
            self._clip_noticed = True
            self.notice(f"{self.time:.2f}s: the input is clipping (samples at full scale); results may suffer")
        self.clipped += loud
        y, self._zi = lfilter(*self._dc, x.astype(np.float64), zi=self._zi)
        return y.astype(np.float32)

    def _append(self, x: np.ndarray) -> None:
        # A buffer twice the kept length: when full, the newest `keep` samples move to the
        # front, so appending costs O(1) per sample on average.
        if self._buf_len + x.size > self._buf.size:
            drop = self._buf_len - self.keep
            self._buf[:self.keep] = self._buf[drop:self._buf_len]
            self._buf_len = self.keep
            self._buf_start += drop
        self._buf[self._buf_len:self._buf_len + x.size] = x
        self._buf_len += x.size

    def _audio(self, start: int, end: int) -> np.ndarray:
        """Samples ``[start, end)`` (absolute indices, a copy); zeros before the stream began or
        for audio no longer kept."""
        lo = max(start, self._buf_start)
        part = self._buf[lo - self._buf_start:end - self._buf_start].copy()
        return np.concatenate([np.zeros(lo - start, dtype=np.float32), part]) if lo > start else part

    # -- one hop -------------------------------------------------------------
    def _hop(self, raw: np.ndarray) -> list[Event]:
        x = self._condition(raw)
        self._append(x)
        self.samples += x.size
        closed = self.vad.process(x)
        events: list[Event] = []
        if self.kws_on:
            events += self._keywords(bool(closed))
        for seg in closed:
            events += self._segment_end(seg)
        return events

    def _keywords(self, segment_closed: bool) -> list[Event]:
        now = self.time
        if self.samples < self.window:
            # Zeros before the stream began would look like an onset at the window's edge.
            return []
        window = self._audio(self.samples - self.window, self.samples)
        if self.mode == "carry":
            p = self.recurrent.step(window)
            gate = self._voice_recent(now)
        elif self.mode == "state":
            gate = self.vad.active or segment_closed
            p = self.recurrent.step(window) if gate else None
        else:
            gate = self._voice_recent(now)
            p = self.rt.probs(window)["kws"][0] if gate else None
        if not gate:
            self._recent.clear()
            return self._fire(now) if self._candidate else []
        self.windows_scored += 1
        self._recent.append(p)
        smoothed = np.mean(self._recent, axis=0)
        top = int(np.argmax(smoothed))
        p_top = float(smoothed[top])
        is_keyword = top in self.keyword_idx and p_top >= self.cfg.threshold
        if self._candidate is None:
            if is_keyword and self._armed(top, now):
                self._candidate = (top, p_top, now)
            return []
        _, peak, since = self._candidate
        if is_keyword and p_top > peak:
            self._candidate = (top, p_top, since)
            if now - since < self.cfg.peak_wait_s:
                return []
        return self._fire(now)

    def _armed(self, keyword: int, now: float) -> bool:
        if now - self._last_fire < self.cfg.refractory_s:
            return False
        onset = self.vad.last_onset
        return keyword != self._last_keyword or (onset is not None and onset > self._last_fire)

    def _fire(self, now: float) -> list[Event]:
        top, peak, _ = self._candidate
        self._candidate = None
        self._last_fire, self._last_keyword = now, top
        return [KeywordEvent(self.classes[top], now, peak)]

    def _voice_recent(self, now: float) -> bool:
        recent = min(self.cfg.voice_recent_s, self.window / self.sr)
        return self.vad.last_voiced is not None and now - self.vad.last_voiced < recent

    def _segment_end(self, seg: Segment) -> list[Event]:
        if self.mode == "state":
            self.recurrent.reset()
        if not self.emotion_on or seg.duration < self.cfg.min_emotion_s:
            return []
        wave = self._audio(int(round(seg.start * self.sr)), int(round(seg.end * self.sr)))
        label, p = self.classify_emotion(wave)
        return [EmotionEvent(label, seg.start, seg.end, p)]

    def classify_emotion(self, wave: np.ndarray) -> tuple[str, float]:
        """Top emotion of ``(T,)`` audio and its probability (clip-length-weighted mean over clips)."""
        n = self.emotion_clip
        if wave.size <= n:
            clips, weights = [fit_length(wave, n, mode="center")], [1.0]
        else:
            starts = list(range(0, wave.size - n + 1, n))
            if starts[-1] + n < wave.size:
                starts.append(wave.size - n)  # the tail, overlapping the previous clip
            clips, weights = [wave[s:s + n] for s in starts], [1.0] * len(starts)
        probs = self.rt.probs(np.stack(clips))["emotion"]
        mean = np.average(probs, axis=0, weights=weights)
        top = int(np.argmax(mean))
        return self.rt.classes["emotion"][top], float(mean[top])


def listen(runtime: Runtime, chunks: Iterable[np.ndarray], config: ListenConfig | None = None,
           notice: Notice = _stderr) -> Iterator[Event]:
    """Events of a stream given as chunks of samples at ``runtime.spec.sample_rate``."""
    listener = Listener(runtime, config, notice)
    for chunk in chunks:
        yield from listener.feed(chunk)
    yield from listener.flush()


# --------------------------------------------------------------------------- sources


class _Resampler:
    """Streaming resampler (soxr) to ``target`` Hz; a pass-through when the rates agree."""

    def __init__(self, source_rate: int, target: int):
        self.stream = None
        if source_rate != target:
            import soxr

            self.stream = soxr.ResampleStream(source_rate, target, 1, dtype="float32", quality="HQ")

    def __call__(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.stream.resample_chunk(x, last=last) if self.stream is not None else x


def _rate_notice(name: str, rate: int, target: int, notice: Notice) -> None:
    if rate != target:
        notice(f"{name} is {rate} Hz; resampling to {target} Hz")


def file_chunks(path: str | Path, target_rate: int, block_s: float = 0.5,
                notice: Notice = _stderr) -> Iterator[np.ndarray]:
    """Mono float32 chunks of an audio file at ``target_rate`` (read block by block)."""
    import soundfile as sf

    path = Path(path)
    rate, _, channels = audio.info(path)  # clear errors for missing, empty, corrupt files
    _rate_notice(str(path), rate, target_rate, notice)
    if channels > 1:
        notice(f"{path} has {channels} channels; mixing them down to mono")
    resample = _Resampler(rate, target_rate)
    block = max(1, int(block_s * rate))
    try:
        with sf.SoundFile(str(path)) as f:
            while True:
                data = f.read(frames=block, dtype="float32", always_2d=True)
                if data.shape[0] == 0:
                    break
                yield resample(data.mean(axis=1) if channels > 1 else data[:, 0])
    except (sf.SoundFileError, RuntimeError) as exc:
        raise AudioDecodeError(path, f"audio data is corrupt or truncated ({exc}); re-copy or re-export it") from None
    tail = resample(np.zeros(0, dtype=np.float32), last=True)
    if tail.size:
        yield tail


_WAV_SAMPLE = {(1, 8): "u1", (1, 16): "<i2", (1, 32): "<i4", (3, 32): "<f4", (3, 64): "<f8"}


def read_wav_header(stream: BinaryIO) -> tuple[int, int, str]:
    """Parse a WAV header from a non-seekable stream, leaving it at the first sample.

    Returns ``(sample_rate, channels, numpy dtype)``. The data chunk's size is ignored
    (streaming writers leave it 0 or 0xFFFFFFFF): samples are read until end of stream.
    """
    def read(n: int) -> bytes:
        b = stream.read(n)
        if len(b) < n:
            raise AudioDecodeError("<stdin>", "the WAV header ends early (truncated stream)")
        return b

    head = read(12)
    if head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        raise AudioDecodeError("<stdin>", "not a WAV stream (no RIFF/WAVE header); use --format f32 or s16 "
                                          "for raw samples")
    fmt = None
    while True:
        cid, size = (lambda h: (h[:4], int.from_bytes(h[4:], "little")))(read(8))
        if cid == b"data":
            break
        body = read(size + (size & 1))
        if cid == b"fmt ":
            tag, channels, rate = (int.from_bytes(body[0:2], "little"), int.from_bytes(body[2:4], "little"),
                                   int.from_bytes(body[4:8], "little"))
            bits = int.from_bytes(body[14:16], "little")
            if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the sub-format's tag
                tag = int.from_bytes(body[24:26], "little")
            fmt = (tag, channels, rate, bits)
    if fmt is None:
        raise AudioDecodeError("<stdin>", "WAV stream has no fmt chunk before its data")
    tag, channels, rate, bits = fmt
    if (tag, bits) not in _WAV_SAMPLE or channels < 1 or rate < 1:
        raise AudioDecodeError("<stdin>", f"unsupported WAV sample format (format tag {tag}, {bits} bits); "
                                          "send 16-bit PCM or 32-bit float")
    return rate, channels, _WAV_SAMPLE[(tag, bits)]


def _to_float(raw: np.ndarray) -> np.ndarray:
    if raw.dtype == np.uint8:
        return (raw.astype(np.float32) - 128.0) / 128.0
    if raw.dtype.kind == "i":
        return raw.astype(np.float32) / float(2 ** (8 * raw.dtype.itemsize - 1))
    return raw.astype(np.float32)


def stream_chunks(stream: BinaryIO, target_rate: int, fmt: str = "auto", rate: int | None = None,
                  block_s: float = 0.1, notice: Notice = _stderr) -> Iterator[np.ndarray]:
    """Mono float32 chunks from a byte stream (stdin): a WAV stream or raw samples.

    ``fmt``: ``"wav"``, ``"f32"`` (raw little-endian float32), ``"s16"`` (raw 16-bit PCM),
    or ``"auto"`` (a WAV stream when it starts with a RIFF header, else raw float32).
    Raw input is mono at ``rate`` Hz (default ``target_rate``).
    """
    if fmt not in STDIN_FORMATS:
        raise ConfigError(f"format: expected one of {', '.join(STDIN_FORMATS)}; got {fmt!r}")
    prefix = b""
    if fmt == "auto":
        prefix = stream.read(4)
        fmt = "wav" if prefix in (b"RIFF", b"RF64") else "f32"
    src = _Prefixed(prefix, stream)
    if fmt == "wav":
        source_rate, channels, dtype = read_wav_header(src)
    else:
        source_rate, channels, dtype = int(rate or target_rate), 1, ("<f4" if fmt == "f32" else "<i2")
    _rate_notice("the input stream", source_rate, target_rate, notice)
    resample = _Resampler(source_rate, target_rate)
    frame_bytes = np.dtype(dtype).itemsize * channels
    block = max(1, int(block_s * source_rate)) * frame_bytes
    rest = b""
    while True:
        data = src.read(block)
        if not data:
            break
        data = rest + data
        usable = len(data) - len(data) % frame_bytes
        rest = data[usable:]
        samples = _to_float(np.frombuffer(data[:usable], dtype=dtype)).reshape(-1, channels).mean(axis=1)
        yield resample(samples)
    if rest:
        notice(f"the input stream ended inside a sample frame: {len(rest)} trailing byte(s) ignored")
    tail = resample(np.zeros(0, dtype=np.float32), last=True)
    if tail.size:
        yield tail


class _Prefixed:
    """A read-only stream that first returns ``prefix`` (bytes already consumed by sniffing)."""

    def __init__(self, prefix: bytes, stream: BinaryIO):
        self.prefix, self.stream = prefix, stream

    def read(self, n: int) -> bytes:
        if self.prefix:
            head, self.prefix = self.prefix[:n], self.prefix[n:]
            return head + (self.stream.read(n - len(head)) if n > len(head) else b"")
        return self.stream.read(n)


def open_microphone(device: str | int | None = None):
    """``(sounddevice module, input device info)``; ``ConfigError`` saying what is missing."""
    try:
        import sounddevice as sd
    except ImportError:
        raise ConfigError("microphone input needs the sounddevice package: pip install 'fedser[client]' "
                          "(or pip install sounddevice)") from None
    except OSError as exc:  # the PortAudio library itself is missing
        raise ConfigError(f"microphone input needs the PortAudio library ({exc}); install it, e.g. "
                          "`apt install libportaudio2`") from None
    try:
        return sd, sd.query_devices(device, kind="input")
    except (ValueError, sd.PortAudioError) as exc:
        raise ConfigError(f"no usable input device{f' {device!r}' if device is not None else ''}: {exc}; "
                          "list devices with `python -m sounddevice`") from None


def mic_chunks(target_rate: int, block_s: float = 0.1, device: str | int | None = None,
               notice: Notice = _stderr) -> Iterator[np.ndarray]:
    """Mono float32 chunks from a microphone (``sounddevice``, imported only here)."""
    import queue

    sd, info = open_microphone(device)
    notice(f"listening on {info['name']} (Ctrl-C to stop)")
    q: queue.Queue[np.ndarray] = queue.Queue(maxsize=200)
    dropped = 0

    def callback(indata, frames, t, status) -> None:  # PortAudio thread: copy and hand over
        nonlocal dropped
        try:
            q.put_nowait(indata[:, 0].copy())
        except queue.Full:
            dropped += 1

    try:
        with sd.InputStream(samplerate=target_rate, channels=1, dtype="float32", device=device,
                            blocksize=max(1, int(block_s * target_rate)), callback=callback):
            while True:
                yield q.get()
                if dropped:
                    notice(f"the listener fell behind: {dropped} block(s) of microphone audio dropped")
                    dropped = 0
    except sd.PortAudioError as exc:
        raise ConfigError(f"cannot record from the input device: {exc}") from None


# --------------------------------------------------------------------------- CLI


def add_arguments(p) -> None:
    """Options of ``fedser-client listen``."""
    p.add_argument("--model", required=True, metavar="BUNDLE",
                   help="run directory, model.fedser bundle, or a file from `fedser export` (.pt / .onnx)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="FILE", help="audio file, or - for stdin (WAV stream or raw samples)")
    src.add_argument("--mic", action="store_true", help="listen to the default microphone (needs sounddevice)")
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    p.add_argument("--format", choices=STDIN_FORMATS, default="auto", dest="stdin_format",
                   help="stdin: wav, f32 (raw float32), s16 (raw 16-bit PCM); auto = wav if it has a header, "
                        "else f32")
    p.add_argument("--rate", type=int, default=None, help="sample rate of raw stdin samples (default: the model's)")
    p.add_argument("--device", default=None, help="input device for --mic (name or index)")
    d = ListenConfig()
    p.add_argument("--threshold", type=float, default=d.threshold, help=f"keyword probability (default {d.threshold})")
    p.add_argument("--refractory", type=float, default=d.refractory_s,
                   help=f"seconds after a keyword during which no other is reported (default {d.refractory_s})")
    p.add_argument("--hop", type=float, default=d.hop_s, help=f"hop in seconds (default {d.hop_s})")
    p.add_argument("--smooth", type=float, default=d.smooth_s,
                   help=f"seconds of keyword probabilities averaged (default {d.smooth_s})")
    p.add_argument("--recurrent", choices=RECURRENT_MODES, default="window",
                   help="window (default): re-run the whole window each hop; crnn bundles only: state = carry "
                        "the GRU state within voiced segments, reset at their end; carry = never reset (only "
                        "to measure what the reset is worth)")
    p.add_argument("--no-emotion", action="store_true", help="do not classify the emotion of segments")
    p.add_argument("--no-keywords", action="store_true", help="do not spot keywords")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the model (default 1)")


def run(args, stdin: BinaryIO | None = None, stdout=None) -> int:
    """``fedser-client listen``: print events as they happen; returns the exit code."""
    out = stdout or sys.stdout
    if args.threads < 1:
        raise ConfigError(f"--threads: expected at least 1; got {args.threads}")
    if args.mic:
        open_microphone(args.device)  # fail before loading the model
    torch.set_num_threads(args.threads)
    runtime = open_model(args.model, threads=args.threads)
    _stderr(f"model: {runtime.describe()}")
    cfg = ListenConfig(hop_s=args.hop, threshold=args.threshold, refractory_s=args.refractory,
                       smooth_s=args.smooth, keywords=not args.no_keywords, emotion=not args.no_emotion,
                       recurrent=args.recurrent)
    sr = runtime.spec.sample_rate
    if args.mic:
        chunks = mic_chunks(sr, block_s=cfg.hop_s, device=args.device)
    elif args.input == "-":
        chunks = stream_chunks(stdin or sys.stdin.buffer, sr, args.stdin_format, args.rate, block_s=cfg.hop_s)
    else:
        chunks = file_chunks(args.input, sr)
    listener = Listener(runtime, cfg)
    t0 = time.perf_counter()

    def emit(events: list[Event]) -> None:
        for e in events:
            print(json.dumps(e.to_dict()) if args.json else str(e), file=out, flush=True)

    try:
        try:
            for chunk in chunks:
                emit(listener.feed(chunk))
        except KeyboardInterrupt:
            pass
        emit(listener.flush())
    except BrokenPipeError:
        # The reader went away (`listen ... | head`): stop quietly, as other Unix tools do.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if not args.mic:
        wall = time.perf_counter() - t0
        _stderr(f"processed {listener.time:.1f} s of audio in {wall:.2f} s "
                f"(real-time factor {wall / max(listener.time, 1e-9):.3f})")
    return 0
