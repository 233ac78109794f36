"""``fedser synth``: a small multi-speaker demo corpus spoken by espeak-ng.

The corpus is written in the layouts of the real corpora, so the same loaders read it:

```
OUT/emotion/Actor_XX/03-01-EE-01-SS-RR-XX.wav     RAVDESS: EE emotion code, SS statement,
                                                  RR repetition, XX actor (odd = male voice)
OUT/commands/<word>/<speaker>_nohash_<n>.wav      Speech Commands: 1 s clips, word centred
OUT/commands/_background_noise_/<kind>.wav        white, pink, brown noise and mains hum
OUT/synth.json                                    settings, speakers, and whether it finished
```

All audio is 16 kHz mono 16-bit PCM. Emotions are acted through prosody only (base
pitch, pitch range, speaking rate, loudness, pauses, clause intonation, tremor), with
seeded per-speaker and per-utterance jitter so that the classes overlap like real ones.
Speakers are espeak-ng English accents combined with voice variants.

espeak-ng is driven through ctypes: the library and data shipped by the PyPI package
``espeakng-loader`` first, a system ``libespeak-ng.so.1`` (Debian ``espeak-ng``) second.
The library keeps hidden synthesis state between calls (the same text spoken twice comes
out slightly different), so every speaker's clips are synthesized in a fresh worker
process in a fixed order: the same seed and settings give the same bytes, whatever the
number of workers.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

from fedser.common.errors import ConfigError, FedserError
from fedser.common.fsutil import PUBLIC, atomic_write_text

SAMPLE_RATE = 16000
MANIFEST = "synth.json"
EMOTION_DIR = "emotion"
COMMANDS_DIR = "commands"
NOISE_DIR = "_background_noise_"

# RAVDESS emotion codes (EE in 03-01-EE-II-SS-RR-AA).
EMOTION_CODES: dict[str, int] = {
    "neutral": 1, "calm": 2, "happy": 3, "sad": 4,
    "angry": 5, "fearful": 6, "disgust": 7, "surprised": 8,
}
# Disgust is left out by default: prosody alone carries it poorly.
DEFAULT_EMOTIONS: tuple[str, ...] = ("neutral", "calm", "happy", "sad", "angry", "fearful", "surprised")
# RAVDESS's two statements (SS = 01, 02).
STATEMENTS: tuple[str, ...] = ("Kids are talking by the door", "Dogs are sitting by the door")
COMMAND_WORDS: tuple[str, ...] = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN_WORDS: tuple[str, ...] = ("bed", "bird", "cat", "dog", "house", "tree")
NOISE_KINDS: tuple[str, ...] = ("white_noise", "pink_noise", "brown_noise", "hum")

# English accents (espeak-ng language names) and voice variants (voices/!v) by gender;
# robotic, whispering and novelty variants are left out on purpose.
ACCENTS: tuple[str, ...] = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc")
MALE_VARIANTS: tuple[str, ...] = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "croak", "Andy", "Lee", "sandro",
    "travis", "victor", "michel", "miguel", "Storm", "Denis", "Henrique", "Diogo")
FEMALE_VARIANTS: tuple[str, ...] = (
    "f1", "f2", "f3", "f4", "f5", "Alicia", "Andrea", "Annie", "anika", "aunty",
    "belinda", "linda", "steph", "steph2", "steph3", "grandma")

# Loudness of a neutral utterance after per-speaker calibration; emotions and speakers
# move around it (dB), and a limiter keeps the loudest clips below full scale.
REFERENCE_DBFS = -28.0
PEAK_LIMIT = 0.97
CALIBRATION_TEXT = "The quick brown fox jumps over the lazy dog"

# espeak-ng parameter ids (speak_lib.h: espeak_PARAMETER) and constants.
_ESPEAK_RATE, _ESPEAK_VOLUME, _ESPEAK_PITCH, _ESPEAK_RANGE, _ESPEAK_WORDGAP = 1, 2, 3, 4, 7
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000          # return an error instead of exit() on a bad data path
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE_MIN, _RATE_MAX = 80, 450          # words per minute accepted by espeak-ng

_INSTALL_HINT = ("install the espeak-ng library: `pip install espeakng-loader` "
                 "(or `pip install fedser[tools]`), or `apt-get install espeak-ng`")


@dataclass(frozen=True)
class Prosody:
    """How one emotion is acted, relative to the speaker's own voice.

    ``pitch`` offsets espeak's base pitch (0..100 scale, 50 = the voice's default);
    ``range`` is espeak's pitch range (0 monotone .. 100, 50 default); ``rate`` multiplies
    the speaker's words per minute; ``gain_db`` is loudness relative to neutral;
    ``word_gap`` adds pauses between words (10 ms units); ``tremolo`` is the depth of a
    5-8 Hz amplitude tremor; ``endings`` are clause punctuations, which drive espeak's
    sentence intonation (``?`` rises, ``!`` is emphatic).
    """

    pitch: float
    range: float
    rate: float
    gain_db: float
    word_gap: int = 0
    tremolo: float = 0.0
    endings: tuple[str, ...] = (".",)


EMOTION_PROSODY: dict[str, Prosody] = {
    "neutral": Prosody(pitch=0, range=50, rate=1.00, gain_db=0.0),
    "calm": Prosody(pitch=-6, range=35, rate=0.88, gain_db=-4.0, word_gap=1),
    "happy": Prosody(pitch=14, range=80, rate=1.10, gain_db=3.0, endings=("!", ".")),
    "sad": Prosody(pitch=-14, range=18, rate=0.72, gain_db=-6.0, word_gap=3),
    "angry": Prosody(pitch=6, range=75, rate=1.22, gain_db=7.0, endings=("!",)),
    "fearful": Prosody(pitch=22, range=30, rate=1.28, gain_db=-1.0, tremolo=0.25, endings=("!", "?")),
    "disgust": Prosody(pitch=-8, range=45, rate=0.82, gain_db=0.0, word_gap=2),
    "surprised": Prosody(pitch=24, range=100, rate=1.00, gain_db=3.0, endings=("?", "!")),
}


@dataclass(frozen=True)
class Speaker:
    """One synthetic person: the same voice speaks in both parts of the corpus.

    ``actor`` is the RAVDESS actor number (odd = male); ``hash`` the Speech Commands
    speaker id; ``pitch`` and ``range`` offset espeak's scales, ``rate`` is words per
    minute and ``gain_db`` the speaker's loudness relative to the reference.
    """

    actor: int
    gender: str
    voice: str
    hash: str
    pitch: float
    range: float
    rate: float
    gain_db: float


@dataclass
class SynthReport:
    """What a synthesis wrote, and what it cost."""

    out_dir: str
    emotion_dir: str
    commands_dir: str
    speakers: list[Speaker]
    n_emotion_files: int
    n_command_files: int
    n_noise_files: int
    audio_seconds: float
    bytes_written: int
    wall_seconds: float
    library: str = ""

    def summary(self) -> str:
        return (f"synthesized {len(self.speakers)} speakers into {self.out_dir} in {self.wall_seconds:.1f} s:\n"
                f"  {self.emotion_dir}: {self.n_emotion_files} emotion clips (RAVDESS layout)\n"
                f"  {self.commands_dir}: {self.n_command_files} command clips + {self.n_noise_files} "
                f"background noise files (Speech Commands layout)\n"
                f"  {self.audio_seconds / 60:.1f} min of 16 kHz audio, {self.bytes_written / 1e6:.1f} MB")


# --------------------------------------------------------------------------- espeak-ng

def locate_espeak() -> tuple[str, str | None]:
    """(library path, data path or None for the library's built-in default).

    Only looks; nothing is loaded, so the calling process keeps no espeak state.
    Raises ``ConfigError`` saying how to install espeak-ng when there is none.
    """
    tried = []
    try:
        import espeakng_loader
    except ImportError:
        tried.append("PyPI package espeakng-loader: not installed")
    else:
        try:
            lib, data = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
        except Exception as exc:  # the package raises RuntimeError when its data is missing
            tried.append(f"espeakng-loader: {exc}")
        else:
            if Path(lib).is_file():
                return lib, data
            tried.append(f"espeakng-loader: no library at {lib}")
    system = ctypes.util.find_library("espeak-ng")
    if system:
        return system, None
    tried.append("system libespeak-ng: not found")
    raise ConfigError(f"espeak-ng is not available ({'; '.join(tried)}): {_INSTALL_HINT}")


class _Espeak:
    """espeak-ng's C API in synchronous mode; one instance per process (the library is global)."""

    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self, library: str, data: str | None):
        try:
            lib = ctypes.CDLL(library)
        except OSError as exc:
            raise ConfigError(f"cannot load espeak-ng library {library}: {exc}; {_INSTALL_HINT}") from exc
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode() if data else None, _INITIALIZE_DONT_EXIT)
        if self.sample_rate <= 0:
            raise ConfigError(f"espeak-ng failed to initialize with data {data or '(default)'}: {_INSTALL_HINT}")
        self._lib = lib
        self._chunks: list[bytes] = []
        self._callback = self._CALLBACK(self._collect)   # keep a reference: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n_samples, events) -> int:
        if wav and n_samples > 0:
            self._chunks.append(ctypes.string_at(wav, n_samples * 2))
        return 0   # 0 = continue

    def speak(self, text: str, voice: str, *, rate: int, pitch: int, range_: int, word_gap: int = 0,
              seed: int = 0) -> np.ndarray:
        """Text -> (T,) float32 in [-1, 1] at ``self.sample_rate``."""
        lib = self._lib
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ConfigError(f"espeak-ng has no voice {voice!r}")
        for param, value in ((_ESPEAK_RATE, rate), (_ESPEAK_VOLUME, 100), (_ESPEAK_PITCH, pitch),
                             (_ESPEAK_RANGE, range_), (_ESPEAK_WORDGAP, word_gap)):
            lib.espeak_SetParameter(param, int(value), 0)
        if hasattr(lib, "espeak_ng_SetRandSeed"):   # breath noise in some variants
            lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
        self._chunks = []
        encoded = text.encode()
        status = lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        lib.espeak_Synchronize()
        if status != 0:
            raise FedserError(f"espeak-ng failed (status {status}) on {text!r} with voice {voice!r}")
        pcm = np.frombuffer(b"".join(self._chunks), dtype=np.int16)
        return pcm.astype(np.float32) / 32768.0


