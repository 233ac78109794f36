"""Energy voice-activity detection with an adaptive noise floor, for streams.

``EnergyVAD`` cuts a stream into short frames (20 ms), measures each frame's energy
in dB (after a DC-blocking high-pass, so a DC offset reads as silence) and compares
it with a running estimate of the noise floor:

- the floor is the minimum, over the last ``floor_window_s`` seconds, of the frame
  power smoothed over about ``smooth_s`` (minimum statistics): it follows a change of
  background noise within that window, speech (which always has quieter moments
  between syllables) does not lift it far, and one odd quiet frame does not pin it;
- a frame is voiced when it is ``threshold_db`` above the floor and above an absolute
  level (``min_level_db``, dB re full scale) under which nothing counts as speech;
- a segment opens after ``onset_s`` of voiced frames and closes ``hangover_s`` after
  the last one, or is cut at ``max_segment_s`` so a stream of loud noise still yields
  segment ends (where recurrent state is reset).

Everything is causal and kept across ``process`` calls, so a stream can be fed in
chunks of any size. The same samples fed in different chunkings give the same result.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

from fedser.common.errors import ConfigError, collect

LEVEL_EPS = 1e-10  # -100 dB: digital silence


@dataclass(frozen=True)
class VADConfig:
    """Settings of ``EnergyVAD`` (times in seconds, levels in dB)."""

    frame_s: float = 0.02
    threshold_db: float = 6.0
    min_level_db: float = -60.0
    floor_window_s: float = 2.0
    smooth_s: float = 0.06
    onset_s: float = 0.04
    hangover_s: float = 0.3
    max_segment_s: float = 10.0
    dc_cutoff_hz: float = 20.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("frame_s", "onset_s", "max_segment_s", "dc_cutoff_hz", "floor_window_s", "threshold_db",
                     "smooth_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}: expected > 0; got {getattr(self, name)!r}")
        if not self.hangover_s >= 0:
            problems.append(f"hangover_s: expected >= 0; got {self.hangover_s!r}")
        collect(problems, ConfigError, "VADConfig")


@dataclass(frozen=True)
class Segment:
    """A voiced stretch of the stream, in seconds from the stream start."""

    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


class EnergyVAD:
    """Causal energy VAD over a mono stream at ``sample_rate``.

    ``process(samples)`` consumes any number of samples and returns the segments that
    closed during them. ``active``, ``segment_start`` and ``last_voiced`` describe the
    segment in progress; ``flush()`` closes it at the end of the stream.
    """

    def __init__(self, sample_rate: int, config: VADConfig | None = None):
        self.sr = int(sample_rate)
        self.cfg = config or VADConfig()
        c = self.cfg
        self.frame = max(1, int(round(c.frame_s * self.sr)))
        self.frame_s = self.frame / self.sr
        self.onset_frames = max(1, int(round(c.onset_s / self.frame_s)))
        self.hang_frames = int(round(c.hangover_s / self.frame_s))
        self.max_frames = max(1, int(round(c.max_segment_s / self.frame_s)))
        self.floor_frames = max(1, int(round(c.floor_window_s / self.frame_s)))
        self.alpha = float(np.exp(-self.frame_s / c.smooth_s))  # one-pole power smoothing per frame
        # One-pole DC blocker y[n] = x[n] - x[n-1] + r y[n-1].
        r = float(np.exp(-2 * np.pi * c.dc_cutoff_hz / self.sr))
        self._b, self._a = np.array([1.0, -1.0]), np.array([1.0, -r])
        self.reset()

    def reset(self) -> None:
        self._zi = np.zeros(1)
        self._pending = np.zeros(0, dtype=np.float32)
        self.frames = 0                    # frames consumed
        self._levels: deque[float] = deque(maxlen=self.floor_frames)  # smoothed frame levels (dB)
        self._smooth_power: float | None = None
        self.run = 0                       # consecutive voiced frames
        self.silent = 0                    # unvoiced frames since the last voiced one (in a segment)
        self.active = False
        self.segment_start: float | None = None
        self.last_onset: float | None = None   # start time of the latest segment (open or closed)
        self.last_voiced: float | None = None  # end time of the last voiced frame

    @property
    def floor_db(self) -> float:
        """Current noise floor (dB re full scale): the quietest smoothed level in the floor window."""
        return min(self._levels) if self._levels else 10 * np.log10(LEVEL_EPS)

    @property
    def time(self) -> float:
        """Seconds of the stream consumed so far (whole frames)."""
        return self.frames * self.frame_s

    def process(self, samples: np.ndarray) -> list[Segment]:
        """Feed ``(n,)`` samples; return the segments that ended within them."""
        x = np.asarray(samples, dtype=np.float64).reshape(-1)
        if x.size:
            y, self._zi = lfilter(self._b, self._a, x, zi=self._zi)
            self._pending = np.concatenate([self._pending, y.astype(np.float32)])
        closed = []
        n = self._pending.size // self.frame
        for i in range(n):
            seg = self._step(self._pending[i * self.frame:(i + 1) * self.frame])
            if seg is not None:
                closed.append(seg)
        self._pending = self._pending[n * self.frame:]
        return closed

    def _step(self, frame: np.ndarray) -> Segment | None:
        c = self.cfg
        power = float(np.mean(np.square(frame, dtype=np.float64)))
        e = float(10.0 * np.log10(power + LEVEL_EPS))
        self._smooth_power = power if self._smooth_power is None else (
            self.alpha * self._smooth_power + (1 - self.alpha) * power)
        self._levels.append(float(10.0 * np.log10(self._smooth_power + LEVEL_EPS)))
        voiced = e > self.floor_db + c.threshold_db and e > c.min_level_db
        self.frames += 1
        t_end = self.time
        closed = None
        if voiced:
            self.run += 1
            self.silent = 0
            self.last_voiced = t_end
            if not self.active and self.run >= self.onset_frames:
                self.active = True
                self.segment_start = self.last_onset = t_end - self.run * self.frame_s
        else:
            self.run = 0
            if self.active:
                self.silent += 1
                if self.silent > self.hang_frames:
                    closed = self._close()
        too_long = self.segment_start is not None and t_end - self.segment_start >= self.max_frames * self.frame_s
        if self.active and too_long:
            closed = self._close(cut=True)
        return closed

    def _close(self, cut: bool = False) -> Segment:
        end = self.time if cut else float(self.last_voiced)
        seg = Segment(float(self.segment_start), end)
        self.active = False
        self.segment_start = None
        self.silent = 0
        self.run = 0  # a cut segment that is still voiced reopens after a new onset
        return seg

    def flush(self) -> list[Segment]:
        """End of stream: close the segment in progress, if any."""
        return [self._close()] if self.active and self.last_voiced is not None else []
