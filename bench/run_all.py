"""Run every ``bench/bench_*.py`` as a subprocess, one after the other, and collect the results.

Each script prints markdown to stdout. Scripts that write their own ``bench/results/<name>.md``
keep it; for the others this runner writes their stdout there. A summary of exit statuses and
wall times goes to ``bench/results/run_all.md``.

    python bench/run_all.py [--quick] [--data DIR] [--only features training ...]
    make bench ARGS="--quick"

``--quick`` is passed to every script that has a ``--quick`` option (the others run as they
are); ``--data`` is passed to every script that reads the corpus. A script whose corpus is
absent skips itself and exits 0.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (BENCH_DIR, DEFAULT_DATA, REPO, RESULTS_DIR, Report, load_average, load_note,  # noqa: E402
                     machine_line, md_table)

# Cheap, independent figures first; the long trainings last but one.
ORDER = ["bench_features", "bench_aggregation", "bench_device_memory", "bench_training", "bench_baselines"]
# Scripts whose --data means one corpus folder rather than the corpus root.
DATA_SUBDIR = {"bench_features": "speech_commands"}


def scripts() -> list[Path]:
    found = sorted(BENCH_DIR.glob("bench_*.py"))
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(found, key=lambda p: (rank.get(p.stem, len(ORDER) - 0.5), p.stem))


def options_of(script: Path) -> str:
    """The script's --help text ('' when it has none)."""
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=REPO)
    return proc.stdout if proc.returncode == 0 else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to the scripts that have it")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus root (default ../shared/data)")
    p.add_argument("--only", nargs="+", default=None, help="script names, with or without the bench_ prefix")
    args = p.parse_args(argv)
    wanted = None if args.only is None else {n if n.startswith("bench_") else f"bench_{n}" for n in args.only}

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    load_start = load_average()
    summary = []
    failed = 0
    for script in scripts():
        name = script.stem
        if wanted is not None and name not in wanted:
            continue
        help_text = options_of(script)
        cmd = [sys.executable, str(script)]
        if args.quick and "--quick" in help_text:
            cmd.append("--quick")
        if "--data" in help_text:
            cmd += ["--data", str(args.data / DATA_SUBDIR.get(name, ""))]
        print(f"\n===== {name}: {' '.join(cmd[1:])}", flush=True)
        # Quick runs write NAME_quick.md so they never overwrite the full figures.
        own_result = RESULTS_DIR / f"{name}{'_quick' if '--quick' in cmd else ''}.md"
        mtime = own_result.stat().st_mtime if own_result.exists() else None
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)  # stderr (progress) passes through
        wall = time.perf_counter() - t0
        print(proc.stdout, end="", flush=True)
        skipped = proc.stdout.lstrip().startswith("skipped:")
        wrote_own = own_result.exists() and own_result.stat().st_mtime != mtime
        if proc.returncode == 0 and not skipped and not wrote_own:
            out = own_result
            title = (script.read_text().split('"""')[1].strip().splitlines() or [name])[0]
            rep = Report(out.stem, title)
            rep.lines.append(f"`python bench/{script.name} {' '.join(cmd[2:])}`\n")
            rep.lines.append(proc.stdout.rstrip())
            rep.lines.append(f"\nWall time: {wall:.0f} s.")
            rep.save()
        status = "skipped" if skipped else ("ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})")
        failed += proc.returncode != 0
        summary.append([name, " ".join(cmd[2:]) or "—", status, f"{wall:.0f}"])
    load_end = load_average()

    rep = Report("run_all", "Bench run summary")
    rep.add(machine_line() + ".")
    rep.add(load_note(load_start, load_end) + ".")
    rep.add("")
    rep.add(md_table(["script", "options", "status", "wall (s)"], summary, ["l", "l", "l", "r"]))
    rep.save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
