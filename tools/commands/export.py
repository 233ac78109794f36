"""``fedser export``: a run's model as one self-contained TorchScript or ONNX file."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fedser.common import audio
from fedser.common.bundle import Bundle, load_bundle
from fedser.common.corpora import load_corpus
from fedser.common.errors import AudioError, ConfigError, CorpusError
from fedser.common.export_format import FORMATS, SUFFIXES
from fedser.tools.export import DEFAULT_ATOL, export_bundle
from fedser.common.features import fit_length

HELP = "export a run's model (front end + encoder + heads) to TorchScript or ONNX, verified"


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or model bundle file)")
    p.add_argument("--format", choices=FORMATS, required=True, dest="fmt")
    p.add_argument("--out", required=True, metavar="FILE",
                   help=f"file to write ({', '.join(f'{s} for {f}' for f, s in SUFFIXES.items())})")
    p.add_argument("--data", action="append", default=None, metavar="PATH",
                   help="corpus to draw verification clips from (default: the corpus the run recorded; "
                        "synthetic signals when there is none)")
    p.add_argument("--clips", type=int, default=32, help="verification clips per head (default 32)")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                   help=f"largest allowed probability difference (default {DEFAULT_ATOL:g})")
    p.add_argument("--json", action="store_true", help="print the export report as one JSON object")


def log(msg: str) -> None:
    print(msg, file=sys.stderr)


def recorded_corpora(bundle: Bundle) -> list[str]:
    """Corpus paths a run recorded in its bundle (centralized list or federated description)."""
    corpus = bundle.meta.get("corpus")
    paths: list[str] = []
    if isinstance(corpus, list):
        paths = [c.get("path") for c in corpus if isinstance(c, dict)]
    elif isinstance(corpus, dict):
        paths = [corpus.get("kws_pretraining")]
    return [p for p in paths if p and Path(p).exists()]


def verification_clips(bundle: Bundle, data: list[str], n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], str]:
    """Up to ``n`` clips per trained head, ``(n, clip_samples(task))``, and where they came from.

    Speakers the model was trained on are avoided when others exist. Without a corpus
    (or without usable clips of a head) the head gets seeded synthetic signals: chirps
    in noise, which still exercise every layer.
    """
    spec = bundle.feature_spec
    rng = np.random.default_rng(seed)
    seen = set(bundle.meta.get("train_speakers") or [])
    clips: dict[str, np.ndarray] = {}
    sources: list[str] = []
    utterances = []
    for path in data:
        try:
            utterances += load_corpus(path).utterances
        except CorpusError as exc:
            log(f"verification corpus {path}: {exc}")
    for task in bundle.tasks:
        pool = [u for u in utterances if u.task == task and u.label in bundle.labels[task]]
        unseen = [u for u in pool if u.speaker not in seen]
        pool = unseen or pool
        waves = []
        for i in rng.permutation(len(pool)):
            if len(waves) >= n:
                break
            u = pool[int(i)]
            try:
                w = audio.load(u.path, sample_rate=spec.sample_rate, offset=u.offset, duration=u.duration,
                               max_seconds=2 * spec.clip_samples(task) / spec.sample_rate)
            except AudioError:
                continue
            waves.append(fit_length(w, spec.clip_samples(task), mode="center"))
        if waves:
            clips[task] = np.stack(waves)
            sources.append(f"{len(waves)} {task} clips of {', '.join(data)}")
        else:
            clips[task] = synthetic_clips(spec.clip_samples(task), spec.sample_rate, n, rng)
            sources.append(f"{n} synthetic {task} signals")
    if not clips:  # a bundle with no trained head: check the graph anyway
        clips["kws"] = synthetic_clips(spec.clip_samples("kws"), spec.sample_rate, n, rng)
        sources.append(f"{n} synthetic signals")
    return clips, "; ".join(sources)


def synthetic_clips(n_samples: int, sample_rate: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, n_samples)`` float32: a rising chirp of random range and level in white noise."""
    t = np.arange(n_samples) / sample_rate
    out = np.empty((n, n_samples), dtype=np.float32)
    for i in range(n):
        f0, f1 = rng.uniform(100, 600), rng.uniform(800, 4000)
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * t[-1]))
        out[i] = rng.uniform(0.05, 0.5) * np.sin(phase) + rng.uniform(0.001, 0.05) * rng.standard_normal(n_samples)
    return out


def run(args) -> int:
    if args.clips < 1:
        raise ConfigError(f"--clips: expected at least 1; got {args.clips}")
    bundle = load_bundle(args.run_dir)
    data = args.data if args.data is not None else recorded_corpora(bundle)
    for p in data:
        if not Path(p).exists():
            raise ConfigError(f"--data {p}: no such file or folder")
    if not data:
        log("no corpus recorded in the run and no --data given: verifying on synthetic signals")
    clips, source = verification_clips(bundle, data, args.clips)
    result = export_bundle(bundle, args.fmt, args.out, clips, source, atol=args.atol)
    v = result.verification
    report = {"path": str(result.path), "format": result.fmt, "size_bytes": result.size_bytes,
              "seconds": round(result.seconds, 2), "verification": v.to_dict()}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"wrote {result.path} ({result.fmt}, {result.size_bytes / 1024:.0f} KiB)")
        print(f"verified on {v.source}: " + ", ".join(
            f"{t} max |dp| {v.max_abs_diff[t]:.1e}" + (f", top-1 agreement {v.top1_agreement[t]:.0%}"
                                                      if t in v.top1_agreement else "")
            for t in v.max_abs_diff))
    return 0
