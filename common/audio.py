"""Audio decoding: any file soundfile can read -> mono float32 at one sample rate.

``load`` is the single entry point both the device and the server use for clips, so every
feature is computed from the same samples; ``stream`` decodes the same way block by block, for
inputs too long to hold (the listener's files, background-noise recordings). Both read by
content, not by extension (an AIFF file named ``.wav`` decodes), down-mix by averaging channels
and resample with soxr (band-limited, HQ) through one streaming resampler, whose blocks join to
exactly what one pass over the whole signal gives: ``load`` is ``stream`` with one block.
``load`` reads at most ``max_seconds`` from disk, so a ten-minute recording never lands in
memory whole. Amplitudes are passed through as decoded (integer PCM lands in [-1, 1]); clipped
audio is valid.
"""
from __future__ import annotations

import hashlib
import math
import os
import stat
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr

from .errors import AudioContentError, AudioDecodeError, ConfigError

TARGET_SR = 16000
DEFAULT_MAX_SECONDS = 30.0
# Headers outside these are corrupt or crafted, not recordings (8 kHz telephony .. 768 kHz studio).
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 768_000
MAX_CHANNELS = 64
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
        st = path.stat()   # follows a symlink: what would be read
    except FileNotFoundError:
        raise AudioDecodeError(path, "file not found; check the path") from None
    except OSError as exc:
        raise AudioDecodeError(path, f"cannot read the file ({exc.strerror}); check its permissions") from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioDecodeError(path, "is a folder, not an audio file")
    if not stat.S_ISREG(st.st_mode):
        # A FIFO, socket or device (a link to /dev/zero named x.wav) would block or never end.
        raise AudioDecodeError(path, f"is a {_kind_of(st.st_mode)}, not a regular file; only files are read")
    if st.st_size == 0:
        raise AudioDecodeError(path, "empty file (0 bytes); re-copy or re-record it, or remove it")


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _check_header(path: Path, rate: int, channels: int, frames: int) -> None:
    """Refuse headers no recording has (a corrupt or crafted file): they would decode to nothing
    useful, or to more than memory holds."""
    problems = []
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        problems.append(f"sample rate {rate} Hz (expected {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE})")
    if not 1 <= channels <= MAX_CHANNELS:
        problems.append(f"{channels} channels (expected 1..{MAX_CHANNELS})")
    if frames < 0:
        problems.append(f"{frames} frames")
    if problems:
        raise AudioContentError(path, f"implausible header: {', '.join(problems)}; the file is corrupt, remove it")


def _check_args(who: str, sample_rate: int, offset: float, duration: float | None, max_seconds: float | None,
                block_seconds: float | None = None) -> None:
    problems = []
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        problems.append(f"sample_rate must be a positive integer, got {sample_rate!r}")
    if not math.isfinite(offset) or offset < 0:
        problems.append(f"offset must be >= 0 seconds, got {offset!r}")
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        problems.append(f"duration must be > 0 seconds or None, got {duration!r}")
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
        problems.append(f"max_seconds must be > 0 seconds or None, got {max_seconds!r}")
    if block_seconds is not None and not (math.isfinite(block_seconds) and block_seconds > 0):
        problems.append(f"block_seconds must be > 0 seconds, got {block_seconds!r}")
    if problems:
        raise ConfigError(f"{who}: " + "; ".join(problems))


def _open(path: Path) -> sf.SoundFile:
    _check_file(path)
    try:
        return sf.SoundFile(str(path))
    except (sf.SoundFileError, RuntimeError, TypeError) as exc:
        raise _open_error(path, exc) from None


def info(path: str | Path) -> tuple[int, int, int]:
    """``(sample_rate, frames, channels)`` from the header only (no samples are decoded)."""
    with _open(Path(path)) as f:
        return int(f.samplerate), int(f.frames), int(f.channels)


def duration_of(path: str | Path) -> float:
    """Length of an audio file in seconds, read from its header."""
    sr, frames, _ = info(path)
    return frames / sr