# --------------------------------------------------------------------------- signal helpers

def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def _trim(x: np.ndarray, sr: int, floor_db: float = -40.0, margin_s: float = 0.02) -> np.ndarray:
    """Cut leading and trailing silence: keep 10 ms frames within ``floor_db`` of the loudest."""
    hop = max(1, sr // 100)
    n = len(x) // hop
    if n == 0:
        return x
    frames = np.sqrt(np.mean(np.square(x[: n * hop].reshape(n, hop), dtype=np.float64), axis=1))
    active = np.nonzero(frames > frames.max() * 10 ** (floor_db / 20))[0]
    if active.size == 0:
        return x
    margin = int(margin_s * sr)
    return x[max(0, active[0] * hop - margin): min(len(x), (active[-1] + 1) * hop + margin)]


def _resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    if sr_in == sr_out:
        return x.astype(np.float32)
    import soxr   # comes with librosa

    return soxr.resample(x.astype(np.float32), sr_in, sr_out, quality="HQ").astype(np.float32)


def _to_pcm16(x: np.ndarray) -> np.ndarray:
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > PEAK_LIMIT:   # limiter: keep the shape, lose a little of the loudness cue
        x = x * (PEAK_LIMIT / peak)
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


def _centre(x: np.ndarray, n: int) -> np.ndarray:
    """Pad with zeros or crop, both centred, to exactly ``n`` samples."""
    if len(x) >= n:
        start = (len(x) - n) // 2
        return x[start: start + n]
    out = np.zeros(n, dtype=x.dtype)
    start = (n - len(x)) // 2
    out[start: start + len(x)] = x
    return out


def make_noise(kind: str, seconds: float, seed: int = 0, sample_rate: int = SAMPLE_RATE,
               level_dbfs: float = -30.0) -> np.ndarray:
    """(round(seconds * sample_rate),) float32 background noise at ``level_dbfs`` RMS.

    ``kind``: "white_noise", "pink_noise" (1/f power), "brown_noise" (1/f^2, without the
    DC drift) or "hum" (50 or 60 Hz mains hum with harmonics over faint white noise).
    """
    n = int(round(seconds * sample_rate))
    rng = np.random.default_rng([seed, NOISE_KINDS.index(kind) if kind in NOISE_KINDS else 99])
    if kind == "white_noise":
        x = rng.standard_normal(n)
    elif kind in ("pink_noise", "brown_noise"):
        spectrum = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n, 1.0 / sample_rate)
        f[0] = f[1] if n > 1 else 1.0
        # power ~ 1/f (pink) or 1/f^2 (brown), floor at 20 Hz so the lowest bins do not dominate
        exponent = 0.5 if kind == "pink_noise" else 1.0
        spectrum /= np.maximum(f, 20.0) ** exponent
        spectrum[0] = 0.0
        x = np.fft.irfft(spectrum, n)
    elif kind == "hum":
        t = np.arange(n) / sample_rate
        mains = rng.choice([50.0, 60.0])
        x = 0.02 * rng.standard_normal(n)
        for h in range(1, 8):
            x += (1.0 / h) * np.sin(2 * np.pi * mains * h * t + rng.uniform(0, 2 * np.pi))
    else:
        raise ConfigError(f"unknown noise kind {kind!r}; expected one of {', '.join(NOISE_KINDS)}")
    x = x * (10 ** (level_dbfs / 20) / max(_rms(x), 1e-12))
    return x.astype(np.float32)


