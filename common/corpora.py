"""Corpus loaders: each public speech corpus read in its own published layout and file naming.

``load_corpus(path)`` detects which layout a folder follows (or reads a CSV manifest) and returns
a ``Corpus`` of ``Utterance`` records with canonical labels (``taxonomy``) and speaker ids.
Layouts live in the ``LAYOUTS`` registry; a new corpus is one ``register_layout`` call, not a new
branch. A file a loader cannot use never aborts the load: it lands in ``Corpus.skipped`` with the
reason. Audio is not decoded here (only the headers of Speech Commands noise files are read).

Supported layouts (``Corpus.name``):

- ``speech_commands``: Google Speech Commands v0.01/v0.02, ``<word>/<speaker>_nohash_<n>.wav``;
  12-class task (ten command words, ``_unknown_`` for every other word, ``_silence_``).
- ``ravdess``: ``Actor_XX/03-01-EE-II-SS-RR-AA.wav`` (found at any depth).
- ``crema_d``: ``1001_DFA_ANG_XX.wav``.
- ``tess``: ``OAF_angry/OAF_back_angry.wav``.
- ``emodb``: ``wav/03a01Fa.wav``.
- ``manifest``: a CSV file ``path,label,speaker[,task][,offset][,duration]``.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from . import audio
from .errors import AudioError, ConfigError, CorpusError
from .fsutil import PUBLIC, atomic_write_text
from .taxonomy import (
    CLASSES,
    COMMAND_WORDS,
    CREMA_D_EMOTIONS,
    EMODB_EMOTIONS,
    RAVDESS_EMOTIONS,
    SILENCE,
    TESS_EMOTIONS,
    UNKNOWN,
    canonical,
)
from .keys import TASKS


@dataclass(frozen=True)
class Utterance:
    """One labelled stretch of speech: a whole file, or ``duration`` seconds from ``offset``."""

    path: str
    label: str          # canonical label of ``task`` (taxonomy.EMOTIONS or taxonomy.KEYWORDS)
    speaker: str
    task: str           # "emotion" or "kws"
    corpus: str         # layout name of the corpus it came from
    offset: float = 0.0
    duration: float | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"Utterance {self.path}: task must be one of {TASKS}, got {self.task!r}")
        if self.label not in CLASSES[self.task]:
            raise ConfigError(
                f"Utterance {self.path}: label {self.label!r} is not a canonical {self.task} label "
                f"({', '.join(CLASSES[self.task])})"
            )


@dataclass
class Corpus:
    """Utterances of one corpus (or of several merged by ``load_corpora``)."""

    name: str
    root: str
    utterances: list[Utterance]
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)

    def __len__(self) -> int:
        return len(self.utterances)

    def tasks(self) -> set[str]:
        return {u.task for u in self.utterances}

    def labels(self, task: str) -> list[str]:
        """Labels of ``task`` present in the corpus, in the taxonomy's class order."""
        present = {u.label for u in self.utterances if u.task == task}
        return [label for label in CLASSES[task] if label in present]

    def label_counts(self, task: str) -> dict[str, int]:
        """Utterances per label of ``task``, in the taxonomy's class order."""
        counts = Counter(u.label for u in self.utterances if u.task == task)
        return {label: counts[label] for label in CLASSES[task] if counts[label]}

    def speakers(self) -> list[str]:
        return sorted({u.speaker for u in self.utterances})

    def filter(self, task: str | None = None) -> "Corpus":
        """A corpus holding only the utterances of ``task`` (all of them when ``None``)."""
        if task is not None and task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS} or None, got {task!r}")
        kept = [u for u in self.utterances if task is None or u.task == task]
        return Corpus(self.name, self.root, kept, list(self.skipped))


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Layout:
    """A corpus layout: how to recognise it and how to read it.

    ``detect(root, files)`` returns the fraction (0..1) of the audio files under ``root`` that
    follow the layout; ``load(root, files)`` reads them. ``files`` is the sorted list of audio
    files under ``root`` (``scan(root)``), passed in so a folder is walked once.
    """

    name: str
    looks_for: str
    detect: Callable[[Path, Sequence[Path]], float]
    load: Callable[[Path, Sequence[Path]], Corpus]


LAYOUTS: dict[str, Layout] = {}
MIN_DETECT_SCORE = 0.5   # at least half the audio files must follow a layout for it to be chosen