class Resampler:
    """Streaming resampler (soxr, HQ) of mono float32 blocks from ``source_rate`` to ``target`` Hz.

    Fed block by block and closed with ``last=True``, it yields exactly the samples one
    ``soxr.resample`` call over the whole signal would, so how a signal is cut into blocks
    never changes what the model hears. A pass-through when the rates agree.
    """

    def __init__(self, source_rate: int, target: int):
        self._stream = None
        if source_rate != target:
            self._stream = soxr.ResampleStream(source_rate, target, 1, dtype="float32", quality="HQ")

    def __call__(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        """``(n,)`` samples at the source rate -> ``(m,)`` at the target rate; ``last`` flushes
        the filter's delay line (the end of the signal)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self._stream.resample_chunk(x, last=last) if self._stream is not None else x


class _Reader:
    """An open audio file and the frames selected from it, read as mono float32 blocks at the
    file's own rate: the decoding that ``load`` and ``stream`` share.

    Raises ``AudioDecodeError`` (missing, empty, not audio, corrupt header) on opening and
    ``AudioContentError`` when ``offset`` lies past the end.
    """

    def __init__(self, path: Path, offset: float, duration: float | None, max_seconds: float | None):
        self.path = path
        self._file = _open(path)
        try:
            self.rate, total = int(self._file.samplerate), int(self._file.frames)
            _check_header(path, self.rate, int(self._file.channels), total)
            self.start = int(round(offset * self.rate))
            if total > 0 and self.start >= total:
                raise AudioContentError(
                    path, f"offset {offset:.3f} s is past the end of the file ({total / self.rate:.3f} s)"
                )
            limits = [total - self.start]
            if duration is not None:
                limits.append(int(round(duration * self.rate)))
            if max_seconds is not None:
                limits.append(int(round(max_seconds * self.rate)))
            self.frames = max(0, min(limits))  # frames selected
        except BaseException:
            self._file.close()
            raise
        self.frames_read = 0

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def blocks(self, block_frames: int, allow_nonfinite: bool = False) -> Iterator[np.ndarray]:
        """The selection as ``(n,)`` mono blocks of at most ``block_frames`` frames each.

        Only the selected frames are read (seek + bounded reads), so memory is bounded by the
        block whatever the file's length. NaN/Inf samples raise ``AudioContentError`` unless
        ``allow_nonfinite``.
        """
        whole = block_frames >= self.frames
        left = self.frames
        if self.start:
            self._guarded(self._file.seek, self.start)
        while left > 0:
            data = self._guarded(self._file.read, frames=min(block_frames, left), dtype="float32",
                                 always_2d=True)  # (n, channels)
            if data.shape[0] == 0:  # the data ends before its header said
                return
            first = self.start + self.frames_read
            left -= data.shape[0]
            self.frames_read += data.shape[0]
            bad = int(data.size - np.count_nonzero(np.isfinite(data)))
            if bad and not allow_nonfinite:
                where = "" if whole else (f" between {first / self.rate:.2f} and "
                                          f"{(first + data.shape[0]) / self.rate:.2f} s")
                raise AudioContentError(
                    self.path, f"{bad} of {data.size} samples{where} are NaN or Inf; the file is corrupt, "
                               "re-export it or remove it"
                )
            yield data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]

    def _guarded(self, call, *args, **kwargs):
        # The header opened cleanly, so a failure from here on is in the audio data itself.
        try:
            return call(*args, **kwargs)
        except (sf.SoundFileError, RuntimeError) as exc:
            detail = str(getattr(exc, "error_string", "") or exc)
            raise AudioDecodeError(
                self.path, f"audio data is corrupt or truncated ({detail}); re-copy or re-export it, or remove it"
            ) from None


def _resampled(blocks: Iterator[np.ndarray], source_rate: int, target: int) -> Iterator[np.ndarray]:
    resample = Resampler(source_rate, target)
    for block in blocks:
        yield resample(block)
    tail = resample(np.zeros(0, dtype=np.float32), last=True)
    if tail.size:
        yield tail


def stream(
    path: str | Path,
    sample_rate: int = TARGET_SR,
    block_seconds: float = 0.5,
    offset: float = 0.0,
    duration: float | None = None,
    max_seconds: float | None = None,
    *,
    allow_nonfinite: bool = False,
) -> Iterator[np.ndarray]:
    """Decode ``path`` block by block: mono float32 ``(n,)`` blocks at ``sample_rate``.

    Each block holds what ``block_seconds`` of the file decode to (the resampler's delay
    shifts a few samples between blocks; a last short block carries its tail). Joined, the
    blocks are exactly ``load(path, sample_rate, offset, duration, max_seconds)``. Arguments
    are checked at once; the file is opened on the first ``next()`` and closed when the
    generator ends or is closed.

    Raises what ``load`` raises, except that a file with a header but no samples yields no
    blocks, and NaN/Inf samples are passed through when ``allow_nonfinite`` (for a consumer
    that conditions them itself).
    """
    _check_args("audio.stream", sample_rate, offset, duration, max_seconds, block_seconds)
    return _stream(Path(path), int(sample_rate), block_seconds, offset, duration, max_seconds, allow_nonfinite)


def _stream(path: Path, sample_rate: int, block_seconds: float, offset: float, duration: float | None,
            max_seconds: float | None, allow_nonfinite: bool) -> Iterator[np.ndarray]:
    with _Reader(path, offset, duration, max_seconds) as reader:
        block = max(1, int(block_seconds * reader.rate))
        yield from _resampled(reader.blocks(block, allow_nonfinite), reader.rate, sample_rate)


def load(
    path: str | Path,
    sample_rate: int = TARGET_SR,
    offset: float = 0.0,
    duration: float | None = None,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> np.ndarray:
    """Decode ``path`` to mono float32 at ``sample_rate``: shape ``(T,)``, every sample finite.

    ``offset``/``duration`` (seconds) select a segment; ``max_seconds`` caps what is read from
    disk (``None`` reads to the end). Only the selected frames are read, in one request (soundfile
    seek + frames), so memory is bounded by ``max_seconds`` whatever the file's length.

    Raises ``AudioDecodeError`` when the file is missing, empty, truncated or not audio, and
    ``AudioContentError`` when it decodes to no samples or to NaN/Inf samples.
    """
    _check_args("audio.load", sample_rate, offset, duration, max_seconds)
    path = Path(path)
    with _Reader(path, offset, duration, max_seconds) as reader:
        # The whole selection as one block: one bounded read, the same samples as streaming it.
        parts = list(_resampled(reader.blocks(max(1, reader.frames)), reader.rate, int(sample_rate)))
        read = reader.frames_read
    if read == 0:
        raise AudioContentError(path, "no samples: the file has a header but no audio; re-record it or remove it")
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def content_hash(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex digest of the file's bytes, read in ``chunk_size`` chunks (bounded memory).

    Only regular files are read (``AudioDecodeError`` otherwise): a FIFO or a link to a device
    would block or never end.
    """
    path = Path(path)
    _check_file(path)
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