# --------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class _Clip:
    """One clip to synthesize, fully decided by the parent (the worker only executes)."""

    path: str                 # relative to the output folder
    text: str
    kind: str                 # "sentence" (padded with silence) or "word" (centred in 1 s)
    rate: int
    pitch: int
    range: int
    word_gap: int
    gain_db: float
    tremolo: float
    tremolo_hz: float
    lead_s: float
    tail_s: float
    seed: int


@dataclass(frozen=True)
class _Task:
    """One worker process: one speaker, one part of the corpus, clips in a fixed order."""

    library: str
    data: str | None
    out_dir: str
    voice: str
    noise_floor_dbfs: float
    clips: tuple[_Clip, ...] = field(default_factory=tuple)


def _clip_int(value: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(value))))


def make_speakers(n_speakers: int, seed: int = 0) -> list[Speaker]:
    """``n_speakers`` distinct voices; actor k is male when k is odd (as in RAVDESS)."""
    rng = np.random.default_rng([seed, 1])
    male = list(rng.permutation(MALE_VARIANTS))
    female = list(rng.permutation(FEMALE_VARIANTS))
    accents = list(rng.permutation(ACCENTS))
    speakers = []
    for actor in range(1, n_speakers + 1):
        gender = "male" if actor % 2 else "female"
        pool = male if gender == "male" else female
        k = (actor - 1) // 2   # index within the gender
        variant = pool[k % len(pool)]
        accent = accents[(actor - 1) % len(accents)]
        srng = np.random.default_rng([seed, 2, actor])
        speakers.append(Speaker(
            actor=actor, gender=gender, voice=f"{accent}+{variant}",
            hash=hashlib.sha256(f"fedser-synth/{seed}/{actor}".encode()).hexdigest()[:8],
            pitch=float(np.clip(srng.normal(0, 6), -12, 12)),
            range=float(np.clip(srng.normal(0, 6), -12, 12)),
            rate=float(srng.uniform(150, 195)),
            gain_db=float(srng.uniform(-3, 3))))
    return speakers


