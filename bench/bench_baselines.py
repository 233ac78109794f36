"""Centralized baselines exactly as a user gets them: ``fedser train`` / ``fedser evaluate`` as subprocesses.

Rows (each a ``fedser train`` run on a speaker-independent split, the CLI's defaults unless the
row's flags say otherwise; test figures from the run's ``metrics.json``):

- KWS, Speech Commands, 12 classes, plain and with DP-SGD (epsilon 8, delta 1e-5).
  Targets: accuracy >= 0.90; DP within 5 points of plain.
- Emotion, RAVDESS (actor-independent), 8 classes, plain and DP (epsilon 8).
  Targets: UAR >= 0.60; DP within 8 points of plain.
- Emotion, EmoDB, 7 classes, plain (extra row, no target).
- Cross-corpus: the plain RAVDESS model scored on EmoDB over the classes both share
  (``fedser evaluate RUN --data emodb --include-train-speakers --json``: no EmoDB speaker is in
  RAVDESS, but the two corpora share bare speaker ids, which ``evaluate`` would otherwise drop).

Each row's wall time covers the whole command (corpus scan, features — cached after the first
run —, training with early stopping, test). Peak RSS is the command's own ``ru_maxrss``.

    python bench/bench_baselines.py [--data DIR] [--runs DIR] [--only kws emotion ...] [--quick]
                                    [--train-args "--encoder crnn"] [--reuse] [--jobs N --threads T]

``--quick`` trains 2 epochs per row: it checks the pipeline, its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, REPO, Report, load_average, load_note, md_table  # noqa: E402

DP_ARGS = ["--dp", "--target-epsilon", "8", "--delta", "1e-5"]


@dataclass
class Row:
    name: str            # run folder name, also the --only key prefix
    label: str           # what the table calls it
    task: str
    corpus: str          # folder under --data
    flags: list[str] = field(default_factory=list)
    metric: str = "accuracy"   # headline metric: "accuracy" or "uar"
    target: str = ""
    ref: str | None = None     # plain row a DP row is compared with
    max_drop: float | None = None
    minimum: float | None = None


ROWS = [
    Row("kws", "KWS, Speech Commands (12 classes)", "kws", "speech_commands", [], "accuracy",
        "accuracy >= 0.90", minimum=0.90),
    Row("kws_dp", "KWS, Speech Commands, DP-SGD eps 8", "kws", "speech_commands", DP_ARGS, "accuracy",
        "within 5 points of plain", ref="kws", max_drop=0.05),
    Row("ravdess", "Emotion, RAVDESS (8 classes, actor-independent)", "emotion", "ravdess", [], "uar",
        "UAR >= 0.60", minimum=0.60),
    Row("ravdess_dp", "Emotion, RAVDESS, DP-SGD eps 8", "emotion", "ravdess", DP_ARGS, "uar",
        "within 8 points of plain", ref="ravdess", max_drop=0.08),
    Row("emodb", "Emotion, EmoDB (7 classes, speaker-independent)", "emotion", "emodb", [], "uar", "— (extra)"),
]


def fedser_exe() -> list[str]:
    exe = Path(sys.executable).parent / "fedser"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fedser.tools.cli"]


def run_cmd(cmd: list[str], log_path: Path, stdout_path: Path | None = None,
            threads: int = 0) -> tuple[int, float, float]:
    """Run ``cmd``; (exit status, wall seconds, the command's own peak RSS in MiB)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    t0 = time.perf_counter()
    with open(log_path, "w") as err, open(stdout_path or os.devnull, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO, env=env)
        # wait4 gives this child's own rusage, so each row's peak is its own.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024


def fmt(x, digits=3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus root (speech_commands/, ravdess/, emodb/)")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "bench", help="where the run folders go")
    p.add_argument("--only", nargs="+", default=None, help="row names to run: " + ", ".join(r.name for r in ROWS))
    p.add_argument("--train-args", default="", help="extra flags for every `fedser train` (quoted string)")
    p.add_argument("--kws-args", default="", help="extra flags for the KWS rows only")
    p.add_argument("--emotion-args", default="", help="extra flags for the emotion rows only")
    p.add_argument("--reuse", action="store_true", help="reuse a row's metrics.json when present (no retraining)")
    p.add_argument("--quick", action="store_true", help="2 epochs per row (pipeline check only)")
    p.add_argument("--name", default="bench_baselines", help="results file name (bench/results/NAME.md)")
    p.add_argument("--jobs", type=int, default=1, help="rows trained at the same time (on a machine with cores to spare)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per row (OMP_NUM_THREADS; 0 = torch's default)")
    args = p.parse_args(argv)
    rows = [r for r in ROWS if args.only is None or r.name in args.only]
    absent = sorted({r.corpus for r in rows if not (args.data / r.corpus).is_dir()})
    if not [r for r in rows if r.corpus not in absent]:
        print(f"skipped: corpus not found under {args.data} ({', '.join(absent)}); pass --data DIR to point elsewhere")
        return 0
    if absent:
        print(f"note: {', '.join(absent)} not found under {args.data}; their rows are skipped", file=sys.stderr)
        rows = [r for r in rows if r.corpus not in absent]
    if args.quick:
        args.name += "_quick"
    args.runs.mkdir(parents=True, exist_ok=True)

    load_start = load_average()
    t_all = time.perf_counter()
    results: dict[str, dict] = {}

    def run_row(row: Row) -> None:
        out = args.runs / row.name
        extra = shlex.split(args.train_args) + shlex.split(args.kws_args if row.task == "kws" else args.emotion_args)
        flags = row.flags + extra + (["--epochs", "2"] if args.quick else [])
        cmd = fedser_exe() + ["train", "--task", row.task, "--data", str(args.data / row.corpus),
                              "--out", str(out), "--quiet"] + flags
        metrics_path = out / "metrics.json"
        before = load_average()
        if args.reuse and metrics_path.exists():
            rc, wall, rss = 0, float("nan"), float("nan")
            print(f"{row.name}: reusing {metrics_path}", file=sys.stderr)
        else:
            metrics_path.unlink(missing_ok=True)
            print(f"{row.name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
            rc, wall, rss = run_cmd(cmd, args.runs / f"{row.name}.log", threads=args.threads)
        if rc != 0 or not metrics_path.exists():
            print(f"{row.name}: failed (exit {rc}); see {args.runs / f'{row.name}.log'}", file=sys.stderr)
            results[row.name] = {"failed": rc, "flags": flags}
            return
        m = json.loads(metrics_path.read_text())
        results[row.name] = {"m": m, "wall": wall, "rss": rss, "flags": flags, "load": (before, load_average())}
        t = m["test"]
        print(f"{row.name}: accuracy {t['accuracy']:.3f}, UAR {t['uar']:.3f}, {wall:.0f} s", file=sys.stderr, flush=True)

    # Rows are independent runs; with --jobs they share the machine (each row's wall time then includes
    # the others' load, its accuracy does not change).
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(run_row, rows))

    cross = None
    if ("m" in results.get("ravdess", {}) and (args.data / "emodb").is_dir()
            and (args.only is None or "cross" in args.only or "ravdess" in args.only)):
        # --include-train-speakers: RAVDESS actors and EmoDB speakers share bare ids ("03", "08", ...),
        # and evaluate compares bare ids, so without it 7 of the 10 EmoDB speakers would be dropped as
        # "seen in training" although no EmoDB speaker was.
        cmd = fedser_exe() + ["evaluate", str(args.runs / "ravdess"), "--data", str(args.data / "emodb"),
                              "--include-train-speakers", "--json", "--quiet"]
        print(f"cross: {shlex.join(cmd)}", file=sys.stderr, flush=True)
        out_json = args.runs / "cross_emodb.json"
        rc, wall, rss = run_cmd(cmd, args.runs / "cross_emodb.log", out_json, threads=args.threads)
        if rc == 0:
            cross = {"r": json.loads(out_json.read_text().strip().splitlines()[-1]), "wall": wall, "rss": rss}
        else:
            print(f"cross: failed (exit {rc}); see {args.runs / 'cross_emodb.log'}", file=sys.stderr)
    wall_all = time.perf_counter() - t_all
    load_end = load_average()

    rep = Report(args.name, "Centralized baselines (`fedser train`, speaker-independent splits)")
    if args.quick:
        rep.add("**Quick mode (2 epochs per row): a pipeline check, not a result.**\n")
    rep.add(f"Corpus: {args.data}. Each row is one `fedser train --task T --data CORPUS --out RUN --quiet FLAGS` "
            "(speaker split val 0.15 / test 0.2 of speakers, seed 0; cnn encoder, Adam with a cosine schedule, "
            "early stopping on validation UAR, augmentation on; batch, learning rate, epoch limit and patience are "
            "the CLI's defaults for the row, shown in the settings column). Test figures come from the run's "
            "metrics.json.")
    rep.add(f"{load_note(load_start, load_end)}.")
    rep.add("")
    table = []
    verdicts = []
    for row in rows:
        r = results.get(row.name)
        if r is None:
            continue
        if "m" not in r:
            table.append([row.label, shlex.join(r["flags"]) or "(defaults)", ""] + ["failed"] + [""] * 9)
            continue
        m, t = r["m"], r["m"]["test"]
        s = m["split"]
        eps = (m.get("privacy") or {}).get("epsilon")
        epochs_run = len(m["history"])
        headline = t[row.metric]
        verdict = ""
        if row.minimum is not None:
            verdict = f"{'met' if headline >= row.minimum else 'MISSED'} ({row.target})"
        elif row.ref and "m" in results.get(row.ref, {}):
            ref = results[row.ref]["m"]["test"][row.metric]
            drop = ref - headline
            verdict = f"{'met' if drop <= row.max_drop else 'MISSED'}: {100 * drop:+.1f} points vs plain ({row.target})"
        elif row.target:
            verdict = row.target
        verdicts.append(f"- {row.label}: {row.metric} {headline:.3f} — {verdict}")
        tc = m.get("train_config", {})
        settings = (f"batch {tc.get('batch_size')}, lr {tc.get('lr', float('nan')):g}, <= {tc.get('epochs')} epochs, "
                    f"patience {tc.get('patience')}")
        table.append([row.label, shlex.join(r["flags"]) or "(defaults)", settings,
                      f"{s['train_speakers']} / {s['test_speakers']}", f"{s['train']} / {s['val']} / {s['test']}",
                      fmt(t["accuracy"]), fmt(t["uar"]), fmt(t["weighted_f1"]), fmt(eps, 2),
                      f"{m['best_epoch']} / {epochs_run}", f"{r['wall']:.0f}", f"{r['rss']:.0f}", verdict])
    if cross:
        c = cross["r"]
        table.append([f"Cross-corpus: RAVDESS model on EmoDB ({len(c['label_set'])} shared classes)",
                      "`fedser evaluate --include-train-speakers`", "—", f"— / {c['speakers']}", f"— / — / {c['n']}", fmt(c["accuracy"]),
                      fmt(c["uar"]), fmt(c["weighted_f1"]), "—", "—", f"{cross['wall']:.0f}", f"{cross['rss']:.0f}",
                      "— (extra; chance UAR " + f"{1 / len(c['label_set']):.3f})"])
    rep.add(md_table(["row", "flags", "settings", "speakers train / test", "clips train / val / test", "accuracy", "UAR",
                      "weighted F1", "epsilon", "best epoch / epochs run", "wall (s)", "peak RSS (MiB)", "target"],
                     table, ["l", "l", "l"] + ["r"] * 9 + ["l"]))
    rep.add("")
    if cross:
        rep.add(f"Cross-corpus classes: {', '.join(cross['r']['label_set'])}"
                + (f" ({cross['r']['label_set_note']})" if cross["r"].get("label_set_note") else "") + ".")
    for v in verdicts:
        rep.add(v)
    rep.add(f"\nWall time of this bench: {wall_all:.0f} s.")
    rep.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
