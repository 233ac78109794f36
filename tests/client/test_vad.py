"""Voice-activity detection: segments where the voice is, nothing in silence, DC or noise.

The energy detector is checked on synthetic voiced-like bursts; Silero's neural VAD (the
default) on synthesized speech, where it must also ignore those bursts and loud noise.
"""
import sys

import numpy as np
import pytest
import soundfile as sf

from fedser.client import vad as vad_module
from fedser.client.vad import EnergyVAD, SileroVAD, VADConfig, make_vad
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


def test_silero_settings_are_named():
    with pytest.raises(ConfigError, match="kind") as err:
        VADConfig(kind="webrtc", speech_threshold=1.5)
    assert "speech_threshold" in str(err.value)
    with pytest.raises(ConfigError, match="16000 or 8000 Hz, not 44100"):
        SileroVAD(44100)


# --------------------------------------------------------------------------- Silero VAD


@pytest.fixture(scope="module")
def spoken(tiny_corpus):
    """Two synthesized sentences in a quiet noise bed, 1 s apart: (wave, spoken intervals)."""
    clips = sorted((tiny_corpus / "emotion").rglob("*.wav"))[:2]
    wave, truth = [noise(1.0)], []
    t = 1.0
    for i, path in enumerate(clips):
        x, sr = sf.read(path, dtype="float32")
        assert sr == SR
        wave += [x + noise(x.size / SR + 1.0, seed=i + 1)[:x.size], noise(1.0, seed=i + 5)]
        truth.append((t, t + x.size / SR))
        t += x.size / SR + 1.0
    return np.concatenate(wave), truth


def _overlaps(seg, interval) -> bool:
    return seg.start < interval[1] and seg.end > interval[0]


def test_default_vad_is_silero_and_finds_each_sentence(spoken):
    wave, truth = spoken
    vad = make_vad(SR)
    segs = run(vad, wave)
    assert isinstance(vad, SileroVAD) and vad.frame == 512
    # Every segment lies on speech, and every sentence is covered by segments for most of its length.
    assert segs and all(any(_overlaps(s, iv) for iv in truth) for s in segs), (segs, truth)
    for start, end in truth:
        covered = sum(max(0.0, min(s.end, end) - max(s.start, start)) for s in segs)
        assert covered >= 0.6 * (end - start), (segs, truth)


def test_silero_ignores_what_only_sounds_loud(spoken):
    # An appliance's beeps and a burst of loud noise open segments in the energy detector, not in Silero's.
    t = np.arange(int(0.4 * SR)) / SR
    beep = (0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    beeps = np.concatenate([noise(1.0)] + [np.concatenate([beep, noise(0.6, seed=k)]) for k in range(4)])
    loud = np.concatenate([noise(1.0), noise(3.0, -20.0, seed=3), noise(1.0)])
    assert run(EnergyVAD(SR), beeps) and run(EnergyVAD(SR), loud)
    assert run(SileroVAD(SR), beeps) == []
    assert run(SileroVAD(SR), loud) == []
    assert run(SileroVAD(SR), np.zeros(3 * SR, dtype=np.float32)) == []


def test_silero_chunking_and_reset_do_not_change_the_result(spoken):
    wave, _ = spoken
    vad = SileroVAD(SR)
    a = run(vad, wave, chunk=1280)
    vad.reset()
    b = run(vad, wave, chunk=777)
    assert a == b and a


def test_a_missing_silero_package_or_model_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "silero_vad.utils_vad", None)    # as if not installed
    with pytest.raises(ConfigError, match="needs the silero-vad package"):
        SileroVAD(SR)
    monkeypatch.undo()
    monkeypatch.setattr(vad_module, "SILERO_MODEL", "missing.onnx")   # a wheel that lost its model
    with pytest.raises(ConfigError, match="cannot be loaded .*reinstall it with pip install --force-reinstall silero-vad"):
        SileroVAD(SR)