def _emotion_clips(sp: Speaker, emotions: Sequence[str], statements: int, repetitions: int,
                   seed: int) -> list[_Clip]:
    clips = []
    for emotion in emotions:
        pr = EMOTION_PROSODY[emotion]
        for s in range(1, statements + 1):
            for r in range(1, repetitions + 1):
                rng = np.random.default_rng([seed, 3, sp.actor, EMOTION_CODES[emotion], s, r])
                name = f"03-01-{EMOTION_CODES[emotion]:02d}-01-{s:02d}-{r:02d}-{sp.actor:02d}.wav"
                clips.append(_Clip(
                    path=f"{EMOTION_DIR}/Actor_{sp.actor:02d}/{name}",
                    text=STATEMENTS[s - 1] + str(rng.choice(pr.endings)),
                    kind="sentence",
                    rate=_clip_int(sp.rate * pr.rate * rng.normal(1.0, 0.06), _RATE_MIN, _RATE_MAX),
                    pitch=_clip_int(50 + sp.pitch + pr.pitch + rng.normal(0, 4), 0, 100),
                    range=_clip_int(pr.range + sp.range + rng.normal(0, 8), 0, 100),
                    word_gap=max(0, pr.word_gap + int(rng.integers(-1, 2))),
                    gain_db=sp.gain_db + pr.gain_db + float(rng.normal(0, 1.5)),
                    tremolo=pr.tremolo * float(rng.uniform(0.6, 1.4)),
                    tremolo_hz=float(rng.uniform(5.0, 8.0)),
                    lead_s=float(rng.uniform(0.15, 0.45)), tail_s=float(rng.uniform(0.15, 0.45)),
                    seed=int(rng.integers(1, 2**31 - 1))))
    return clips


