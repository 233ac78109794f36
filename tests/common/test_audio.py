"""common.audio: decoding, down-mixing, resampling, bounded reads, streaming and every kind of bad file."""
from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from fedser.common import audio
from fedser.common.errors import AudioContentError, AudioDecodeError, AudioError, ConfigError


def sine(sr: int, seconds: float, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spectrum)])


# ----------------------------------------------------------------------------- good input

@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000, 96000])
def test_load_resamples_to_16k_keeping_pitch_and_level(tmp_path, sr):
    # Prepare
    path = tmp_path / f"tone_{sr}.wav"
    sf.write(path, sine(sr, 0.5), sr, subtype="PCM_16")
    # Execute
    y = audio.load(path)
    # Assert
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - 8000) <= 1
    assert abs(peak_hz(y, audio.TARGET_SR) - 440.0) <= 4.0
    assert np.sqrt(np.mean(y[400:-400] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_load_at_target_rate_returns_the_samples_unchanged(tmp_path):
    # Prepare
    x = sine(16000, 0.25)
    path = tmp_path / "x.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    # Execute
    y = audio.load(path)
    # Assert
    np.testing.assert_array_equal(y, x)


def test_load_can_resample_to_another_rate(tmp_path):
    # Prepare
    path = tmp_path / "x.wav"
    sf.write(path, sine(16000, 1.0), 16000)
    # Execute
    y = audio.load(path, sample_rate=8000)
    # Assert
    assert len(y) == 8000
    assert abs(peak_hz(y, 8000) - 440.0) <= 2.0


def test_stereo_is_downmixed_by_averaging_channels(tmp_path):
    # Prepare
    left, right = sine(16000, 0.2, 440), sine(16000, 0.2, 1000, amp=0.25)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    # Execute
    y = audio.load(path)
    # Assert
    np.testing.assert_allclose(y, (left + right) / 2, atol=1e-6)


def test_8_bit_pcm_decodes_to_float_in_range(tmp_path):
    # Prepare
    x = sine(16000, 0.2)
    path = tmp_path / "u8.wav"
    sf.write(path, x, 16000, subtype="PCM_U8")
    # Execute
    y = audio.load(path)
    # Assert
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x, atol=1.5 / 128)


def test_32_bit_float_pcm_is_exact(tmp_path):
    # Prepare
    x = sine(16000, 0.2, amp=0.9)
    path = tmp_path / "f32.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    # Execute / Assert
    np.testing.assert_array_equal(audio.load(path), x)


@pytest.mark.parametrize("fmt,ext,subtype", [("FLAC", ".flac", "PCM_16"), ("OGG", ".ogg", "VORBIS"),
                                             ("MP3", ".mp3", "MPEG_LAYER_III")])
def test_compressed_formats_decode(tmp_path, fmt, ext, subtype):
    # Prepare
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")
    path = tmp_path / f"tone{ext}"
    sf.write(path, sine(16000, 0.5), 16000, format=fmt, subtype=subtype)
    # Execute
    y = audio.load(path)
    # Assert
    assert abs(len(y) - 8000) <= 8000 * 0.05
    assert abs(peak_hz(y, 16000) - 440.0) <= 4.0


def test_all_zero_silence_is_valid_and_returns_zeros(tmp_path):
    # Prepare
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    # Execute
    y = audio.load(path)
    # Assert
    assert y.shape == (16000,) and not y.any()


def test_clipped_audio_is_accepted_within_full_scale(tmp_path):
    # Prepare: a sine driven 4x past full scale, hard-clipped by the int16 writer.
    path = tmp_path / "clipped.wav"
    sf.write(path, np.clip(4 * sine(16000, 0.5), -1, 1), 16000, subtype="PCM_16")
    # Execute
    y = audio.load(path)
    # Assert
    assert np.isfinite(y).all()
    assert 0.999 <= np.abs(y).max() <= 1.0
    assert np.mean(np.abs(y) > 0.999) > 0.5   # most samples sit on the rails: really clipped


def test_aiff_content_with_wav_name_is_accepted_since_it_decodes(tmp_path):
    # Prepare: soundfile reads by content, not by extension.
    x = sine(16000, 0.2)
    path = tmp_path / "actually_aiff.wav"
    sf.write(path, x, 16000, format="AIFF", subtype="FLOAT")
    # Execute
    y = audio.load(path)
    # Assert
    np.testing.assert_array_equal(y, x)


def test_offset_and_duration_select_a_segment(tmp_path):
    # Prepare
    x = (np.arange(32000) / 32000).astype(np.float32)
    path = tmp_path / "ramp.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    # Execute
    y = audio.load(path, offset=0.5, duration=0.25)
    # Assert
    np.testing.assert_array_equal(y, x[8000:12000])


def test_ten_minute_file_reads_only_max_seconds(tmp_path, monkeypatch):
    # Prepare: 10 minutes written in blocks, so the test itself never holds it whole either.
    path = tmp_path / "long.wav"
    block = sine(16000, 10.0)
    with sf.SoundFile(path, "w", 16000, 1, subtype="PCM_16") as out:
        for _ in range(60):
            out.write(block)
    requested = []
    real_read = sf.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        requested.append(frames)
        return real_read(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    # Execute
    tracemalloc.start()
    y = audio.load(path, max_seconds=2.0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Assert
    assert audio.duration_of(path) == pytest.approx(600.0)
    assert len(y) == 32000
    assert requested == [32000]
    assert peak < 2_000_000   # the whole file as float32 would be 38 MB


def test_duration_is_capped_by_max_seconds(tmp_path):
    # Prepare
    path = tmp_path / "x.wav"
    sf.write(path, sine(16000, 3.0), 16000)
    # Execute
    capped = audio.load(path, duration=2.5, max_seconds=1.0)
    unbounded = audio.load(path, max_seconds=None)
    # Assert
    assert len(capped) == 16000 and len(unbounded) == 48000


# ----------------------------------------------------------------------------- bad input

def test_empty_file_is_a_decode_error_naming_the_file(tmp_path):
    # Prepare
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    # Execute
    with pytest.raises(AudioDecodeError) as info:
        audio.load(path)
    # Assert
    assert info.value.path == str(path)
    assert "empty file" in str(info.value) and str(path) in str(info.value)


def test_truncated_header_is_a_decode_error(tmp_path):
    # Prepare
    good = tmp_path / "good.wav"
    sf.write(good, sine(16000, 0.2), 16000)
    path = tmp_path / "truncated.wav"
    path.write_bytes(good.read_bytes()[:30])
    # Execute
    with pytest.raises(AudioDecodeError) as info:
        audio.load(path)
    # Assert
    assert "corrupt or truncated WAV" in info.value.problem


def test_truncated_flac_data_is_a_decode_error(tmp_path):
    # Prepare
    good = tmp_path / "good.flac"
    sf.write(good, np.random.default_rng(0).uniform(-0.5, 0.5, 16000).astype(np.float32), 16000)
    data = good.read_bytes()
    path = tmp_path / "truncated.flac"
    path.write_bytes(data[: len(data) // 2])
    # Execute / Assert
    with pytest.raises(AudioDecodeError, match="corrupt or truncated"):
        audio.load(path)


def test_non_audio_bytes_named_wav_is_a_decode_error_saying_what_to_do(tmp_path):
    # Prepare
    path = tmp_path / "notes.wav"
    path.write_bytes(b"this is a text file, not audio\n" * 50)
    # Execute
    with pytest.raises(AudioDecodeError) as info:
        audio.load(path)
    # Assert
    assert "not a recognised audio format" in info.value.problem
    assert "ffmpeg" in info.value.problem


def test_header_without_samples_is_a_content_error(tmp_path):
    # Prepare
    path = tmp_path / "no_samples.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    # Execute / Assert
    with pytest.raises(AudioContentError, match="no samples"):
        audio.load(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_samples_are_a_content_error(tmp_path, bad):
    # Prepare
    x = sine(16000, 0.2)
    x[[10, 20, 30]] = bad
    path = tmp_path / "nan.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    # Execute
    with pytest.raises(AudioContentError) as info:
        audio.load(path)
    # Assert
    assert "3 of 3200 samples are NaN or Inf" in info.value.problem


def test_missing_file_is_a_decode_error(tmp_path):
    # Execute / Assert
    with pytest.raises(AudioDecodeError, match="not found"):
        audio.load(tmp_path / "nope.wav")


def test_offset_past_the_end_is_a_content_error(tmp_path):
    # Prepare
    path = tmp_path / "short.wav"
    sf.write(path, sine(16000, 0.5), 16000)
    # Execute / Assert
    with pytest.raises(AudioContentError, match="past the end"):
        audio.load(path, offset=1.0)


def test_bad_arguments_are_config_errors_listing_every_problem(tmp_path):
    # Execute
    with pytest.raises(ConfigError) as info:
        audio.load(tmp_path / "x.wav", sample_rate=0, offset=-1.0, max_seconds=0)
    # Assert
    message = str(info.value)
    assert "sample_rate" in message and "offset" in message and "max_seconds" in message


def test_audio_errors_share_one_base_class():
    # Assert: callers can catch every unusable file with one except clause.
    assert issubclass(AudioDecodeError, AudioError) and issubclass(AudioContentError, AudioError)


# ----------------------------------------------------------------------------- stream

@pytest.mark.parametrize("sr,channels", [(16000, 1), (44100, 2), (8000, 1)])
@pytest.mark.parametrize("block_seconds", [0.1, 0.37, 10.0])
def test_streamed_blocks_join_to_exactly_what_load_returns(tmp_path, sr, channels, block_seconds):
    # Prepare: 1.3 s of noise, so every sample of every block matters.
    x = np.random.default_rng(sr).uniform(-0.5, 0.5, (int(1.3 * sr), channels)).astype(np.float32)
    path = tmp_path / "x.wav"
    sf.write(path, x, sr, subtype="FLOAT")
    # Execute
    blocks = list(audio.stream(path, block_seconds=block_seconds))
    # Assert
    assert all(b.dtype == np.float32 and b.ndim == 1 for b in blocks)
    assert len(blocks) >= int(1.3 / block_seconds)
    np.testing.assert_array_equal(np.concatenate(blocks), audio.load(path, max_seconds=None))


def test_stream_reads_block_by_block_within_the_selection(tmp_path, monkeypatch):
    # Prepare
    path = tmp_path / "x.wav"
    sf.write(path, sine(16000, 3.0), 16000, subtype="FLOAT")
    requested = []
    real_read = sf.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        requested.append(frames)
        return real_read(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    # Execute
    y = np.concatenate(list(audio.stream(path, block_seconds=0.5, offset=0.25, duration=1.5)))
    # Assert
    assert requested == [8000, 8000, 8000]
    np.testing.assert_array_equal(y, audio.load(path, offset=0.25, duration=1.5))


@pytest.mark.parametrize("make", ["truncated_header", "not_audio", "truncated_flac_data", "missing"])
def test_stream_raises_what_load_raises_for_a_bad_file(tmp_path, make):
    # Prepare
    good = tmp_path / "good.flac"
    sf.write(good, np.random.default_rng(0).uniform(-0.5, 0.5, 48000).astype(np.float32), 16000)
    data = good.read_bytes()
    path = tmp_path / "bad.flac"
    if make == "truncated_header":
        path.write_bytes(data[:30])
    elif make == "not_audio":
        path.write_bytes(b"this is a text file, not audio\n" * 50)
    elif make == "truncated_flac_data":
        path.write_bytes(data[: len(data) // 2])
    # Execute
    with pytest.raises(AudioDecodeError) as loaded:
        audio.load(path)
    with pytest.raises(AudioDecodeError) as streamed:
        list(audio.stream(path, block_seconds=0.25))
    # Assert
    assert streamed.value.problem == loaded.value.problem


def test_stream_of_a_header_without_samples_is_empty(tmp_path):
    # Prepare
    path = tmp_path / "no_samples.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    # Execute / Assert: a stream simply ends; load, which must return samples, raises.
    assert list(audio.stream(path)) == []
    with pytest.raises(AudioContentError, match="no samples"):
        audio.load(path)


def test_stream_names_where_non_finite_samples_are_unless_they_are_allowed(tmp_path):
    # Prepare
    x = sine(16000, 2.0)
    x[20000] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    # Execute
    with pytest.raises(AudioContentError) as info:
        list(audio.stream(path, block_seconds=0.5))
    passed = np.concatenate(list(audio.stream(path, block_seconds=0.5, allow_nonfinite=True)))
    # Assert
    assert "1 of 8000 samples between 1.00 and 1.50 s are NaN or Inf" in info.value.problem
    assert np.isnan(passed[20000]) and np.isfinite(np.delete(passed, 20000)).all()


def test_stream_checks_its_arguments_before_any_block(tmp_path):
    # Execute / Assert: the error comes from the call, not from the first next().
    with pytest.raises(ConfigError, match="audio.stream: .*block_seconds"):
        audio.stream(tmp_path / "x.wav", block_seconds=0)


# ----------------------------------------------------------------------------- content_hash

def test_content_hash_is_sha256_of_the_bytes_whatever_the_chunk_size(tmp_path):
    # Prepare
    path = tmp_path / "x.wav"
    sf.write(path, sine(16000, 0.3), 16000)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    # Execute
    whole = audio.content_hash(path)
    chunked = audio.content_hash(path, chunk_size=7)
    # Assert
    assert whole == chunked == expected


def test_content_hash_changes_with_the_content(tmp_path):
    # Prepare
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    sf.write(a, sine(16000, 0.3), 16000)
    sf.write(b, sine(16000, 0.3, freq=441), 16000)
    # Execute / Assert
    assert audio.content_hash(a) != audio.content_hash(b)


def test_content_hash_of_missing_file_names_it(tmp_path):
    # Execute / Assert
    with pytest.raises(AudioDecodeError, match="not found"):
        audio.content_hash(tmp_path / "gone.wav")


# -- files that are not recordings ------------------------------------------------------------


def _in_a_thread(call, seconds=5.0):
    """Run ``call`` in a daemon thread; the test fails (instead of hanging) if it blocks."""
    import threading

    box: dict = {}

    def target():
        try:
            box["value"] = call()
        except BaseException as exc:   # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for more than {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.mark.parametrize("make", ["fifo", "device link"])
@pytest.mark.parametrize("read", ["load", "content_hash", "stream"])
def test_fifos_and_devices_are_refused_at_once(make, read, tmp_path):
    # Prepare: what a corpus folder might hold under an audio name.
    import os

    path = tmp_path / "x.wav"
    if make == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    calls = {"load": lambda: audio.load(path), "content_hash": lambda: audio.content_hash(path),
             "stream": lambda: list(audio.stream(path))}
    # Execute / Assert: a clear error within a second, no read that never ends.
    with pytest.raises(AudioDecodeError, match="not a regular file"):
        _in_a_thread(calls[read], seconds=1.0)


def _wav_with_rate(path, rate: int) -> None:
    """A 16-bit mono WAV whose header claims ``rate`` Hz (the fmt chunk edited in place)."""
    import struct

    sf.write(str(path), np.zeros(1600, np.int16), 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    fmt = data.index(b"fmt ") + 8
    struct.pack_into("<I", data, fmt + 4, rate)           # sample rate
    struct.pack_into("<I", data, fmt + 8, rate * 2)       # byte rate
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rate", [2_000_000_000, 10])
def test_a_header_claiming_an_absurd_rate_is_skipped_with_the_reason(rate, tmp_path):
    # Prepare
    path = tmp_path / "odd.wav"
    _wav_with_rate(path, rate)
    # Execute / Assert
    with pytest.raises(AudioContentError, match="implausible header: sample rate"):
        audio.load(path)