def register_layout(layout: Layout) -> Layout:
    """Add ``layout`` to ``LAYOUTS`` (its name must be new)."""
    if layout.name in LAYOUTS:
        raise ConfigError(f"corpus layout {layout.name!r} is already registered")
    LAYOUTS[layout.name] = layout
    return layout


def scan(root: Path) -> list[Path]:
    """Audio files under ``root`` (any depth, symlinks followed once), sorted for determinism."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:   # a symlink loop: do not descend twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith(".") and audio.is_audio_path(f))
    return sorted(found)


def _abs(path: Path) -> str:
    return str(path.absolute())


# ----------------------------------------------------------------------------- Speech Commands

_SC_NAME = re.compile(r"([^_]+)_nohash_(\d+)$")
_SC_NOISE = "_background_noise_"
_SC_SILENCE_GROUPS = 6   # pseudo-speakers for silence clips that carry no speaker id
SILENCE_SECONDS = 1.0


def _sc_folders(root: Path) -> set[str]:
    try:
        return {p.name for p in root.iterdir() if p.is_dir()}
    except OSError:
        return set()


def _sc_detect(root: Path, files: Sequence[Path]) -> float:
    if not root.is_dir() or not (_sc_folders(root) & (set(COMMAND_WORDS) | {_SC_NOISE})) or not files:
        return 0.0
    ok = 0
    for f in files:
        rel = f.relative_to(root).parts
        if len(rel) == 2 and (rel[0] in (_SC_NOISE, SILENCE) or _SC_NAME.search(f.stem)):
            ok += 1
    return ok / len(files)


def _silence_speaker(stem: str) -> str:
    # Silence clips have no speaker; spread them over a few stable pseudo-speakers so a
    # speaker split puts some silence in every part.
    return f"silence-{zlib.crc32(stem.encode()) % _SC_SILENCE_GROUPS}"


def _cut_silence(noise: Sequence[Path], count: int, skipped: list[tuple[str, str]]) -> list[Utterance]:
    """``count`` 1 s segments spread evenly over the noise files, in proportion to their length.

    Deterministic (no randomness): segments sit at evenly spaced offsets in each file and may
    overlap when ``count`` exceeds the seconds of noise available. Speaker = the noise file,
    so a speaker split never puts segments of one noise recording in two parts.
    """
    lengths: dict[Path, float] = {}
    for path in noise:
        try:
            seconds = audio.duration_of(path)
        except AudioError as exc:
            skipped.append((_abs(path), f"background noise unreadable: {exc.problem}"))
            continue
        if seconds < SILENCE_SECONDS:
            skipped.append((_abs(path), f"background noise shorter than {SILENCE_SECONDS:g} s"))
            continue
        lengths[path] = seconds
    if not lengths or count <= 0:
        return []
    total = sum(lengths.values())
    # Largest-remainder apportionment of ``count`` segments over the files.
    quotas = {p: count * s / total for p, s in lengths.items()}
    shares = {p: int(q) for p, q in quotas.items()}
    for p in sorted(quotas, key=lambda p: (-(quotas[p] - shares[p]), str(p)))[: count - sum(shares.values())]:
        shares[p] += 1
    out = []
    for path, k in shares.items():
        last = lengths[path] - SILENCE_SECONDS
        for i in range(k):
            start = last * i / (k - 1) if k > 1 else 0.0
            out.append(Utterance(_abs(path), SILENCE, f"noise-{path.stem}", "kws", "speech_commands",
                                 offset=math.floor(start * 1000) / 1000, duration=SILENCE_SECONDS))
    return out


def _sc_load(root: Path, files: Sequence[Path]) -> Corpus:
    utterances: list[Utterance] = []
    skipped: list[tuple[str, str]] = []
    noise: list[Path] = []
    for f in files:
        rel = f.relative_to(root).parts
        if len(rel) != 2:
            skipped.append((_abs(f), "not directly inside a class folder (<root>/<word>/<speaker>_nohash_<n>.wav)"))
            continue
        folder = rel[0]
        if folder == _SC_NOISE:
            noise.append(f)
            continue
        match = _SC_NAME.search(f.stem)
        if folder == SILENCE:
            speaker = match.group(1) if match else _silence_speaker(f.stem)
            utterances.append(Utterance(_abs(f), SILENCE, speaker, "kws", "speech_commands"))
            continue
        if folder.startswith(("_", ".")) and folder != UNKNOWN:
            skipped.append((_abs(f), f"folder {folder!r} is not a Speech Commands class"))
            continue
        if not match:
            skipped.append((_abs(f), "name does not follow <speaker>_nohash_<n>"))
            continue
        label = folder.lower() if folder.lower() in COMMAND_WORDS else UNKNOWN
        utterances.append(Utterance(_abs(f), label, match.group(1), "kws", "speech_commands"))
    if noise and not any(u.label == SILENCE for u in utterances):
        # No _silence_ folder (the v0.01/v0.02 training archives): cut silence from the noise
        # recordings, as many clips as an average command word has.
        counts = Counter(u.label for u in utterances if u.label in COMMAND_WORDS)
        pool = counts or Counter(u.label for u in utterances)
        count = max(1, round(sum(pool.values()) / len(pool))) if pool else 0
        utterances.extend(_cut_silence(noise, count, skipped))
    return Corpus("speech_commands", _abs(root), utterances, skipped)


register_layout(Layout(
    "speech_commands",
    "Google Speech Commands: class folders (yes, no, ..., _background_noise_) holding <speaker>_nohash_<n>.wav",
    _sc_detect, _sc_load,
))


# ----------------------------------------------------------------------------- file-name layouts



def _filename_layout(
    name: str,
    looks_for: str,
    pattern: re.Pattern[str],
    parse: Callable[[Path, re.Match[str]], tuple[str, str] | str],
) -> Layout:
    """A layout recognised by file names alone (any folder depth): the emotion corpora."""

    def detect(root: Path, files: Sequence[Path]) -> float:
        if not files:
            return 0.0
        return sum(1 for f in files if pattern.fullmatch(f.stem)) / len(files)

    def load(root: Path, files: Sequence[Path]) -> Corpus:
        utterances: list[Utterance] = []
        skipped: list[tuple[str, str]] = []
        for f in files:
            match = pattern.fullmatch(f.stem)
            if not match:
                skipped.append((_abs(f), f"name does not follow the {name} naming ({looks_for})"))
                continue
            parsed = parse(f, match)
            if isinstance(parsed, str):
                skipped.append((_abs(f), parsed))
                continue
            label, speaker = parsed
            utterances.append(Utterance(_abs(f), label, speaker, "emotion", name))
        return Corpus(name, _abs(root), utterances, skipped)

    return Layout(name, looks_for, detect, load)


def _ravdess(path: Path, m: re.Match[str]) -> tuple[str, str] | str:
    modality, _channel, emotion, _intensity, _statement, _rep, actor = m.groups()
    if modality != "03":
        return f"RAVDESS modality {modality} is not audio-only (03)"
    if emotion not in RAVDESS_EMOTIONS:
        return f"RAVDESS emotion code {emotion} is not one of {', '.join(RAVDESS_EMOTIONS)}"
    return RAVDESS_EMOTIONS[emotion], actor


def _crema_d(path: Path, m: re.Match[str]) -> tuple[str, str] | str:
    speaker, _sentence, emotion, _level = m.groups()
    label = CREMA_D_EMOTIONS.get(emotion.upper())
    if label is None:
        return f"CREMA-D emotion code {emotion} is not one of {', '.join(CREMA_D_EMOTIONS)}"
    return label, speaker


def _tess(path: Path, m: re.Match[str]) -> tuple[str, str] | str:
    speaker, _word, emotion = m.groups()
    label = TESS_EMOTIONS.get(emotion.lower())
    if label is None:
        # Fall back on the folder name (OAF_Pleasant_surprise, YAF_fear, ...).
        folder = path.parent.name.lower()
        prefix = speaker.lower() + "_"
        label = TESS_EMOTIONS.get(folder[len(prefix):] if folder.startswith(prefix) else folder)
    if label is None:
        return f"TESS emotion {emotion!r} is not one of {', '.join(TESS_EMOTIONS)}"
    return label, speaker.upper()


def _emodb(path: Path, m: re.Match[str]) -> tuple[str, str] | str:
    speaker, _text, emotion, _version = m.groups()
    label = EMODB_EMOTIONS.get(emotion)
    if label is None:
        return f"EmoDB emotion letter {emotion} is not one of {', '.join(EMODB_EMOTIONS)}"
    return label, speaker


register_layout(_filename_layout(
    "ravdess", "MM-VC-EE-II-SS-RR-AA.wav, e.g. Actor_01/03-01-05-01-02-01-01.wav",
    re.compile(r"(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)"), _ravdess,
))
register_layout(_filename_layout(
    "crema_d", "SPKR_SEN_EMO_LV.wav, e.g. 1001_DFA_ANG_XX.wav",
    re.compile(r"(\d{4})_([A-Za-z]{3})_([A-Za-z]{3})_([A-Za-z]{2})"), _crema_d,
))
register_layout(_filename_layout(
    "tess", "OAF|YAF_<word>_<emotion>.wav, e.g. OAF_angry/OAF_back_angry.wav",
    re.compile(r"(OAF|YAF)_(.+)_([A-Za-z]+)", re.IGNORECASE), _tess,
))
register_layout(_filename_layout(
    "emodb", "SSTTTEV.wav (speaker, text, emotion letter, version), e.g. wav/03a01Fa.wav",
    re.compile(r"(\d\d)([ab]\d\d)([A-Z])([a-z]?)"), _emodb,
))


# ----------------------------------------------------------------------------- CSV manifest

_MANIFEST_REQUIRED = ("path", "label", "speaker")


def _manifest_detect(root: Path, files: Sequence[Path]) -> float:
    return 1.0 if root.is_file() and root.suffix.lower() == ".csv" else 0.0


def _rows(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:10])
    more = f" (+{len(numbers) - 10} more)" if len(numbers) > 10 else ""
    return f"row{'s' if len(numbers) > 1 else ''} {shown}{more}"


def _manifest_load(csv_path: Path, files: Sequence[Path]) -> Corpus:
    """Read ``path,label,speaker[,task][,offset][,duration]`` rows (header required).

    Relative paths are relative to the CSV's folder. ``task`` defaults from the label (a keyword
    label means kws, an emotion label emotion). Unknown labels, bad tasks and empty cells are
    collected and raised together naming the rows; a listed file that does not exist is skipped.
    Row numbers are CSV line numbers (the header is row 1).
    """
    base = csv_path.parent
    try:
        handle = open(csv_path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise CorpusError(f"{csv_path}: cannot read the manifest ({exc.strerror})") from None
    utterances: list[Utterance] = []
    skipped: list[tuple[str, str]] = []
    problems: dict[str, list[int]] = {}
    with handle:
        reader = csv.DictReader(handle)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        missing = [c for c in _MANIFEST_REQUIRED if c not in header]
        if missing:
            raise CorpusError(
                f"{csv_path}: manifest header lacks column(s) {', '.join(missing)}; the first row must "
                f"name the columns path,label,speaker[,task] (got {', '.join(header) or 'nothing'})"
            )
        reader.fieldnames = header
        for row in reader:
            line = reader.line_num
            cells = {k: (v or "").strip() for k, v in row.items() if k is not None}
            empty = [c for c in _MANIFEST_REQUIRED if not cells.get(c)]
            if empty:
                problems.setdefault(f"empty {'/'.join(empty)}", []).append(line)
                continue
            task = cells.get("task") or None
            if task is not None and task not in TASKS:
                problems.setdefault(f"task {task!r} is not one of {', '.join(TASKS)}", []).append(line)
                continue
            mapped = canonical(cells["label"], task)
            if mapped is None:
                where = f"a {task} label" if task else "an emotion or keyword label"
                problems.setdefault(f"label {cells['label']!r} is not {where}", []).append(line)
                continue
            try:
                offset = float(cells.get("offset") or 0.0)
                seconds = float(cells["duration"]) if cells.get("duration") else None
            except ValueError:
                problems.setdefault("offset/duration is not a number", []).append(line)
                continue
            path = Path(cells["path"]).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                skipped.append((_abs(path), f"file not found (manifest row {line})"))
                continue
            if not audio.is_audio_path(path):
                skipped.append((_abs(path), f"not an audio file name {audio.AUDIO_EXTENSIONS} (manifest row {line})"))
                continue
            utterances.append(Utterance(_abs(path), mapped[1], cells["speaker"], mapped[0], "manifest",
                                        offset=offset, duration=seconds))
    if problems:
        listed = "; ".join(f"{what} ({_rows(lines)})" for what, lines in problems.items())
        raise CorpusError(
            f"{csv_path}: {listed}. Canonical emotion labels: {', '.join(CLASSES['emotion'])}; "
            f"keyword labels: {', '.join(CLASSES['kws'])} (common synonyms are accepted); fix or remove these rows"
        )
    return Corpus("manifest", _abs(csv_path), utterances, skipped)


register_layout(Layout("manifest", "a .csv file with header path,label,speaker[,task]", _manifest_detect,
                       _manifest_load))


def write_manifest(utterances: Iterable[Utterance], csv_path: str | Path) -> Path:
    """Write utterances as a manifest that :func:`load_corpus` reads back (absolute paths).

    Used to hand each simulated device, and the server's test split, a list of files
    without copying any audio.
    """
    rows = io.StringIO(newline="")
    w = csv.writer(rows)
    w.writerow(["path", "label", "speaker", "task", "offset", "duration"])
    for u in utterances:
        w.writerow([u.path, u.label, u.speaker, u.task, repr(float(u.offset)),
                    "" if u.duration is None else repr(float(u.duration))])
    return atomic_write_text(csv_path, rows.getvalue(), PUBLIC)


# ----------------------------------------------------------------------------- entry points

def _looked_for() -> str:
    return "; ".join(f"{name}: {layout.looks_for}" for name, layout in LAYOUTS.items())


def load_corpus(path: str | Path) -> Corpus:
    """Read a corpus folder (layout auto-detected) or a ``.csv`` manifest.

    Raises ``CorpusError`` when the path is missing, holds no audio files, follows no known
    layout (the message lists what was looked for), or none of its files could be used.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise CorpusError(f"{root}: not found; give a corpus folder or a .csv manifest")
    if root.is_file() and root.suffix.lower() != ".csv":
        raise CorpusError(f"{root}: is a file; give a corpus folder or a .csv manifest (path,label,speaker[,task])")
    files: list[Path] = []
    if root.is_dir():
        files = scan(root)
        if not files:
            raise CorpusError(
                f"{root}: no audio files ({', '.join(audio.AUDIO_EXTENSIONS)}) in this folder or below"
            )
    scores = {name: layout.detect(root, files) for name, layout in LAYOUTS.items()}
    best = max(scores, key=lambda n: scores[n])   # first registered wins a tie
    if scores[best] < MIN_DETECT_SCORE:
        # A wrapper folder (e.g. an unpacked archive) around one corpus folder: look inside.
        subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
        if len(subdirs) == 1 and not any(f.parent == root for f in files):
            return load_corpus(subdirs[0])
        examples = ", ".join(str(f.relative_to(root)) for f in files[:3]) if root.is_dir() else root.name
        raise CorpusError(
            f"{root}: no known corpus layout ({len(files)} audio files, e.g. {examples}). Looked for: "
            f"{_looked_for()}. Arrange the files in one of these layouts or list them in a CSV manifest"
        )
    corpus = LAYOUTS[best].load(root, files)
    if not corpus.utterances:
        reasons = "; ".join(f"{Path(p).name}: {why}" for p, why in corpus.skipped[:3])
        raise CorpusError(f"{root}: looks like {best} but no file could be used ({reasons})")
    return corpus


