"""Arguments and loading steps several subcommands share."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedser.common.corpora import Corpus, load_corpus, merge_corpora
from fedser.common.errors import ConfigError


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDSER_CACHE", Path.home() / ".cache" / "fedser"))


def add_data_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", action="append", required=required, metavar="PATH",
                   help="corpus folder (layout auto-detected: Speech Commands, RAVDESS, CREMA-D, TESS, "
                        "EmoDB) or a manifest CSV (path,label,speaker[,task]); repeat for several")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help=f"feature cache folder (default: $FEDSER_CACHE or {default_cache_dir()}); "
                        "'none' disables it")


def cache_from_args(args):
    """The feature cache the --cache option names (a FeatureCache)."""
    from fedser.common.cache import FeatureCache

    if args.cache == "none":
        return FeatureCache(None)
    return FeatureCache(Path(args.cache) if args.cache else default_cache_dir() / "features")


def load_data(paths: list[str], log=lambda s: print(s, file=sys.stderr)) -> Corpus:
    """Load every --data path, saying which layout each was detected as."""
    for p in paths:
        if not Path(p).exists():
            raise ConfigError(f"--data {p}: no such file or folder")
    parts = [load_corpus(p) for p in paths]
    for c in parts:
        log(f"{c.root}: detected {c.name} layout: {len(c.utterances)} utterances, "
            f"{len(c.speakers())} speakers, tasks {', '.join(sorted(c.tasks())) or 'none'}"
            + (f", {len(c.skipped)} file(s) skipped" if c.skipped else ""))
    return parts[0] if len(parts) == 1 else merge_corpora(parts)


def noise_dirs(paths: list[str]) -> list[Path]:
    """Background-noise folders shipped with the given corpora (Speech Commands style)."""
    found = []
    for p in paths:
        root = Path(p)
        if root.is_dir():
            found += [d for d in [root / "_background_noise_"] if d.is_dir()]
    return found
