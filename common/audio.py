"""Audio decoding: any file soundfile can read -> mono float32 at one sample rate.

``load`` is the single entry point both the device and the server use, so every feature is
computed from the same samples. It reads by content, not by extension (an AIFF file named
``.wav`` decodes), down-mixes by averaging channels, resamples with soxr (band-limited, HQ) and
reads at most ``max_seconds`` from disk: a ten-minute recording never lands in memory whole.
Amplitudes are passed through as decoded (integer PCM lands in [-1, 1]); clipped audio is valid.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import AudioContentError, AudioDecodeError, ConfigError

TARGET_SR = 16000
DEFAULT_MAX_SECONDS = 30.0
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")

_CONVERT_HINT = (
    "soundfile reads WAV, FLAC, OGG and MP3 (and AIFF/AU/W64 by content); "
    "convert it, e.g. `ffmpeg -i <file> -ac 1 -ar 16000 out.flac`, or remove it"
)
# First bytes of the containers soundfile reads, to tell "corrupt X" from "not audio at all".
_MAGIC = {b"RIFF": "WAV", b"RF64": "WAV", b"fLaC": "FLAC", b"OggS": "OGG", b"FORM": "AIFF", b"ID3": "MP3"}


def _sniff(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return None
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return name
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:  # MPEG frame sync
        return "MP3"
    return None


def _open_error(path: Path, exc: Exception) -> AudioDecodeError:
    """Turn a libsndfile open failure into an error that names the file, the problem and the fix."""
    detail = str(getattr(exc, "error_string", "") or exc)
    kind = _sniff(path)
    if kind is None:
        return AudioDecodeError(path, f"not a recognised audio format ({detail}); {_CONVERT_HINT}")
    return AudioDecodeError(
        path, f"corrupt or truncated {kind} file ({detail}); re-copy or re-export it, or remove it"
    )


def _check_file(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise AudioDecodeError(path, "file not found; check the path") from None
    except OSError as exc:
        raise AudioDecodeError(path, f"cannot read the file ({exc.strerror}); check its permissions") from None
    if path.is_dir():
        raise AudioDecodeError(path, "is a folder, not an audio file")
    if size == 0:
        raise AudioDecodeError(path, "empty file (0 bytes); re-copy or re-record it, or remove it")


def _check_args(sample_rate: int, offset: float, duration: float | None, max_seconds: float | None) -> None:
    problems = []
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        problems.append(f"sample_rate must be a positive integer, got {sample_rate!r}")
    if not math.isfinite(offset) or offset < 0:
        problems.append(f"offset must be >= 0 seconds, got {offset!r}")
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        problems.append(f"duration must be > 0 seconds or None, got {duration!r}")
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
        problems.append(f"max_seconds must be > 0 seconds or None, got {max_seconds!r}")
    if problems:
        raise ConfigError("audio.load: " + "; ".join(problems))


def info(path: str | Path) -> tuple[int, int, int]:
    """``(sample_rate, frames, channels)`` from the header only (no samples are decoded)."""
    path = Path(path)
    _check_file(path)
    try:
        with sf.SoundFile(str(path)) as f:
            return int(f.samplerate), int(f.frames), int(f.channels)
    except (sf.SoundFileError, RuntimeError, TypeError) as exc:
        raise _open_error(path, exc) from None


def duration_of(path: str | Path) -> float:
    """Length of an audio file in seconds, read from its header."""
    sr, frames, _ = info(path)
    return frames / sr


def load(
    path: str | Path,
    sample_rate: int = TARGET_SR,
    offset: float = 0.0,
    duration: float | None = None,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> np.ndarray:
    """Decode ``path`` to mono float32 at ``sample_rate``: shape ``(T,)``, every sample finite.

    ``offset``/``duration`` (seconds) select a segment; ``max_seconds`` caps what is read from
    disk (``None`` reads to the end). Only the selected frames are read (soundfile seek + frames),
    so memory is bounded by ``max_seconds`` whatever the file's length.

    Raises ``AudioDecodeError`` when the file is missing, empty, truncated or not audio, and
    ``AudioContentError`` when it decodes to no samples or to NaN/Inf samples.
    """
    _check_args(sample_rate, offset, duration, max_seconds)
    path = Path(path)
    _check_file(path)
    try:
        f = sf.SoundFile(str(path))
    except (sf.SoundFileError, RuntimeError, TypeError) as exc:
        raise _open_error(path, exc) from None
    with f:
        native_sr, total = int(f.samplerate), int(f.frames)
        start = int(round(offset * native_sr))
        if total > 0 and start >= total:
            raise AudioContentError(
                path, f"offset {offset:.3f} s is past the end of the file ({total / native_sr:.3f} s)"
            )
        limits = [total - start]
        if duration is not None:
            limits.append(int(round(duration * native_sr)))
        if max_seconds is not None:
            limits.append(int(round(max_seconds * native_sr)))
        n = max(0, min(limits))
        try:
            if start:
                f.seek(start)
            data = f.read(frames=n, dtype="float32", always_2d=True)  # (n, channels)
        except (sf.SoundFileError, RuntimeError) as exc:
            detail = str(getattr(exc, "error_string", "") or exc)
            raise AudioDecodeError(
                path, f"audio data is corrupt or truncated ({detail}); re-copy or re-export it, or remove it"
            ) from None
    if data.shape[0] == 0:
        raise AudioContentError(path, "no samples: the file has a header but no audio; re-record it or remove it")
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise AudioContentError(
            path, f"{bad} of {data.size} samples are NaN or Inf; the file is corrupt, re-export it or remove it"
        )
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if native_sr != sample_rate:
        mono = soxr.resample(mono, native_sr, int(sample_rate), quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def content_hash(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex digest of the file's bytes, read in ``chunk_size`` chunks (bounded memory)."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(chunk_size), b""):
                digest.update(block)
    except FileNotFoundError:
        raise AudioDecodeError(path, "file not found; check the path") from None
    except OSError as exc:
        raise AudioDecodeError(path, f"cannot read the file ({exc.strerror}); check its permissions") from None
    return digest.hexdigest()


def is_audio_path(path: str | Path) -> bool:
    """True when the file name has one of ``AUDIO_EXTENSIONS`` (case-insensitive)."""
    return os.path.splitext(str(path))[1].lower() in AUDIO_EXTENSIONS