def load_corpora(paths: str | Path | Iterable[str | Path]) -> Corpus:
    """Load several corpora and merge them into one.

    Speaker ids become ``"<corpus>:<speaker>"`` so that actor 01 of RAVDESS and speaker 03 of
    EmoDB stay distinct. Two folders of the same corpus share the prefix on purpose: RAVDESS
    speech and song folders hold the same actors. An utterance listed twice is kept once.
    The merged corpus is named ``"a+b"`` and its root lists the roots joined by ``os.pathsep``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return merge_corpora([load_corpus(p) for p in paths])


def merge_corpora(corpora: Sequence[Corpus]) -> Corpus:
    """Merge loaded corpora as :func:`load_corpora` does (prefixed speakers, no duplicates)."""
    if not corpora:
        raise CorpusError("load_corpora: no corpus paths given")
    names: list[str] = []
    utterances: list[Utterance] = []
    skipped: list[tuple[str, str]] = []
    seen: set[tuple[str, float, float | None, str]] = set()
    for corpus in corpora:
        if corpus.name not in names:
            names.append(corpus.name)
        skipped.extend(corpus.skipped)
        for u in corpus.utterances:
            key = (u.path, u.offset, u.duration, u.task)
            if key in seen:
                continue
            seen.add(key)
            utterances.append(replace(u, speaker=f"{u.corpus}:{u.speaker}"))
    return Corpus("+".join(names), os.pathsep.join(c.root for c in corpora), utterances, skipped)