def _command_clips(sp: Speaker, words: Sequence[str], repetitions: int, unknown_words: Sequence[str],
                   unknown_repetitions: int, seed: int) -> list[_Clip]:
    clips = []
    plan = [(w, repetitions) for w in words] + [(w, unknown_repetitions) for w in unknown_words]
    for w_index, (word, reps) in enumerate(plan):
        for n in range(reps):
            rng = np.random.default_rng([seed, 4, sp.actor, w_index, n])
            clips.append(_Clip(
                path=f"{COMMANDS_DIR}/{word}/{sp.hash}_nohash_{n}.wav",
                text=word + str(rng.choice([".", ".", "!", "?"])),
                kind="word",
                rate=_clip_int(sp.rate * rng.uniform(0.85, 1.15), _RATE_MIN, _RATE_MAX),
                pitch=_clip_int(50 + sp.pitch + rng.normal(0, 6), 0, 100),
                range=_clip_int(50 + sp.range + rng.normal(0, 12), 0, 100),
                word_gap=0,
                gain_db=sp.gain_db + float(rng.normal(0, 2.5)),
                tremolo=0.0, tremolo_hz=0.0, lead_s=0.0, tail_s=0.0,
                seed=int(rng.integers(1, 2**31 - 1))))
    return clips


# --------------------------------------------------------------------------- the worker

def _render(engine: _Espeak, voice: str, clip: _Clip, calibration: float, noise_floor_dbfs: float) -> np.ndarray:
    """One clip -> (T,) int16 at 16 kHz."""
    x = engine.speak(clip.text, voice, rate=clip.rate, pitch=clip.pitch, range_=clip.range,
                     word_gap=clip.word_gap, seed=clip.seed)
    x = _trim(x, engine.sample_rate)
    if clip.tremolo > 0:
        t = np.arange(len(x)) / engine.sample_rate
        x = x * (1.0 + clip.tremolo * np.sin(2 * np.pi * clip.tremolo_hz * t)).astype(np.float32)
    x = _resample(x, engine.sample_rate) * (calibration * 10 ** (clip.gain_db / 20))
    if clip.kind == "word":
        x = _centre(x, SAMPLE_RATE)
    else:
        x = np.concatenate([np.zeros(int(clip.lead_s * SAMPLE_RATE), np.float32), x,
                            np.zeros(int(clip.tail_s * SAMPLE_RATE), np.float32)])
    # a faint noise floor, as in any recording (and no digital silence for log features)
    rng = np.random.default_rng(clip.seed)
    x = x + (10 ** (noise_floor_dbfs / 20)) * rng.standard_normal(len(x)).astype(np.float32)
    return _to_pcm16(x)


