"""Augmenter: SNR of noise mixing, time shift, SpecAugment, seeding, noise_dir handling."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from fedser.common import audio
from fedser.common.augment import MAX_NOISE_SECONDS, Augmenter
from fedser.common.errors import ConfigError
from fedser.common.features import FeatureSpec

SR = 16000
SPEC = FeatureSpec()


@pytest.fixture
def noise_dir(tmp_path):
    """Two noise files: 3 s white noise (16 kHz) and 0.5 s pink-ish noise at 8 kHz stereo, plus junk."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "noise"
    folder.mkdir()
    sf.write(folder / "white.flac", (0.1 * rng.standard_normal(3 * SR)).astype(np.float32), SR)
    brown = np.cumsum(rng.standard_normal((4000, 2)), axis=0)
    sf.write(folder / "brown.wav", (0.5 * brown / np.abs(brown).max()).astype(np.float32), 8000)
    (folder / "broken.wav").write_bytes(b"RIFF not really a wave file")
    (folder / "README.txt").write_text("not audio")
    return folder


def _speech_like(b: int, n: int = SR, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    rows = [np.sin(2 * np.pi * f * t) * (0.2 + 0.3 * rng.random()) for f in rng.uniform(150, 900, b)]
    return torch.from_numpy(np.stack(rows).astype(np.float32))


def _snr_db(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    noise = noisy - clean
    return 10 * torch.log10(clean.pow(2).sum(-1) / noise.pow(2).sum(-1))


@pytest.mark.parametrize("snr", [0.0, 7.5, 20.0])
def test_noise_is_mixed_at_the_requested_snr(noise_dir, snr):
    # Prepare
    aug = Augmenter(SPEC, noise_dir=noise_dir, snr_db=(snr, snr), p_noise=1.0, max_shift_s=0.0, seed=3)
    clean = _speech_like(8)

    # Execute
    noisy = aug.waves(clean)

    # Assert
    assert len(aug.noises) == 2
    assert [p.rsplit("/", 1)[-1] for p, _ in aug.noise_skipped] == ["broken.wav"]
    achieved = _snr_db(clean, noisy)
    assert torch.all((achieved - snr).abs() < 0.5), achieved


def test_noise_is_decoded_like_every_training_clip(noise_dir):
    # Execute
    aug = Augmenter(SPEC, noise_dir=noise_dir)

    # Assert: the 8 kHz stereo file too is down-mixed and resampled by common.audio.
    expected = [audio.load(noise_dir / name, SR, max_seconds=MAX_NOISE_SECONDS) for name in ("brown.wav", "white.flac")]
    assert len(aug.noises) == len(expected)
    for got, want in zip(aug.noises, expected):
        np.testing.assert_array_equal(got, want)


def test_p_noise_zero_and_no_noise_dir_leave_waves_unchanged(noise_dir):
    # Prepare
    clean = _speech_like(4)
    never = Augmenter(SPEC, noise_dir=noise_dir, p_noise=0.0, max_shift_s=0.0)
    without = Augmenter(SPEC, noise_dir=None, max_shift_s=0.0)

    # Execute / Assert
    assert torch.equal(never.waves(clean), clean)
    assert torch.equal(without.waves(clean), clean)


def test_p_noise_mixes_about_that_fraction(noise_dir):
    # Prepare
    aug = Augmenter(SPEC, noise_dir=noise_dir, p_noise=0.5, max_shift_s=0.0, seed=0)
    clean = _speech_like(400, n=1600)

    # Execute
    changed = (aug.waves(clean) != clean).any(dim=-1).float().mean()

    # Assert
    assert 0.4 < changed < 0.6


def test_silent_clip_is_left_silent(noise_dir):
    # Prepare
    aug = Augmenter(SPEC, noise_dir=noise_dir, p_noise=1.0, max_shift_s=0.0)

    # Execute
    out = aug.waves(torch.zeros(3, SR))

    # Assert
    assert torch.equal(out, torch.zeros(3, SR))


def test_time_shift_moves_content_and_fills_zeros():
    # Prepare
    aug = Augmenter(SPEC, noise_dir=None, max_shift_s=0.1, seed=5)
    clean = torch.arange(1, 8 * SR + 1, dtype=torch.float32).reshape(8, SR)

    # Execute
    out = aug.waves(clean)

    # Assert: each row is its input moved by one offset within +-1600 samples, zeros in the gap.
    shifts = []
    for row_in, row_out in zip(clean, out):
        first = int(torch.nonzero(row_out).flatten()[0])
        source = int(row_out[first] - row_in[0])  # input rows are increasing ramps
        shift = first - source
        shifts.append(shift)
        assert abs(shift) <= 1600
        if shift >= 0:
            assert torch.equal(row_out[shift:], row_in[: SR - shift])
            assert torch.all(row_out[:shift] == 0)
        else:
            assert torch.equal(row_out[: SR + shift], row_in[-shift:])
            assert torch.all(row_out[SR + shift :] == 0)
    assert len(set(shifts)) > 1


def test_same_seed_same_batches(noise_dir):
    # Prepare
    clean = _speech_like(6)
    feats = torch.randn(6, 40, 101)
    a = Augmenter(SPEC, noise_dir=noise_dir, seed=11)
    b = Augmenter(SPEC, noise_dir=noise_dir, seed=11)
    c = Augmenter(SPEC, noise_dir=noise_dir, seed=12)

    # Execute
    wa, wb, wc = a.waves(clean), b.waves(clean), c.waves(clean)
    fa, fb = a.features(feats), b.features(feats)

    # Assert
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    assert torch.equal(fa, fb)


def test_spec_augment_masks_bands_and_frames_per_clip():
    # Prepare
    aug = Augmenter(SPEC, freq_mask=10, time_mask=30, n_freq_masks=1, n_time_masks=1, seed=2)
    feats = torch.randn(16, 40, 101) + 5.0  # no natural zeros

    # Execute
    out = aug.features(feats)

    # Assert
    assert out.shape == feats.shape
    zeros = out == 0
    masked_rows = zeros.all(dim=-1).sum(dim=-1)  # fully masked bands per clip
    masked_cols = zeros.all(dim=-2).sum(dim=-1)  # fully masked frames per clip
    assert torch.all(masked_rows <= 10) and torch.all(masked_cols <= 30)
    assert (masked_rows > 0).sum() > 8 and (masked_cols > 0).sum() > 8
    assert len({tuple(z.all(dim=-1).nonzero().flatten().tolist()) for z in zeros}) > 1  # iid masks
    untouched = ~zeros
    assert torch.equal(out[untouched], feats[untouched])


def test_bad_arguments_are_collected(tmp_path):
    # Execute
    with pytest.raises(ConfigError) as info:
        Augmenter(SPEC, noise_dir=tmp_path / "missing", snr_db=(20, 0), p_noise=1.5, time_mask=-1)

    # Assert
    msg = str(info.value)
    for name in ("snr_db", "p_noise", "time_mask", "noise_dir"):
        assert name in msg


def test_noise_dir_without_audio_is_an_error(tmp_path):
    # Prepare
    (tmp_path / "notes.txt").write_text("nothing to hear")

    # Execute / Assert
    with pytest.raises(ConfigError, match="no usable audio"):
        Augmenter(SPEC, noise_dir=tmp_path)
