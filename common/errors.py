"""The fedser exception hierarchy.

Every error names what was wrong and, where there is one, what to do about it.
Validators collect all problems first and raise once (see ``collect``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable


class FedserError(Exception):
    """Base class of every error fedser raises on purpose."""


class ConfigError(FedserError, ValueError):
    """A setting is missing or outside its allowed range."""


class AudioError(FedserError):
    """An audio file could not be turned into samples."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class AudioDecodeError(AudioError):
    """The file is empty, truncated, not audio, or in a format soundfile cannot read."""


class AudioContentError(AudioError):
    """The file decodes but its samples are unusable (NaN/Inf, no samples)."""


class CorpusError(FedserError):
    """A corpus folder or manifest cannot be read (unknown layout, no files, bad CSV)."""


class BundleError(FedserError):
    """A model bundle is missing, truncated, incompatible or lacks a required part."""


class PrivacyBudgetExceeded(FedserError):
    """Training would spend more privacy budget than the device allows."""


class UpdateRejected(FedserError):
    """A client update failed validation; it never touches the global model."""

    def __init__(self, reasons: Iterable[str]):
        self.reasons = list(reasons)
        super().__init__("; ".join(self.reasons))


def collect(problems: list[str], error: type[FedserError] = ConfigError, prefix: str = "") -> None:
    """Raise ``error`` listing every problem at once, or do nothing if there are none."""
    if problems:
        head = f"{prefix}: " if prefix else ""
        raise error(head + "; ".join(problems))
