"""Helpers shared by the bench scripts: where the corpus is, skipping cleanly, tables, load, memory.

Bench scripts print markdown tables to stdout and also write them to
``bench/results/<name>.md`` so the latest figures can be committed beside the code.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
# The development corpus lives beside the project (../shared/data), never inside it.
DEFAULT_DATA = REPO.parent / "shared" / "data"


def data_or_skip(root: Path, *subdirs: str) -> bool:
    """True when ``root`` and every ``root/sub`` exist; otherwise print why the bench is skipped.

    The caller then returns exit status 0: a missing corpus is not a failure.
    """
    missing = [str(p) for p in [root, *(root / s for s in subdirs)] if not p.is_dir()]
    if missing:
        print(f"skipped: corpus not found ({', '.join(missing)}); pass --data DIR to point elsewhere")
        return False
    return True


def load_average() -> float:
    """1-minute load average (NaN where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss``)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def machine_line() -> str:
    """One line naming the machine: CPUs, Python, torch and its thread count."""
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
            f"torch {torch.__version__} with {torch.get_num_threads()} thread(s)")


def load_note(before: float, after: float, cpus: int | None = None) -> str:
    """Say the load average and whether the machine was busy while measuring."""
    cpus = cpus or os.cpu_count() or 1
    note = f"1-min load average {before:.2f} before, {after:.2f} after, on {cpus} CPU(s)"
    if max(before, after) > 0.75 * cpus:
        note += (" — the machine was shared and busy while measuring, so time and throughput "
                 "figures are pessimistic")
    return note


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: Sequence[str] | None = None) -> str:
    """Markdown table; ``align`` holds ``"l"`` or ``"r"`` per column (default: first left, rest right)."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def now() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


class Report:
    """Lines printed as they come and written to ``bench/results/<name>.md`` by ``save``."""

    def __init__(self, name: str, title: str):
        self.name = name
        self.lines: list[str] = [f"# {title}", "", f"Measured {now()}.", ""]

    def add(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def save(self, results_dir: Path = RESULTS_DIR) -> Path:
        results_dir.mkdir(parents=True, exist_ok=True)
        path = results_dir / f"{self.name}.md"
        path.write_text("\n".join(self.lines).rstrip() + "\n")
        print(f"\n(written to {path})", flush=True)
        return path
