"""Per-speaker normalisation: each speaker standardised by their own clips, thin speakers fall back."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fedser.common.errors import ConfigError
from fedser.common.normalization import MIN_CLIPS, FeatureStats, normalize_by_speaker, speaker_stats


def _feats(n: int, offset: float, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, 9, generator=g) * scale + offset


def test_each_speaker_comes_out_standardised_whatever_their_level():
    # Prepare: two speakers whose microphones and voices differ by a gain and an offset
    a, b = _feats(5, 10.0, 3.0, 0), _feats(4, -2.0, 0.5, 1)
    feats = torch.cat([a, b])

    # Execute
    out = normalize_by_speaker(feats, ["a"] * 5 + ["b"] * 4)

    # Assert
    for rows in (slice(0, 5), slice(5, 9)):
        x = out[rows].transpose(0, 1).reshape(6, -1)
        assert x.mean(dim=1).abs().max() < 1e-4
        assert (x.std(dim=1, unbiased=False) - 1).abs().max() < 1e-3
    torch.testing.assert_close(normalize_by_speaker(a * 2 + 7, ["a"] * 5), normalize_by_speaker(a, ["a"] * 5),
                               rtol=1e-4, atol=1e-4)


def test_a_speaker_with_one_clip_uses_the_global_statistics_and_says_so(caplog):
    feats = torch.cat([_feats(6, 0.0, 1.0, 0), _feats(1, 50.0, 1.0, 1)])
    speakers = ["a"] * 6 + ["lonely"]

    with caplog.at_level(logging.INFO, logger="fedser.common.normalization"):
        out = normalize_by_speaker(feats, speakers)

    assert MIN_CLIPS > 1
    torch.testing.assert_close(out[6:], FeatureStats.of(feats).apply(feats[6:]))
    assert "lonely" in caplog.text and "global statistics" in caplog.text


def test_running_statistics_merge_to_the_statistics_of_all_clips():
    a, b = _feats(3, 1.0, 2.0, 0), _feats(4, 0.0, 1.0, 1)
    merged = FeatureStats.of(a).merge(FeatureStats.of(b))
    whole = FeatureStats.of(torch.cat([a, b]))
    np.testing.assert_allclose(merged.mean, whole.mean)
    np.testing.assert_allclose(merged.std, whole.std)
    assert merged.clips == 7


def test_constant_rows_stay_finite():
    feats = torch.zeros(3, 4, 5)
    out = normalize_by_speaker(feats, ["s"] * 3)
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_statistics_round_trip_and_bad_ones_are_refused():
    stats = speaker_stats(_feats(3, 0.0, 1.0, 0), ["s"] * 3)["s"]
    back = FeatureStats.from_dict(stats.to_dict())
    np.testing.assert_array_equal(back.mean, stats.mean)
    with pytest.raises(ConfigError, match="unreadable"):
        FeatureStats.from_dict({"clips": 1})
    with pytest.raises(ConfigError, match="finite"):
        FeatureStats.from_dict({**stats.to_dict(), "total": [float("nan")] * 6})
    with pytest.raises(ConfigError, match="speaker names"):
        speaker_stats(_feats(3, 0.0, 1.0, 0), ["s"])
