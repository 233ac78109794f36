"""Settings of the listener and of its command line, in a module light enough for any CLI to import.

``fedser-client`` builds every subcommand's options at start; importing these must not load the
model stack (torch), which the resident device agent never needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fedser.client.vad import VADConfig
from fedser.common.errors import ConfigError, collect

RECURRENT_MODES = ("window", "state", "carry")
# "segment": one decision per voiced segment that fits in the KWS window, on the window centred on it;
# "sliding": a decision every hop over the last window (and for segments longer than the window).
DECISIONS = ("segment", "sliding")
STDIN_FORMATS = ("auto", "wav", "f32", "s16")


@dataclass(frozen=True)
class ListenConfig:
    """Settings of a ``Listener`` (times in seconds).

    ``hop_s`` is rounded to whole feature frames (and, in ``"state"`` mode, to whole GRU
    steps). ``threshold`` is the keyword probability needed to report it. ``decision`` says
    when keywords are decided (``DECISIONS``; ``fedser.client.listen.listener``); ``smooth_s``,
    ``peak_wait_s``, ``refractory_s`` and ``voice_recent_s`` shape the sliding decisions only.
    """

    hop_s: float = 0.08
    threshold: float = 0.5
    refractory_s: float = 0.8
    smooth_s: float = 0.1
    peak_wait_s: float = 0.3
    voice_recent_s: float = 0.5
    min_emotion_s: float = 0.5
    keywords: bool = True
    emotion: bool = True
    recurrent: str = "window"
    decision: str = "segment"
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
        if self.decision not in DECISIONS:
            problems.append(f"decision: expected one of {', '.join(DECISIONS)}; got {self.decision!r}")
        if not self.dc_cutoff_hz > 0:
            problems.append(f"dc_cutoff_hz: expected > 0; got {self.dc_cutoff_hz!r}")
        collect(problems, ConfigError, "ListenConfig")
