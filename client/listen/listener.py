"""On-device streaming inference: keywords as they are spoken, the emotion of each utterance.

A ``Listener`` consumes a 16 kHz mono stream in hops (80 ms by default: the step of the
speech embedding the default model reads):

1. Conditioning: NaN/Inf samples become 0 (with a notice) and a one-pole high-pass at
   ``dc_cutoff_hz`` removes any DC offset, so neither reaches the model or the VAD.
2. Voice activity: Silero's neural VAD (``fedser.client.vad``; or the energy detector,
   ``vad.kind="energy"``) opens and closes voiced segments.
3. Keywords, decided once per word (``decision="segment"``, the default): when a voiced
   segment that fits in the KWS window (1 s) closes, the keyword head scores the one window
   centred on it (or, when the end of the stream comes first, the last window heard), the
   view of a word the model was trained on. A command word on top with probability at least
   ``threshold`` is reported; ``_unknown_`` and ``_silence_`` never are. Nothing is scored
   while a word is still being spoken, so the model runs once per word, and the event comes
   when the segment closes (the VAD's hangover, 300 ms, after the word).
   Segments longer than the window (a sentence, words run together) cannot be centred in
   one window; they are scanned with sliding decisions once they pass the window's length.
   Sliding decisions (``decision="sliding"``, and those long segments): while voice was
   heard in the last ``voice_recent_s`` (the newer half of the window; scoring starts once
   the stream has filled one window), the keyword head scores the window, the last KWS clip
   length of audio, every hop. Windows holding only the
   tail of a word, at their old edge, are not scored: the model was trained on words
   near the middle of the clip and guesses on tails; probabilities are averaged over the last
   ``smooth_s`` seconds of hops. When a command word becomes the top class with a
   smoothed probability of at least ``threshold`` (and no keyword fired in the last
   ``refractory_s``, and it is not the keyword reported last unless a new voiced
   segment has begun since: one word is reported once however long it stays in the
   window), it becomes a candidate; the candidate follows the rising
   probability and is reported at its peak (the first hop that does not improve on
   it, at most ``peak_wait_s`` after it appeared). Sliding decisions report sooner but
   trail the per-clip accuracy of the same model further: the window that crosses the
   threshold first often holds a word off-centre (``bench/results/streaming.md``).
4. Emotion: when a segment closes, the emotion head classifies its audio (shorter
   segments are centred in one emotion clip, longer ones are cut into clips whose
   probabilities are averaged) and the segment is reported with its label.

Every scored window is run whole (``recurrent="window"``, the default): for a recurrent
encoder that is a GRU started from zero one window back, exactly the per-clip computation
it was trained on. ``crnn`` bundles can instead carry their GRU state across hops
(``"state"``, ``"carry"``; see ``fedser.client.listen.kws``), which implies sliding
decisions, detects fewer keywords and is why it is not the default.

Events: ``KeywordEvent`` (``12.34s keyword=stop p=0.97``) and ``EmotionEvent``
(``15.10-17.80s emotion=angry p=0.71``); ``to_dict()`` is the ``--json`` line.
"""
from __future__ import annotations

import math
import sys
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
from scipy.signal import lfilter

from fedser.client.runtime import Runtime, TorchRuntime
from fedser.client.vad import Segment, make_vad
from fedser.common.errors import ConfigError
from fedser.common.features import fit_length
from fedser.common.taxonomy import SILENCE, UNKNOWN

from .config import ListenConfig
from .kws import RecurrentKWS

NOT_KEYWORDS = frozenset({UNKNOWN, SILENCE})

Notice = Callable[[str], None]


def to_stderr(msg: str) -> None:
    """The default ``Notice``: one line on stderr, flushed (events go to stdout)."""
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


# --------------------------------------------------------------------------- the listener


class Listener:
    """Streaming keyword spotting and segment emotion over one stream.

    ``feed(samples)`` takes ``(n,)`` float samples at ``runtime.spec.sample_rate`` in
    chunks of any size and returns the events they completed; ``flush()`` ends the
    stream. Memory is bounded: the audio kept is the longest segment plus a window.
    """

    def __init__(self, runtime: Runtime, config: ListenConfig | None = None, notice: Notice = to_stderr):
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
        # A carried recurrent state must advance every hop: those modes decide sliding.
        self.decision = cfg.decision if self.mode == "window" else "sliding"
        self.window_s = self.window / self.sr
        unit = spec.hop_length
        if self.mode in ("state", "carry"):
            unit *= RecurrentKWS.frames_per_step(runtime.pipeline.model.encoder)
        self.hop = max(unit, int(round(cfg.hop_s * self.sr / unit)) * unit)
        self.recurrent = RecurrentKWS(runtime, self.hop) if self.mode in ("state", "carry") else None
        self.vad = make_vad(self.sr, cfg.vad)
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
        if self.decision == "sliding" or self._in_long_segment():
            return self._slide(segment_closed)
        return []

    def _in_long_segment(self) -> bool:
        """A voiced segment has outgrown the window: no one window can centre it, so it slides.
        Its voiced extent counts, as its duration will when it closes, not the hangover after it."""
        start, voiced = self.vad.segment_start, self.vad.last_voiced
        return self.vad.active and start is not None and voiced is not None and voiced - start > self.window_s

    def _slide(self, segment_closed: bool) -> list[Event]:
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

    def _decide_word(self, seg: Segment) -> list[Event]:
        """The one decision on a segment that fits in the window: the window centred on it."""
        now = self.time
        # A segment no longer than the window is inside its centred window; at the end of the
        # stream that window may reach past what was heard, so it is clamped to the last window.
        end = min((seg.start + seg.end) / 2 + self.window_s / 2, now)
        stop = int(round(end * self.sr))
        p = self.rt.probs(self._audio(stop - self.window, stop))["kws"][0]
        self.windows_scored += 1
        top = int(np.argmax(p))
        if top not in self.keyword_idx or p[top] < self.cfg.threshold:
            return []
        self._last_fire, self._last_keyword = now, top
        return [KeywordEvent(self.classes[top], now, float(p[top]))]

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
        events: list[Event] = []
        if self.kws_on and self.decision == "segment":
            if seg.duration <= self.window_s:
                events += self._decide_word(seg)
            else:
                self._recent.clear()
                if self._candidate is not None:
                    events += self._fire(self.time)  # the long segment's last sliding candidate
        if not self.emotion_on or seg.duration < self.cfg.min_emotion_s:
            return events
        wave = self._audio(int(round(seg.start * self.sr)), int(round(seg.end * self.sr)))
        label, p = self.classify_emotion(wave)
        return events + [EmotionEvent(label, seg.start, seg.end, p)]

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
           notice: Notice = to_stderr) -> Iterator[Event]:
    """Events of a stream given as chunks of samples at ``runtime.spec.sample_rate``."""
    listener = Listener(runtime, config, notice)
    for chunk in chunks:
        yield from listener.feed(chunk)
    yield from listener.flush()
