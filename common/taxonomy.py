"""Label taxonomies: the canonical emotion and keyword classes, and each corpus's mapping onto them.

Every corpus loader turns its own labels into canonical ones through the tables here, so a model
head has one class order no matter which corpora fed it. Class order is the tuple order below;
``label_index`` gives a label's position.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from .keys import TASKS


EMOTIONS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised", "boredom")

# The ten command words of the Speech Commands 12-class task, then the two catch-all classes.
COMMAND_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN = "_unknown_"
SILENCE = "_silence_"
KEYWORDS = COMMAND_WORDS + (UNKNOWN, SILENCE)

CLASSES: Mapping[str, tuple[str, ...]] = MappingProxyType({"emotion": EMOTIONS, "kws": KEYWORDS})


def _frozen(table: dict[str, str]) -> Mapping[str, str]:
    return MappingProxyType(table)


# RAVDESS file name field 3 ("EE" in 03-01-EE-II-SS-RR-AA).
RAVDESS_EMOTIONS = _frozen({
    "01": "neutral", "02": "calm", "03": "happy", "04": "sad",
    "05": "angry", "06": "fearful", "07": "disgust", "08": "surprised",
})

# CREMA-D file name field 3 (1001_DFA_ANG_XX).
CREMA_D_EMOTIONS = _frozen({
    "ANG": "angry", "DIS": "disgust", "FEA": "fearful", "HAP": "happy", "NEU": "neutral", "SAD": "sad",
})

# TESS: last word of the file name (OAF_back_angry), lower case; the folder names spell
# pleasant surprise out in several ways, so those spellings are here too.
TESS_EMOTIONS = _frozen({
    "angry": "angry", "disgust": "disgust", "fear": "fearful", "happy": "happy",
    "neutral": "neutral", "ps": "surprised", "sad": "sad",
    "pleasant_surprise": "surprised", "pleasant_surprised": "surprised", "surprise": "surprised",
    "surprised": "surprised",
})

# EmoDB: 6th character of the file name (03a01Fa), German initials.
EMODB_EMOTIONS = _frozen({
    "W": "angry",      # Wut
    "L": "boredom",    # Langeweile
    "E": "disgust",    # Ekel
    "A": "fearful",    # Angst
    "F": "happy",      # Freude
    "T": "sad",        # Trauer
    "N": "neutral",
})

# Free-text labels (CSV manifests): lower-cased, spaces and hyphens read as "_".
EMOTION_SYNONYMS = _frozen({
    **{e: e for e in EMOTIONS},
    "neu": "neutral", "neutrality": "neutral",
    "calmness": "calm",
    "hap": "happy", "happiness": "happy", "joy": "happy", "joyful": "happy",
    # IEMOCAP practice: "excited" is merged into happy for the 4-class task.
    "exc": "happy", "excited": "happy",
    "sadness": "sad", "sorrow": "sad",
    "ang": "angry", "anger": "angry", "mad": "angry",
    "fea": "fearful", "fear": "fearful", "afraid": "fearful", "scared": "fearful", "anxiety": "fearful",
    "dis": "disgust", "disgusted": "disgust",
    "sur": "surprised", "surprise": "surprised", "ps": "surprised",
    "pleasant_surprise": "surprised", "pleasant_surprised": "surprised",
    "bored": "boredom", "boring": "boredom",
})

KEYWORD_SYNONYMS = _frozen({
    **{k: k for k in KEYWORDS},
    "unknown": UNKNOWN, "_unknown": UNKNOWN, "unknown_": UNKNOWN,
    "silence": SILENCE, "_silence": SILENCE, "silence_": SILENCE,
    "background": SILENCE, "_background_noise_": SILENCE,
})


def _norm(label: str) -> str:
    return label.strip().lower().replace(" ", "_").replace("-", "_")


def canonical(label: str, task: str | None = None) -> tuple[str, str] | None:
    """Map a free-text label onto ``(task, canonical_label)``, or ``None`` when it is unknown.

    With ``task`` given, only that task's table is consulted; without it the task is inferred:
    a keyword label means ``"kws"``, an emotion label ``"emotion"`` (the two tables share no
    entry, so the inference is unambiguous; a test holds them disjoint).
    """
    key = _norm(label)
    tables = {"emotion": EMOTION_SYNONYMS, "kws": KEYWORD_SYNONYMS}
    for name in ((task,) if task is not None else TASKS):
        hit = tables[name].get(key)
        if hit is not None:
            return name, hit
    return None


def label_index(task: str, label: str) -> int:
    """Position of a canonical label in its task's class tuple (the model head's output order)."""
    return CLASSES[task].index(label)
