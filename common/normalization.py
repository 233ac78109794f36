"""Per-speaker feature normalisation: a device is a person, so it standardises with its own voice.

Frozen encoders see every microphone and every voice; what a head needs is how *this*
clip differs from *this* speaker's usual self (pitch, loudness and timbre are largely
properties of the person, emotion and words are departures from them). So each feature
row is shifted and scaled with running statistics of the speaker's own clips: no labels
are needed and nothing leaves the device. The same statistics serve inference on the
device; an unseen speaker at evaluation is normalised with their own unlabelled clips.

A speaker with fewer than ``MIN_CLIPS`` clips has no statistics worth the name; such
clips use the statistics pooled over every clip at hand (the global statistics), and
a log line says so.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

MIN_CLIPS = 2
# Floor of a row's standard deviation: a row constant over a speaker's clips (an eGeMAPS value
# openSMILE could not measure, digital silence) stays finite instead of exploding.
STD_FLOOR = 1e-3


@dataclass
class FeatureStats:
    """Running per-row statistics of feature maps; ``merge`` adds clips, ``apply`` standardises.

    Attributes:
        clips: clips seen; frames: frames seen (the statistics' sample count).
        total, total_sq: per-row sums of values and of squared values, float64.
    """

    clips: int
    frames: int
    total: np.ndarray
    total_sq: np.ndarray

    @classmethod
    def of(cls, feats: torch.Tensor | np.ndarray) -> "FeatureStats":
        """Statistics of ``(N, F, T)`` feature maps (or one ``(F, T)`` map)."""
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3:
            raise ConfigError(f"feature statistics need (clips, rows, frames) maps; got shape {x.shape}")
        return cls(clips=x.shape[0], frames=x.shape[0] * x.shape[2],
                   total=x.sum(axis=(0, 2)), total_sq=np.square(x).sum(axis=(0, 2)))

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        return FeatureStats(self.clips + other.clips, self.frames + other.frames,
                            self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.frames, 1)

    @property
    def std(self) -> np.ndarray:
        var = self.total_sq / max(self.frames, 1) - np.square(self.mean)
        return np.maximum(np.sqrt(np.maximum(var, 0.0)), STD_FLOOR)

    def apply(self, feats: torch.Tensor) -> torch.Tensor:
        """``(..., F, T)`` -> the same maps with every row standardised by these statistics."""
        mean = torch.as_tensor(self.mean, dtype=feats.dtype)[:, None]
        std = torch.as_tensor(self.std, dtype=feats.dtype)[:, None]
        return (feats - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return {"clips": self.clips, "frames": self.frames,
                "total": self.total.tolist(), "total_sq": self.total_sq.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeatureStats":
        try:
            stats = cls(int(d["clips"]), int(d["frames"]), np.asarray(d["total"], dtype=np.float64),
                        np.asarray(d["total_sq"], dtype=np.float64))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"feature statistics: unreadable ({exc})") from exc
        if stats.total.shape != stats.total_sq.shape or stats.total.ndim != 1 or stats.frames < 1 \
                or not (np.isfinite(stats.total).all() and np.isfinite(stats.total_sq).all()):
            raise ConfigError("feature statistics: sums must be two finite vectors of one length over >= 1 frame")
        return stats


def _clips_by_speaker(feats: torch.Tensor, speakers: Sequence[str]) -> dict[str, list[int]]:
    if len(speakers) != feats.shape[0]:
        raise ConfigError(f"{feats.shape[0]} clips but {len(speakers)} speaker names")
    index: dict[str, list[int]] = {}
    for i, s in enumerate(speakers):
        index.setdefault(s, []).append(i)
    return index


def speaker_stats(feats: torch.Tensor, speakers: Sequence[str]) -> dict[str, FeatureStats]:
    """Each speaker's statistics over their own clips of ``feats`` ``(N, F, T)``."""
    return {s: FeatureStats.of(feats[rows]) for s, rows in _clips_by_speaker(feats, speakers).items()}


def normalize_by_speaker(feats: torch.Tensor, speakers: Sequence[str],
                         fallback: FeatureStats | None = None) -> torch.Tensor:
    """``(N, F, T)`` -> each clip standardised with its speaker's statistics.

    Speakers with fewer than ``MIN_CLIPS`` clips use ``fallback`` (default: the statistics
    of all of ``feats``), with a log line.
    """
    if feats.shape[0] == 0:
        return feats
    pooled = fallback if fallback is not None else FeatureStats.of(feats)
    out = torch.empty_like(feats)
    thin = []
    for speaker, rows in _clips_by_speaker(feats, speakers).items():
        stats = FeatureStats.of(feats[rows])
        if stats.clips < MIN_CLIPS:
            thin.append(speaker)
            stats = pooled
        out[rows] = stats.apply(feats[rows])
    if thin:
        log.info("%d speaker(s) with fewer than %d clips (%s%s) normalised with the global statistics "
                 "of %d clips", len(thin), MIN_CLIPS, ", ".join(thin[:5]), ", ..." if len(thin) > 5 else "",
                 pooled.clips)
    return out


class RunningNormalizer:
    """Per-speaker normalisation at inference: running statistics of the audio this device has heard.

    ``normalizer(feats)`` adds the clips' statistics to the running ones (``update=True``) and
    standardises them with the result. Until ``MIN_CLIPS`` clips have been heard each clip is
    standardised with its own statistics. ``stats`` may start from statistics the device saved
    (``FeatureStats.to_dict``), e.g. those of its training audio.
    """

    def __init__(self, stats: FeatureStats | None = None):
        self.stats = stats

    def __call__(self, feats: torch.Tensor, update: bool = True) -> torch.Tensor:
        if update and feats.shape[0] > 0:
            seen = FeatureStats.of(feats)
            self.stats = seen if self.stats is None else self.stats.merge(seen)
        if self.stats is None or self.stats.clips < MIN_CLIPS:
            return torch.stack([FeatureStats.of(clip).apply(clip) for clip in feats]) if feats.shape[0] else feats
        return self.stats.apply(feats)
