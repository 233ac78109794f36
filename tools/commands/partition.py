"""``fedser partition``: share corpora out by speaker into N device folders plus a held-out test set.

A device is a person (or a few): every speaker lands whole on one device, and the speakers
of the test split are on none. Nothing is copied; each device gets a manifest::

    DIR/device-0/data.csv ... DIR/device-<N-1>/data.csv   one per device (write_manifest)
    DIR/test.csv                                          held-out speakers (the server's test)
    DIR/partitions.json                                   how it was made, and per-device counts

``fedser demo`` hands these manifests to real SuperNodes; ``fedser simulate`` to the
virtual clients of Flower's Simulation Engine (client ``partition-id`` i reads
``device-<i>/data.csv``).
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fedser.common.corpora import Corpus, Utterance, write_manifest
from fedser.common.errors import ConfigError
from fedser.common.fsutil import PUBLIC, atomic_write_text
from fedser.common.partitions import PARTITIONS_FILE, PUBLIC_MANIFEST, TEST_MANIFEST, device_manifest
from fedser.common.splits import partition_by_speaker, speaker_split
from .args import load_data

HELP = "partition corpora by speaker into N device manifests plus a held-out test manifest"

@dataclass
class Partition:
    """The result of :func:`partition_corpus`: written manifests and what went into them."""

    root: Path
    devices: list[Path]                  # device-<i>/data.csv, i = 0..N-1
    test: Path | None                    # test.csv (None when no speaker is held out)
    parts: list[list[Utterance]]         # per device, the utterances of its manifest
    test_utterances: list[Utterance]
    public: Path | None = None           # public.csv (None unless a public share was asked for)
    public_utterances: list[Utterance] = dataclasses.field(default_factory=list)

    def device_rows(self) -> list[dict]:
        """Per device: speakers, utterances and label counts per task."""
        return [_describe(i, part) for i, part in enumerate(self.parts)]


def _describe(i: int, part: Sequence[Utterance]) -> dict:
    labels: dict[str, dict[str, int]] = {}
    for u in part:
        labels.setdefault(u.task, Counter())[u.label] += 1
    return {"device": i, "speakers": len({u.speaker for u in part}), "utterances": len(part),
            "labels": {t: dict(sorted(c.items())) for t, c in sorted(labels.items())}}


def check_public_share(public: float, test: float) -> None:
    """``ConfigError`` unless ``public`` is a share in [0, 1) that, with ``test``, leaves device speakers."""
    if not (isinstance(public, (int, float)) and 0 <= public < 1 and public + test < 1):
        raise ConfigError(f"--public {public!r}: expected a share in [0, 1) that leaves speakers for devices "
                          f"besides --test {test}")


def partition_corpus(corpus: Corpus, out: str | Path, n_clients: int, *, test: float = 0.2, seed: int = 0,
                     dirichlet_alpha: float | None = None, sources: Sequence[str] = (),
                     public: float = 0.0) -> Partition:
    """Hold out ``test`` of the speakers, share the rest among ``n_clients`` devices, write manifests.

    ``public`` > 0 sets about that share of all speakers apart as ``public.csv``: speech the
    server may use (``public-corpus``), standing in for a public corpus. The test speakers are
    the same with or without it.

    Raises ``ConfigError`` when there are fewer training speakers than devices (a speaker is
    never split), for a bad ``test`` share, or when ``out`` already holds a different
    partition (stale ``device-<i>`` folders beyond ``n_clients`` would be picked up later).
    """
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise ConfigError(f"--clients must be an integer >= 1, got {n_clients!r}")
    out = Path(out)
    stale = sorted(p.name for p in out.glob("device-*") if p.is_dir()
                   and not (p.name[7:].isdigit() and int(p.name[7:]) < n_clients))
    if stale:
        raise ConfigError(f"{out} already holds {', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''} from "
                          "a partition into more devices; use an empty --out folder")
    check_public_share(public, test)
    train_pool, _, test_u = speaker_split(corpus.utterances, val=0.0, test=test, seed=seed)
    public_u: list[Utterance] = []
    if public > 0:
        train_pool, _, public_u = speaker_split(train_pool, val=0.0, test=public / (1.0 - test), seed=seed)
    n_speakers = len({u.speaker for u in train_pool})
    if n_clients > n_speakers:
        raise ConfigError(f"--clients {n_clients}: only {n_speakers} training speakers to share out "
                          f"({len({u.speaker for u in test_u})} more held out for the test); a device is a "
                          "person, so use fewer clients or more data")
    parts = partition_by_speaker(train_pool, n_clients, seed=seed, dirichlet_alpha=dirichlet_alpha)
    devices = [write_manifest(part, device_manifest(out, i)) for i, part in enumerate(parts)]
    test_csv = write_manifest(test_u, out / TEST_MANIFEST) if test_u else None
    if test_csv is None and (out / TEST_MANIFEST).exists():
        (out / TEST_MANIFEST).unlink()   # a test split from an earlier partition would mislead
    public_csv = write_manifest(public_u, out / PUBLIC_MANIFEST) if public_u else None
    if public_csv is None and (out / PUBLIC_MANIFEST).exists():
        (out / PUBLIC_MANIFEST).unlink()
    result = Partition(out, devices, test_csv, parts, test_u, public_csv, public_u)
    meta = {"num-partitions": n_clients, "seed": seed, "test": test, "dirichlet-alpha": dirichlet_alpha,
            "sources": [str(s) for s in sources], "corpus": corpus.name,
            "test-manifest": TEST_MANIFEST if test_csv else None,
            "test-speakers": len({u.speaker for u in test_u}), "test-utterances": len(test_u),
            "public-manifest": PUBLIC_MANIFEST if public_csv else None,
            "public-speakers": len({u.speaker for u in public_u}), "public-utterances": len(public_u),
            "devices": result.device_rows()}
    atomic_write_text(out / PARTITIONS_FILE, json.dumps(meta, indent=1) + "\n", PUBLIC)
    return result


def summary_table(result: Partition, max_rows: int = 40) -> str:
    """Markdown table: speakers, utterances and labels per device (long partitions abridged)."""
    rows = result.device_rows()
    lines = ["| device | speakers | utterances | labels |", "|---|---:|---:|---|"]

    def line(name: str, r: dict) -> str:
        labels = "; ".join(f"{task}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                           for task, counts in r["labels"].items())
        return f"| {name} | {r['speakers']} | {r['utterances']} | {labels} |"

    shown = rows if len(rows) <= max_rows else rows[: max_rows // 2] + rows[-(max_rows // 2):]
    for k, r in enumerate(shown):
        if len(rows) > max_rows and k == max_rows // 2:
            lines.append(f"| ... | | | {len(rows) - max_rows} more devices in {PARTITIONS_FILE} |")
        lines.append(line(f"device-{r['device']}", r))
    lines.append(line("test (held out)", _describe(-1, result.test_utterances)))
    sizes = sorted(r["utterances"] for r in rows)
    lines += ["", f"{len(rows)} devices, {sum(r['speakers'] for r in rows)} speakers, "
              f"{sum(sizes)} utterances (per device min {sizes[0]}, median {sizes[len(sizes) // 2]}, "
              f"max {sizes[-1]}); test: {len({u.speaker for u in result.test_utterances})} speakers, "
              f"{len(result.test_utterances)} utterances"]
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--data", action="append", required=True, metavar="PATH",
                   help="corpus folder (layout auto-detected) or manifest CSV; repeat for several")
    p.add_argument("--clients", type=int, required=True, help="number of devices (each gets whole speakers)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for device-<i>/data.csv and test.csv")
    p.add_argument("--test", type=float, default=0.2, help="share of speakers held out for the test (default 0.2)")
    p.add_argument("--dirichlet-alpha", type=float, default=None, metavar="A",
                   help="label skew across devices (small A: few labels per device); default: speakers dealt "
                        "round-robin")
    p.add_argument("--public", type=float, default=0.0, metavar="SHARE",
                   help="share of speakers set apart as public.csv, the server's public corpus (default 0)")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    corpus = load_data(args.data)
    result = partition_corpus(corpus, args.out, args.clients, test=args.test, seed=args.seed,
                              dirichlet_alpha=args.dirichlet_alpha, sources=args.data, public=args.public)
    print(summary_table(result))
    print(f"\nwrote {len(result.devices)} device manifests under {Path(args.out)}/device-<i>/data.csv"
          + (f" and {result.test}" if result.test else " (no test split: --test 0)"))
    if result.public:
        print(f"public speech for the server (--public-corpus): {result.public}, "
              f"{len(result.public_utterances)} utterances of {len({u.speaker for u in result.public_utterances})} "
              "speakers")
    return 0
