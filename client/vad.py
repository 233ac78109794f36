"""Voice-activity detection for streams: Silero's neural VAD (default) or an energy detector.

Both cut a stream into short frames, decide per frame whether it is voiced, and turn the
decisions into segments the same way (``Segmenter``): a segment opens after ``onset_s`` of
voiced frames, closes ``hangover_s`` after the last one, or is cut at ``max_segment_s`` so a
stream of loud noise still yields segment ends (where recurrent state is reset).

``SileroVAD`` (the default, ``kind="silero"``) asks Silero VAD (the ``silero-vad`` wheel ships
the model; MIT) for the speech probability of each 32 ms frame at 16 kHz, carrying the
network's recurrent state across frames. A frame is voiced at ``speech_threshold`` and, inside
a segment, down to 0.15 below it (Silero's own hysteresis). It tells speech from loud
non-speech (beeps, noise bursts, running water, dishes) where an energy detector cannot.

``EnergyVAD`` (``kind="energy"``, no model) measures each frame's energy in dB (after a
DC-blocking high-pass, so a DC offset reads as silence) and compares it with a running
estimate of the noise floor:

- the floor is the minimum, over the last ``floor_window_s`` seconds, of the frame
  power smoothed over about ``smooth_s`` (minimum statistics): it follows a change of
  background noise within that window, speech (which always has quieter moments
  between syllables) does not lift it far, and one odd quiet frame does not pin it;
- a frame is voiced when it is ``threshold_db`` above the floor and above an absolute
  level (``min_level_db``, dB re full scale) under which nothing counts as speech.

Everything is causal and kept across ``process`` calls, so a stream can be fed in
chunks of any size. The same samples fed in different chunkings give the same result.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from fedser.common.errors import ConfigError, collect

LEVEL_EPS = 1e-10  # -100 dB: digital silence
VAD_KINDS = ("silero", "energy")
SILERO_RATES = {16000: 512, 8000: 256}   # the frame Silero VAD takes at each rate (32 ms)
SILERO_HYSTERESIS = 0.15                 # a segment stays open down to this much below the threshold
SILERO_PACKAGE = "silero-vad"
SILERO_MODEL = "silero_vad.onnx"         # the wheel's 16/8 kHz model (data folder of silero_vad)


@dataclass(frozen=True)
class VADConfig:
    """Settings of the VAD (times in seconds, levels in dB).

    ``kind`` picks the detector; ``speech_threshold`` is Silero's, ``frame_s`` and the level
    settings are the energy detector's; the segment settings (``onset_s``, ``hangover_s``,
    ``max_segment_s``) are both's.
    """

    kind: str = "silero"
    speech_threshold: float = 0.5
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
        if self.kind not in VAD_KINDS:
            problems.append(f"kind: expected one of {', '.join(VAD_KINDS)}; got {self.kind!r}")
        if not SILERO_HYSTERESIS < self.speech_threshold < 1:
            problems.append(f"speech_threshold: expected a probability in ({SILERO_HYSTERESIS}, 1); "
                            f"got {self.speech_threshold!r}")
        collect(problems, ConfigError, "VADConfig")


@dataclass(frozen=True)
class Segment:
    """A voiced stretch of the stream, in seconds from the stream start."""

    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


class Segmenter:
    """Causal segments from per-frame voice decisions over a mono stream at ``sample_rate``.

    ``process(samples)`` consumes any number of samples and returns the segments that
    closed during them. ``active``, ``segment_start`` and ``last_voiced`` describe the
    segment in progress; ``flush()`` closes it at the end of the stream. Subclasses say how
    long a frame is (``frame_samples``) and whether it is voiced (``_voiced``).
    """

    def __init__(self, sample_rate: int, frame_samples: int, config: VADConfig):
        self.sr = int(sample_rate)
        self.cfg = c = config
        self.frame = max(1, int(frame_samples))
        self.frame_s = self.frame / self.sr
        self.onset_frames = max(1, int(round(c.onset_s / self.frame_s)))
        self.hang_frames = int(round(c.hangover_s / self.frame_s))
        self.max_frames = max(1, int(round(c.max_segment_s / self.frame_s)))
        self.reset()

    def reset(self) -> None:
        self._pending = np.zeros(0, dtype=np.float32)
        self.frames = 0                    # frames consumed
        self.run = 0                       # consecutive voiced frames
        self.silent = 0                    # unvoiced frames since the last voiced one (in a segment)
        self.active = False
        self.segment_start: float | None = None
        self.last_onset: float | None = None   # start time of the latest segment (open or closed)
        self.last_voiced: float | None = None  # end time of the last voiced frame

    @property
    def time(self) -> float:
        """Seconds of the stream consumed so far (whole frames)."""
        return self.frames * self.frame_s

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        """The samples the frames are cut from (a causal filter may keep state here)."""
        return x.astype(np.float32)

    def _voiced(self, frame: np.ndarray) -> bool:
        raise NotImplementedError

    def process(self, samples: np.ndarray) -> list[Segment]:
        """Feed ``(n,)`` samples; return the segments that ended within them."""
        x = np.asarray(samples, dtype=np.float64).reshape(-1)
        if x.size:
            self._pending = np.concatenate([self._pending, self._prepare(x)])
        closed = []
        n = self._pending.size // self.frame
        for i in range(n):
            seg = self._step(self._pending[i * self.frame:(i + 1) * self.frame])
            if seg is not None:
                closed.append(seg)
        self._pending = self._pending[n * self.frame:]
        return closed

    def _step(self, frame: np.ndarray) -> Segment | None:
        voiced = self._voiced(frame)
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


class EnergyVAD(Segmenter):
    """Energy against an adaptive noise floor (module docstring), 20 ms frames by default."""

    def __init__(self, sample_rate: int, config: VADConfig | None = None):
        c = config or VADConfig(kind="energy")
        frame = max(1, int(round(c.frame_s * sample_rate)))
        self.floor_frames = max(1, int(round(c.floor_window_s / (frame / sample_rate))))
        self.alpha = float(np.exp(-(frame / sample_rate) / c.smooth_s))  # one-pole power smoothing per frame
        # One-pole DC blocker y[n] = x[n] - x[n-1] + r y[n-1].
        r = float(np.exp(-2 * np.pi * c.dc_cutoff_hz / sample_rate))
        self._b, self._a = np.array([1.0, -1.0]), np.array([1.0, -r])
        from scipy.signal import lfilter   # here, so that reading VADConfig stays light
        self._lfilter = lfilter
        super().__init__(sample_rate, frame, c)

    def reset(self) -> None:
        super().reset()
        self._zi = np.zeros(1)
        self._levels: deque[float] = deque(maxlen=self.floor_frames)  # smoothed frame levels (dB)
        self._smooth_power: float | None = None

    @property
    def floor_db(self) -> float:
        """Current noise floor (dB re full scale): the quietest smoothed level in the floor window."""
        return min(self._levels) if self._levels else 10 * np.log10(LEVEL_EPS)

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        y, self._zi = self._lfilter(self._b, self._a, x, zi=self._zi)
        return y.astype(np.float32)

    def _voiced(self, frame: np.ndarray) -> bool:
        c = self.cfg
        power = float(np.mean(np.square(frame, dtype=np.float64)))
        e = float(10.0 * np.log10(power + LEVEL_EPS))
        self._smooth_power = power if self._smooth_power is None else (
            self.alpha * self._smooth_power + (1 - self.alpha) * power)
        self._levels.append(float(10.0 * np.log10(self._smooth_power + LEVEL_EPS)))
        return e > self.floor_db + c.threshold_db and e > c.min_level_db


def load_silero_model():
    """Silero VAD's ONNX model from the ``silero-vad`` wheel, under ONNX Runtime (one thread).

    ``ConfigError`` naming the package when it is not installed or its model file is missing
    or unreadable.
    """
    import torch

    threads = torch.get_num_threads()
    try:
        # Importing silero_vad sets torch's thread count to 1 for the whole process: undone here.
        from silero_vad.utils_vad import OnnxWrapper
    except ImportError as err:
        raise ConfigError(f"the neural VAD needs the {SILERO_PACKAGE} package ({err}): pip install "
                          f"'fedser[client]', or choose the energy VAD") from None
    finally:
        torch.set_num_threads(threads)
    from importlib import resources

    path = resources.files("silero_vad.data").joinpath(SILERO_MODEL)
    try:
        return OnnxWrapper(str(path), force_onnx_cpu=True)
    except Exception as err:   # onnxruntime raises its own exception types for a missing or corrupt file
        raise ConfigError(f"Silero VAD's model {path} cannot be loaded ({type(err).__name__}: {err}): reinstall "
                          f"it with pip install --force-reinstall {SILERO_PACKAGE}") from None


class SileroVAD(Segmenter):
    """Silero VAD's speech probability per 32 ms frame (module docstring); 16 or 8 kHz."""

    def __init__(self, sample_rate: int, config: VADConfig | None = None):
        if int(sample_rate) not in SILERO_RATES:
            raise ConfigError(f"Silero VAD runs at {' or '.join(map(str, SILERO_RATES))} Hz, not {sample_rate}: "
                              "resample the stream, or choose the energy VAD")
        import torch

        self.model = load_silero_model()
        self._from_numpy = torch.from_numpy
        super().__init__(sample_rate, SILERO_RATES[int(sample_rate)], config or VADConfig())

    def reset(self) -> None:
        super().reset()
        self.model.reset_states()

    def _voiced(self, frame: np.ndarray) -> bool:
        # The wrapper runs ONNX Runtime on the tensor's numpy view: no autograd is involved.
        probability = float(self.model(self._from_numpy(np.ascontiguousarray(frame)), self.sr))
        threshold = self.cfg.speech_threshold
        return probability >= (threshold - SILERO_HYSTERESIS if self.active else threshold)


def make_vad(sample_rate: int, config: VADConfig | None = None) -> Segmenter:
    """The VAD ``config.kind`` names (Silero's by default)."""
    config = config or VADConfig()
    return SileroVAD(sample_rate, config) if config.kind == "silero" else EnergyVAD(sample_rate, config)