def _run_task(task: _Task) -> tuple[int, int, int]:
    """Synthesize and write one task's clips; returns (files, samples, bytes)."""
    engine = _Espeak(task.library, task.data)
    # Level calibration: variants differ by up to 15 dB; bring each voice's neutral
    # speech to REFERENCE_DBFS so that loudness differences are the emotions' and the speakers'.
    ref = _trim(engine.speak(CALIBRATION_TEXT, task.voice, rate=175, pitch=50, range_=50), engine.sample_rate)
    calibration = 10 ** (REFERENCE_DBFS / 20) / max(_rms(ref), 1e-6)
    out = Path(task.out_dir)
    n_samples = n_bytes = 0
    for clip in task.clips:
        pcm = _render(engine, task.voice, clip, calibration, task.noise_floor_dbfs)
        path = out / clip.path
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        n_samples += len(pcm)
        n_bytes += path.stat().st_size
    return len(task.clips), n_samples, n_bytes


# --------------------------------------------------------------------------- the corpus

def _validate(n_speakers, emotions, statements, repetitions, command_words, command_repetitions,
              unknown_words, unknown_repetitions, noise_seconds, workers) -> None:
    problems = []
    if not 1 <= n_speakers <= 99:
        problems.append(f"n_speakers must be 1..99 (two-digit RAVDESS actor numbers), got {n_speakers}")
    bad = [e for e in emotions if e not in EMOTION_CODES]
    if bad:
        problems.append(f"emotions {bad} unknown; choose among {', '.join(EMOTION_CODES)}")
    if len(set(emotions)) != len(emotions):
        problems.append(f"emotions repeat: {list(emotions)}")
    if not 1 <= statements <= len(STATEMENTS):
        problems.append(f"statements must be 1..{len(STATEMENTS)}, got {statements}")
    for name, value in (("repetitions", repetitions), ("command_repetitions", command_repetitions),
                        ("unknown_repetitions", unknown_repetitions)):
        if not 0 <= value <= 99:
            problems.append(f"{name} must be 0..99, got {value}")
    words = list(command_words) + list(unknown_words)
    odd = [w for w in words if not w or not w.replace("_", "").isalpha() or w.startswith("_")]
    if odd:
        problems.append(f"words must be plain letters (they become folder names), got {odd}")
    if len(set(words)) != len(words):
        problems.append("command_words and unknown_words must be distinct")
    if noise_seconds < 0:
        problems.append(f"noise_seconds must be >= 0, got {noise_seconds}")
    if workers is not None and workers < 1:
        problems.append(f"workers must be >= 1, got {workers}")
    if problems:
        raise ConfigError("synth: " + "; ".join(problems))


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder: choose another --out")
    parts = [out / EMOTION_DIR, out / COMMANDS_DIR]
    occupied = [p for p in parts if p.is_dir() and any(p.iterdir())]
    if occupied:
        if not overwrite:
            raise ConfigError(f"{occupied[0]} already holds files: pass overwrite=True (--overwrite) "
                              "to replace an earlier synthesis, or choose another --out")
        if not (out / MANIFEST).is_file():
            raise ConfigError(f"{occupied[0]} was not written by fedser synth (no {out / MANIFEST}): "
                              "refusing to delete it; choose another --out")
        for p in parts:
            shutil.rmtree(p, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _write_manifest(out: Path, content: dict) -> None:
    atomic_write_text(out / MANIFEST, json.dumps(content, indent=2), PUBLIC)


def is_complete(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a synthesis that ran to the end."""
    try:
        return bool(json.loads((Path(out_dir) / MANIFEST).read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def _default_workers(n_tasks: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, n_tasks, 8))


def synthesize_corpus(out_dir: str | Path, *, n_speakers: int = 16, seed: int = 0,
                      emotions: Sequence[str] = DEFAULT_EMOTIONS, statements: int = 2, repetitions: int = 2,
                      command_words: Sequence[str] = COMMAND_WORDS, command_repetitions: int = 2,
                      unknown_words: Sequence[str] = UNKNOWN_WORDS, unknown_repetitions: int = 1,
                      noise_seconds: float = 30.0, noise_floor_dbfs: float = -66.0,
                      workers: int | None = None, overwrite: bool = False, progress: bool = True) -> SynthReport:
    """Write the demo corpus under ``out_dir`` (see the module docstring for the layout).

    Per speaker: ``len(emotions) * statements * repetitions`` emotion clips and
    ``len(command_words) * command_repetitions + len(unknown_words) * unknown_repetitions``
    one-second command clips; plus one ``noise_seconds`` file per ``NOISE_KINDS`` (none if 0).
    The same arguments give byte-identical files whatever ``workers`` is.
    Raises ``ConfigError`` for bad arguments, an occupied ``out_dir`` (unless ``overwrite``
    and it holds an earlier synthesis) or a missing espeak-ng.
    """
    from tqdm.auto import tqdm

    emotions, command_words, unknown_words = tuple(emotions), tuple(command_words), tuple(unknown_words)
    _validate(n_speakers, emotions, statements, repetitions, command_words, command_repetitions,
              unknown_words, unknown_repetitions, noise_seconds, workers)
    library, data = locate_espeak()
    started = time.perf_counter()
    out = Path(out_dir)
    _prepare(out, overwrite)
    settings = dict(n_speakers=n_speakers, seed=seed, emotions=list(emotions), statements=statements,
                    repetitions=repetitions, command_words=list(command_words),
                    command_repetitions=command_repetitions, unknown_words=list(unknown_words),
                    unknown_repetitions=unknown_repetitions, noise_seconds=noise_seconds,
                    noise_floor_dbfs=noise_floor_dbfs, sample_rate=SAMPLE_RATE)
    speakers = make_speakers(n_speakers, seed)
    _write_manifest(out, {"complete": False, "settings": settings, "speakers": [asdict(s) for s in speakers]})

    tasks = []
    for sp in speakers:
        for clips in (_emotion_clips(sp, emotions, statements, repetitions, seed),
                      _command_clips(sp, command_words, command_repetitions, unknown_words,
                                     unknown_repetitions, seed)):
            if clips:
                tasks.append(_Task(library, data, str(out), sp.voice, noise_floor_dbfs, tuple(clips)))
    n_emotion = sum(len(t.clips) for t in tasks if t.clips[0].kind == "sentence")
    n_command = sum(len(t.clips) for t in tasks if t.clips[0].kind == "word")

    n_files = n_samples = n_bytes = 0
    bar = tqdm(total=n_emotion + n_command, unit="clip", desc="fedser synth", disable=not progress)
    try:
        if tasks:
            # A fresh process per task (maxtasksperchild=1): espeak-ng's hidden state must
            # start the same for every speaker, and the library is not thread-safe.
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(processes=workers or _default_workers(len(tasks)), maxtasksperchild=1) as pool:
                for files, samples, size in pool.imap_unordered(_run_task, tasks):
                    n_files, n_samples, n_bytes = n_files + files, n_samples + samples, n_bytes + size
                    bar.update(files)
    finally:
        bar.close()

    n_noise = 0
    if noise_seconds > 0:
        noise_dir = out / COMMANDS_DIR / NOISE_DIR
        noise_dir.mkdir(parents=True, exist_ok=True)
        for kind in NOISE_KINDS:
            path = noise_dir / f"{kind}.wav"
            pcm = _to_pcm16(make_noise(kind, noise_seconds, seed))
            sf.write(path, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
            n_samples += len(pcm)
            n_bytes += path.stat().st_size
            n_noise += 1

    report = SynthReport(out_dir=str(out), emotion_dir=str(out / EMOTION_DIR), commands_dir=str(out / COMMANDS_DIR),
                         speakers=speakers, n_emotion_files=n_emotion, n_command_files=n_command,
                         n_noise_files=n_noise, audio_seconds=n_samples / SAMPLE_RATE, bytes_written=n_bytes,
                         wall_seconds=time.perf_counter() - started, library=library)
    _write_manifest(out, {"complete": True, "settings": settings, "speakers": [asdict(s) for s in speakers],
                          "files": {"emotion": n_emotion, "commands": n_command, "noise": n_noise},
                          "audio_seconds": round(report.audio_seconds, 3), "bytes": n_bytes})
    return report
