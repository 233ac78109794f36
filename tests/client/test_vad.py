"""Energy VAD: segments where the voice is, nothing in silence, DC or steady noise."""
import numpy as np
import pytest

from fedser.client.vad import EnergyVAD, VADConfig
from fedser.common.errors import ConfigError

SR = 16000


def burst(seconds: float, level_dbfs: float = -20.0, f0: float = 180.0) -> np.ndarray:
    """A voiced-like sound: harmonics of ``f0`` with a 4 Hz syllable envelope."""
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    x *= 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)
    return (x * 10 ** (level_dbfs / 20) / np.sqrt(np.mean(x ** 2))).astype(np.float32)


def noise(seconds: float, level_dbfs: float = -60.0, seed: int = 0) -> np.ndarray:
    return (10 ** (level_dbfs / 20) * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def timeline(parts: list[tuple[str, float]], noise_db: float = -60.0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Concatenate ("noise" | "voice", seconds) parts over a noise bed; return the voiced intervals."""
    total = sum(s for _, s in parts)
    wave = noise(total, noise_db)
    t, truth = 0.0, []
    for kind, seconds in parts:
        if kind == "voice":
            i = int(t * SR)
            b = burst(seconds)
            wave[i:i + b.size] += b
            truth.append((t, t + seconds))
        t += seconds
    return wave, truth


def run(vad: EnergyVAD, wave: np.ndarray, chunk: int = 1600):
    segs = []
    for i in range(0, wave.size, chunk):
        segs += vad.process(wave[i:i + chunk])
    return segs + vad.flush()


def test_finds_each_voiced_stretch_within_a_frame_or_two():
    wave, truth = timeline([("noise", 1.0), ("voice", 0.6), ("noise", 1.2), ("voice", 1.5), ("noise", 0.8)])
    segs = run(EnergyVAD(SR), wave)
    assert len(segs) == 2
    for seg, (start, end) in zip(segs, truth):
        assert abs(seg.start - start) <= 0.06 and abs(seg.end - end) <= 0.06


def test_silence_and_steady_noise_give_no_segment():
    assert run(EnergyVAD(SR), np.zeros(5 * SR, dtype=np.float32)) == []
    assert run(EnergyVAD(SR), noise(5.0, -30.0)) == []


def test_dc_offset_is_not_voice_and_does_not_hide_it():
    wave, truth = timeline([("noise", 1.0), ("voice", 0.8), ("noise", 1.0)])
    segs = run(EnergyVAD(SR), wave + 0.4)
    assert len(segs) == 1 and abs(segs[0].start - truth[0][0]) <= 0.06
    assert run(EnergyVAD(SR), noise(3.0) + 0.4) == []


def test_floor_adapts_to_louder_background_noise():
    # Noise jumps by 30 dB: the VAD calls it voice at first, then absorbs it within the floor window.
    wave = np.concatenate([noise(2.0, -60.0), noise(6.0, -30.0, seed=1)])
    vad = EnergyVAD(SR, VADConfig(floor_window_s=1.0))
    segs = run(vad, wave)
    assert len(segs) == 1 and segs[0].end < 2.0 + 1.5


def test_segments_are_cut_at_max_length():
    wave = burst(7.0)
    segs = run(EnergyVAD(SR, VADConfig(max_segment_s=2.0, floor_window_s=10.0)), wave)
    assert len(segs) >= 3 and all(s.duration <= 2.0 + 1e-6 for s in segs)


def test_chunking_does_not_change_the_result():
    wave, _ = timeline([("noise", 0.7), ("voice", 0.5), ("noise", 0.9), ("voice", 0.4), ("noise", 0.5)])
    a = run(EnergyVAD(SR), wave, chunk=1600)
    b = run(EnergyVAD(SR), wave, chunk=333)
    assert a == b and len(a) == 2


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="hangover_s"):
        VADConfig(hangover_s=-1)
