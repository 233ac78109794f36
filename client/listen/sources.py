"""Audio inputs of the listener: files, byte streams (stdin) and the microphone.

Each source is an iterator of mono float32 chunks at the model's rate, so the listener never
sees a file format, a channel count or a sample rate. Files decode through ``common.audio``, the
decoder that made the training clips. Stdin cannot be seeked, so libsndfile cannot open it: its
few formats (a WAV stream, raw float32 or 16-bit PCM) are parsed here and resampled by the same
``audio.Resampler``. ``sounddevice`` is imported only when the microphone is asked for: most
devices stream files or stdin and need no PortAudio.
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from fedser.common import audio
from fedser.common.errors import AudioDecodeError, ConfigError

from .config import STDIN_FORMATS
from .listener import Notice, to_stderr


def _rate_notice(name: str, rate: int, target: int, notice: Notice) -> None:
    if rate != target:
        notice(f"{name} is {rate} Hz; resampling to {target} Hz")


def file_chunks(path: str | Path, target_rate: int, block_s: float = 0.5,
                notice: Notice = to_stderr) -> Iterator[np.ndarray]:
    """Mono float32 chunks of an audio file at ``target_rate``, each from ``block_s`` seconds of it.

    The whole file is streamed (no ``max_seconds`` cap) in bounded memory.
    """
    path = Path(path)
    rate, _, channels = audio.info(path)  # clear errors for missing, empty, corrupt files
    _rate_notice(str(path), rate, target_rate, notice)
    if channels > 1:
        notice(f"{path} has {channels} channels; mixing them down to mono")
    # NaN/Inf samples pass through: the listener replaces them by 0 itself, with a notice.
    yield from audio.stream(path, target_rate, block_seconds=block_s, allow_nonfinite=True)


_WAV_SAMPLE = {(1, 8): "u1", (1, 16): "<i2", (1, 32): "<i4", (3, 32): "<f4", (3, 64): "<f8"}


def read_wav_header(stream: BinaryIO) -> tuple[int, int, str]:
    """Parse a WAV header from a non-seekable stream, leaving it at the first sample.

    Returns ``(sample_rate, channels, numpy dtype)``. The data chunk's size is ignored
    (streaming writers leave it 0 or 0xFFFFFFFF): samples are read until end of stream.
    """
    def read(n: int) -> bytes:
        b = stream.read(n)
        if len(b) < n:
            raise AudioDecodeError("<stdin>", "the WAV header ends early (truncated stream)")
        return b

    head = read(12)
    if head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        raise AudioDecodeError("<stdin>", "not a WAV stream (no RIFF/WAVE header); use --format f32 or s16 "
                                          "for raw samples")
    fmt = None
    while True:
        cid, size = (lambda h: (h[:4], int.from_bytes(h[4:], "little")))(read(8))
        if cid == b"data":
            break
        body = read(size + (size & 1))
        if cid == b"fmt ":
            tag, channels, rate = (int.from_bytes(body[0:2], "little"), int.from_bytes(body[2:4], "little"),
                                   int.from_bytes(body[4:8], "little"))
            bits = int.from_bytes(body[14:16], "little")
            if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the sub-format's tag
                tag = int.from_bytes(body[24:26], "little")
            fmt = (tag, channels, rate, bits)
    if fmt is None:
        raise AudioDecodeError("<stdin>", "WAV stream has no fmt chunk before its data")
    tag, channels, rate, bits = fmt
    if (tag, bits) not in _WAV_SAMPLE or channels < 1 or rate < 1:
        raise AudioDecodeError("<stdin>", f"unsupported WAV sample format (format tag {tag}, {bits} bits); "
                                          "send 16-bit PCM or 32-bit float")
    return rate, channels, _WAV_SAMPLE[(tag, bits)]


def _to_float(raw: np.ndarray) -> np.ndarray:
    if raw.dtype == np.uint8:
        return (raw.astype(np.float32) - 128.0) / 128.0
    if raw.dtype.kind == "i":
        return raw.astype(np.float32) / float(2 ** (8 * raw.dtype.itemsize - 1))
    return raw.astype(np.float32)


def stream_chunks(stream: BinaryIO, target_rate: int, fmt: str = "auto", rate: int | None = None,
                  block_s: float = 0.1, notice: Notice = to_stderr) -> Iterator[np.ndarray]:
    """Mono float32 chunks from a byte stream (stdin): a WAV stream or raw samples.

    ``fmt``: ``"wav"``, ``"f32"`` (raw little-endian float32), ``"s16"`` (raw 16-bit PCM),
    or ``"auto"`` (a WAV stream when it starts with a RIFF header, else raw float32).
    Raw input is mono at ``rate`` Hz (default ``target_rate``).
    """
    if fmt not in STDIN_FORMATS:
        raise ConfigError(f"format: expected one of {', '.join(STDIN_FORMATS)}; got {fmt!r}")
    prefix = b""
    if fmt == "auto":
        prefix = stream.read(4)
        fmt = "wav" if prefix in (b"RIFF", b"RF64") else "f32"
    src = _Prefixed(prefix, stream)
    if fmt == "wav":
        source_rate, channels, dtype = read_wav_header(src)
    else:
        source_rate, channels, dtype = int(rate or target_rate), 1, ("<f4" if fmt == "f32" else "<i2")
    _rate_notice("the input stream", source_rate, target_rate, notice)
    resample = audio.Resampler(source_rate, target_rate)
    frame_bytes = np.dtype(dtype).itemsize * channels
    block = max(1, int(block_s * source_rate)) * frame_bytes
    rest = b""
    while True:
        data = src.read(block)
        if not data:
            break
        data = rest + data
        usable = len(data) - len(data) % frame_bytes
        rest = data[usable:]
        samples = _to_float(np.frombuffer(data[:usable], dtype=dtype)).reshape(-1, channels).mean(axis=1)
        yield resample(samples)
    if rest:
        notice(f"the input stream ended inside a sample frame: {len(rest)} trailing byte(s) ignored")
    tail = resample(np.zeros(0, dtype=np.float32), last=True)
    if tail.size:
        yield tail


class _Prefixed:
    """A read-only stream that first returns ``prefix`` (bytes already consumed by sniffing)."""

    def __init__(self, prefix: bytes, stream: BinaryIO):
        self.prefix, self.stream = prefix, stream

    def read(self, n: int) -> bytes:
        if self.prefix:
            head, self.prefix = self.prefix[:n], self.prefix[n:]
            return head + (self.stream.read(n - len(head)) if n > len(head) else b"")
        return self.stream.read(n)


def open_microphone(device: str | int | None = None):
    """``(sounddevice module, input device info)``; ``ConfigError`` saying what is missing."""
    try:
        import sounddevice as sd
    except ImportError:
        raise ConfigError("microphone input needs the sounddevice package: pip install 'fedser[client]' "
                          "(or pip install sounddevice)") from None
    except OSError as exc:  # the PortAudio library itself is missing
        raise ConfigError(f"microphone input needs the PortAudio library ({exc}); install it, e.g. "
                          "`apt install libportaudio2`") from None
    try:
        return sd, sd.query_devices(device, kind="input")
    except (ValueError, sd.PortAudioError) as exc:
        raise ConfigError(f"no usable input device{f' {device!r}' if device is not None else ''}: {exc}; "
                          "list devices with `python -m sounddevice`") from None


def mic_chunks(target_rate: int, block_s: float = 0.1, device: str | int | None = None,
               notice: Notice = to_stderr) -> Iterator[np.ndarray]:
    """Mono float32 chunks from a microphone (``sounddevice``, imported only here)."""
    import queue

    sd, info = open_microphone(device)
    notice(f"listening on {info['name']} (Ctrl-C to stop)")
    q: queue.Queue[np.ndarray] = queue.Queue(maxsize=200)
    dropped = 0

    def callback(indata, frames, t, status) -> None:  # PortAudio thread: copy and hand over
        nonlocal dropped
        try:
            q.put_nowait(indata[:, 0].copy())
        except queue.Full:
            dropped += 1

    try:
        with sd.InputStream(samplerate=target_rate, channels=1, dtype="float32", device=device,
                            blocksize=max(1, int(block_s * target_rate)), callback=callback):
            while True:
                yield q.get()
                if dropped:
                    notice(f"the listener fell behind: {dropped} block(s) of microphone audio dropped")
                    dropped = 0
    except sd.PortAudioError as exc:
        raise ConfigError(f"cannot record from the input device: {exc}") from None
