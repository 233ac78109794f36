"""From utterances to tensors: decode, fit to the task's clip length, extract features.

Bad files are skipped and reported, never fatal: one corrupt recording must not stop a
device (or a centralized run) from using the rest of its data.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import audio
from .cache import FeatureCache
from .errors import AudioError
from .features import FeatureSpec, FrontEnd, fit_length
from .normalization import normalize_by_speaker
from .corpora import Utterance
from .taxonomy import EMOTIONS, KEYWORDS

HEAD_CLASSES: dict[str, tuple[str, ...]] = {"emotion": EMOTIONS, "kws": KEYWORDS}


@dataclass
class TaskData:
    """One task's examples; ``y`` indexes ``HEAD_CLASSES[task]``.

    ``feats`` (N, F, frames) are the un-augmented features (cached); ``waves`` (N, samples)
    are kept only when training augments the waveform.
    """

    task: str
    feats: torch.Tensor
    y: torch.Tensor
    speakers: list[str]
    waves: torch.Tensor | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def class_names(self) -> tuple[str, ...]:
        return HEAD_CLASSES[self.task]

    def labels_present(self) -> list[str]:
        return [self.class_names[i] for i in sorted(set(self.y.tolist()))]


def _decode(u: Utterance, spec: FeatureSpec, task: str) -> np.ndarray:
    n = spec.clip_samples(task)
    # Read a little more than the clip so centring has material on both sides, never unbounded.
    wave = audio.load(u.path, sample_rate=spec.sample_rate, offset=u.offset, duration=u.duration,
                      max_seconds=max(2.0 * n / spec.sample_rate, 1.0))
    return fit_length(wave, n, mode="center")


def build_task_data(utterances: Sequence[Utterance], spec: FeatureSpec, task: str,
                    cache: FeatureCache | None = None, keep_waves: bool = False,
                    progress: bool = True, desc: str | None = None) -> TaskData:
    """Decode and featurise every utterance of ``task``; bad files go to ``skipped``.

    The cache holds each clip's own features; with ``spec.normalize == "speaker"`` they are
    then standardised with each speaker's statistics over the clips given here.
    """
    classes = HEAD_CLASSES[task]
    cache = cache or FeatureCache(None)
    # Built at the first cache miss: a device whose clips are all cached (prepared before joining)
    # then loads no encoder runtimes, filter banks or librosa in its round.
    frontends: list[FrontEnd] = []
    # The cache holds what the front end computes per clip: speaker normalisation comes after it,
    # so "speaker" and "none" share entries.
    fp = (replace(spec, normalize="none") if spec.normalize == "speaker" else spec).fingerprint()
    feats, waves, ys, speakers, skipped = [], [], [], [], []
    items = [u for u in utterances if u.task == task]
    for u in tqdm(items, desc=desc or f"features ({task})", disable=not progress, unit="clip", leave=False):
        if u.label not in classes:
            skipped.append((u.path, f"label {u.label!r} is not a {task} class"))
            continue
        try:
            digest = audio.content_hash(u.path)
            wave_holder: dict[str, np.ndarray] = {}

            def compute() -> np.ndarray:
                wave_holder["w"] = _decode(u, spec, task)
                if not frontends:
                    frontends.append(FrontEnd(spec).eval())
                with torch.no_grad():
                    return frontends[0](torch.from_numpy(wave_holder["w"]))[0].numpy()

            f = cache.get((digest, fp, task, u.offset, u.duration), compute)
            if keep_waves:
                w = wave_holder.get("w")
                if w is None:
                    w = _decode(u, spec, task)
                waves.append(w)
        except AudioError as exc:
            skipped.append((u.path, exc.problem))
            continue
        except OSError as exc:
            skipped.append((u.path, str(exc)))
            continue
        feats.append(f)
        ys.append(classes.index(u.label))
        speakers.append(u.speaker)
    n_frames = spec.n_frames(spec.clip_samples(task))
    stacked = torch.from_numpy(np.stack(feats)) if feats else torch.zeros((0, spec.n_features(), n_frames))
    if spec.normalize == "speaker":
        stacked = normalize_by_speaker(stacked, speakers)
    return TaskData(
        task=task,
        feats=stacked,
        y=torch.tensor(ys, dtype=torch.long),
        speakers=speakers,
        waves=torch.from_numpy(np.stack(waves)) if (keep_waves and waves) else None,
        skipped=skipped,
    )


def report_skipped(skipped: Sequence[tuple[str, str]], limit: int = 10) -> str:
    """A short human summary: the count, then up to ``limit`` names with reasons."""
    if not skipped:
        return "no files skipped"
    lines = [f"{len(skipped)} file(s) skipped:"]
    lines += [f"  {p}: {why}" for p, why in list(skipped)[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more (see the run's metrics.json)")
    return "\n".join(lines)
