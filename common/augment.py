"""Training-time augmentation: time shift and background noise on waveforms, SpecAugment on features.

Only training batches pass through an ``Augmenter``; evaluation and inference never do.
Every random choice comes from the augmenter's own seeded generator, so a run with
the same seed and the same sequence of calls yields the same batches.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchaudio.functional as AF
import torchaudio.transforms as AT

from . import audio
from .errors import AudioContentError, AudioDecodeError, ConfigError, collect
from .features import FeatureSpec

log = logging.getLogger(__name__)

NOISE_EXTENSIONS = audio.AUDIO_EXTENSIONS
# Long noise recordings are read only this far: one minute of noise already gives
# thousands of distinct one-second segments, and memory stays bounded.
MAX_NOISE_SECONDS = 120.0


class Augmenter:
    """Waveform and feature augmentation for training batches.

    Args:
        spec: the feature spec (its ``sample_rate`` sets shift lengths and the rate noise is resampled to).
        noise_dir: folder of background-noise recordings (searched recursively for
            .wav/.flac/.ogg/.mp3, e.g. Speech Commands' ``_background_noise_``), or None
            for no noise mixing. Files are read once, here; unreadable files are skipped and
            listed in ``noise_skipped``.
        snr_db: ``(low, high)``; each noisy clip gets a signal-to-noise ratio drawn uniformly from it.
        p_noise: probability that a clip gets noise.
        max_shift_s: each clip is shifted by a uniform random amount in
            ``[-max_shift_s, max_shift_s]`` seconds; the gap is filled with zeros (no wrap-around).
        freq_mask: largest SpecAugment frequency mask, in feature rows (0 disables).
        time_mask: largest SpecAugment time mask, in frames (0 disables). The defaults
            (2 masks of up to 8 rows, 2 of up to 10 frames) hide at most 40 % of 40 mel
            rows and 20 % of a 1 s keyword clip, so a keyword is never masked out whole.
        seed: seed of the augmenter's generator.
        n_freq_masks, n_time_masks: how many masks of each kind per clip.

    Raises:
        ConfigError: listing every bad argument, or when ``noise_dir`` holds no usable audio.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        noise_dir: str | Path | None = None,
        snr_db: Sequence[float] = (0.0, 20.0),
        p_noise: float = 0.8,
        max_shift_s: float = 0.1,
        freq_mask: int = 8,
        time_mask: int = 10,
        seed: int = 0,
        *,
        n_freq_masks: int = 2,
        n_time_masks: int = 2,
    ):
        problems = []
        try:
            lo, hi = (float(x) for x in snr_db)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"snr_db: expected (low, high) finite dB with low <= high; got {snr_db!r}")
            lo = hi = 0.0
        if not (0.0 <= float(p_noise) <= 1.0):
            problems.append(f"p_noise: expected a probability in [0, 1]; got {p_noise!r}")
        if not (0.0 <= float(max_shift_s) <= 10.0):
            problems.append(f"max_shift_s: expected seconds in [0, 10]; got {max_shift_s!r}")
        for name, value in (
            ("freq_mask", freq_mask),
            ("time_mask", time_mask),
            ("n_freq_masks", n_freq_masks),
            ("n_time_masks", n_time_masks),
        ):
            if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0):
                problems.append(f"{name}: expected an integer >= 0; got {value!r}")
        if noise_dir is not None and not Path(noise_dir).is_dir():
            problems.append(f"noise_dir: {noise_dir} is not a folder (pass None for no noise mixing)")
        collect(problems, ConfigError, prefix="Augmenter")

        self.spec = spec
        self.snr_db = (lo, hi)
        self.p_noise = float(p_noise)
        self.max_shift = int(round(float(max_shift_s) * spec.sample_rate))
        self.n_freq_masks = int(n_freq_masks) if freq_mask > 0 else 0
        self.n_time_masks = int(n_time_masks) if time_mask > 0 else 0
        # iid_masks: every clip of a batch gets its own masks (needs a (B, C, F, N) input).
        self.freq_masking = AT.FrequencyMasking(max(int(freq_mask), 1), iid_masks=True)
        self.time_masking = AT.TimeMasking(max(int(time_mask), 1), iid_masks=True)
        self._rng = np.random.default_rng(seed)
        self.noise_skipped: list[tuple[str, str]] = []
        self.noises: list[np.ndarray] = []
        if noise_dir is not None:
            self.noises = self._load_noises(Path(noise_dir))
            if not self.noises:
                raise ConfigError(
                    f"Augmenter: noise_dir {noise_dir} holds no usable audio "
                    f"({', '.join(NOISE_EXTENSIONS)}); pass noise_dir=None for no noise mixing"
                )

    def _load_noises(self, folder: Path) -> list[np.ndarray]:
        # Decoded like every training clip (common.audio), so noise and speech share one
        # down-mix and one resampler.
        noises = []
        paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in NOISE_EXTENSIONS)
        for path in paths:
            try:
                wave = audio.load(path, self.spec.sample_rate, max_seconds=MAX_NOISE_SECONDS)
            except AudioDecodeError as e:
                self._skip(path, f"unreadable: {e.problem}")
                continue
            except AudioContentError:  # a header without samples, or NaN/Inf samples
                wave = None
            if wave is None or not np.any(wave):
                self._skip(path, "no usable samples (empty, silent or NaN/Inf)")
                continue
            noises.append(wave)
        return noises

    def _skip(self, path: Path, reason: str) -> None:
        self.noise_skipped.append((str(path), reason))
        log.warning("background noise %s skipped: %s", path, reason)

    # -- waveforms -----------------------------------------------------------
    def waves(self, batch: torch.Tensor) -> torch.Tensor:
        """Time shift, then background noise: ``(B, T)`` -> ``(B, T)`` (a new tensor)."""
        if batch.dim() != 2:
            raise ValueError(f"Augmenter.waves expects (B, T); got shape {tuple(batch.shape)}")
        out = self.shift(batch)
        if self.noises and self.p_noise > 0:
            out = self.add_noise(out)
        return out

    def shift(self, batch: torch.Tensor) -> torch.Tensor:
        """Shift each clip by its own random offset, zero filled: ``(B, T)`` -> ``(B, T)``."""
        out = batch.clone()
        if self.max_shift == 0:
            return out
        n = batch.shape[-1]
        shifts = self._rng.integers(-self.max_shift, self.max_shift + 1, size=batch.shape[0])
        for i, s in enumerate(shifts.tolist()):
            if s == 0:
                continue
            out[i].zero_()
            if abs(s) >= n:
                continue
            if s > 0:
                out[i, s:] = batch[i, : n - s]
            else:
                out[i, : n + s] = batch[i, -s:]
        return out

    def add_noise(self, batch: torch.Tensor) -> torch.Tensor:
        """Mix a random noise segment into a random subset of clips: ``(B, T)`` -> ``(B, T)``.

        Each chosen clip (probability ``p_noise``) gets a segment of a random noise file at
        an SNR drawn from ``snr_db``, measured over the whole clip. Silent clips are left
        unchanged (their SNR is undefined).
        """
        b, n = batch.shape
        chosen = self._rng.random(b) < self.p_noise
        snrs = self._rng.uniform(self.snr_db[0], self.snr_db[1], size=b)
        noise = np.zeros((b, n), dtype=np.float32)
        for i in np.flatnonzero(chosen):
            noise[i] = self._segment(self.noises[int(self._rng.integers(len(self.noises)))], n)
        noise_t = torch.from_numpy(noise).to(device=batch.device, dtype=batch.dtype)
        energy_signal = batch.pow(2).sum(dim=-1)
        energy_noise = noise_t.pow(2).sum(dim=-1)
        mix = torch.from_numpy(chosen).to(batch.device) & (energy_signal > 0) & (energy_noise > 0)
        if not bool(mix.any()):
            return batch.clone()
        out = batch.clone()
        snr_t = torch.from_numpy(snrs).to(device=batch.device, dtype=batch.dtype)
        out[mix] = AF.add_noise(batch[mix], noise_t[mix], snr_t[mix])
        return out

    def _segment(self, noise: np.ndarray, n: int) -> np.ndarray:
        # A random n-sample stretch; a recording shorter than n is looped.
        if noise.size < n:
            noise = np.resize(noise, n + noise.size)
        start = int(self._rng.integers(0, noise.size - n + 1))
        return noise[start : start + n]

    # -- features ------------------------------------------------------------
    def features(self, feats: torch.Tensor) -> torch.Tensor:
        """SpecAugment: ``(B, F, N)`` -> ``(B, F, N)``, each clip with its own masks.

        Masked cells are set to 0, the mean of utterance-normalised features.
        """
        if feats.dim() != 3:
            raise ValueError(f"Augmenter.features expects (B, F, N); got shape {tuple(feats.shape)}")
        if self.n_freq_masks == 0 and self.n_time_masks == 0:
            return feats.clone()
        # torchaudio draws masks from torch's global generator; fork it and seed it from
        # ours so augmentation is reproducible without disturbing anyone else's stream.
        seed = int(self._rng.integers(0, 2**63 - 1))
        devices = [feats.device] if feats.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            x = feats.unsqueeze(1)  # (B, 1, F, N)
            for _ in range(self.n_freq_masks):
                x = self.freq_masking(x)
            # A mask never hides more than a fifth of a clip's frames: a 1 s keyword clip on
            # speech_embedding's 80 ms grid has only 9.
            time_param = min(self.time_masking.mask_param, feats.shape[-1] // 5)
            for _ in range(self.n_time_masks if time_param > 0 else 0):
                x = AF.mask_along_axis_iid(x, time_param, 0.0, 3)
        return x.squeeze(1)
