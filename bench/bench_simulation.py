"""Flower Simulation Engine at scale: 200 or 1000 virtual clients, partitioned by speaker, sampled per round.

Corpus (synthesized, so it needs espeak-ng but not the development corpus): ``fedser synth``
makes at most 99 speakers per corpus, so corpora of 75 speakers (seeds 0, 1, 2, ...: as many as
the clients need, three for 200, fifteen for 1000; one repetition per emotion and per command
word, 6 unknown words, 10 s of each noise) are merged into one manifest in which each synthetic
person keeps ONE speaker id across both tasks (``s<seed>-<actor>``; the loaders would otherwise
give a person's emotion clips and command clips two ids) and the ``_silence_`` slices of each
noise file count as one more "speaker". For 200 clients that is 225 people + 12 noise sources;
``fedser partition --test 0.1`` holds about a tenth out for the server's test and shares the rest
among the devices (a few get two speakers).

Run: ``fedser simulate`` with fraction-train m/N = 20/200 clients per round and
fraction-evaluate 10/200, Ray on ``--ray-cpus`` CPUs with ``--client-cpus`` per client, DP-SGD
on every device (budget epsilon 8, delta 1e-5, each device calibrates its noise over the
rounds planned), user-level update clipping C = 2 with distributed Gaussian noise z
(``--noise-multiplier``; the server accounts user-level epsilon with sampling q = m/N).

Figures: wall time of start-up and of each round (from the run's ``metrics.json``), peak
memory of the whole process tree (sum of PSS, so shared libraries count once; and the
largest single process), user-level and device-level epsilon, server-side accuracy / UAR
on the held-out speakers after the last round.

    python bench/bench_simulation.py [--clients 200] [--per-round 20] [--rounds 10]
                                     [--noise-multiplier 1.0] [--secure-aggregation] [--work DIR] [--quick]

``--secure-aggregation``: the rounds run under secure aggregation (the server sees only sums).

``--quick``: 40 clients, 8 per round, 2 rounds (checks the pipeline; figures mean little).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, load_average, load_note, machine_line, md_table  # noqa: E402

SPEAKERS_PER_CORPUS = 75


def corpora_for(clients: int) -> int:
    """Synthesized corpora whose people fill ``clients`` devices after a tenth is held out (three at least)."""
    return max(3, -(-int(clients / 0.88) // SPEAKERS_PER_CORPUS))


# ---------------------------------------------------------------- process-tree memory

def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            out.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    kids, out, todo = _children(), [pid], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kib(pid: int, field: str, name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class MemorySampler(threading.Thread):
    """Samples the process tree under ``pid`` every ``every`` seconds: peak summed PSS and peak
    single-process RSS (MiB), and the largest number of processes seen."""

    def __init__(self, pid: int, every: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_pss = self.peak_rss_one = 0.0
        self.peak_procs = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pids = tree(self.pid)
            pss = sum(_kib(p, "Pss", "smaps_rollup") for p in pids) / 1024
            rss_one = max((_kib(p, "VmRSS", "status") for p in pids), default=0) / 1024
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_rss_one = max(self.peak_rss_one, rss_one)
            self.peak_procs = max(self.peak_procs, len(pids))
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# ---------------------------------------------------------------- running fedser

def fedser_argv() -> list[str]:
    exe = Path(sys.executable).parent / "fedser"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fedser.tools.cli"]


def run_simulation(partitions: Path, run_dir: Path, rounds: int, config: dict, env: dict,
                   ray_cpus: int = 2, client_cpus: int = 1, log_path: Path | None = None) -> dict:
    """``fedser simulate`` as a subprocess; returns wall time, memory peaks, metrics.json rows and summary.

    A run directory that already holds a finished run of ``rounds`` rounds is reused (its
    figures come from its ``bench.json``).
    """
    record = run_dir / "bench.json"
    if record.exists():
        old = json.loads(record.read_text())
        if old.get("rounds") == rounds and old.get("config") == config:
            return old
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    argv = fedser_argv() + ["simulate", "--partitions", str(partitions), "--rounds", str(rounds),
                            "--out", str(run_dir), "--ray-cpus", str(ray_cpus), "--client-cpus", str(client_cpus)]
    for k, v in config.items():
        argv += ["--config", f"{k}={v}"]
    log_path = log_path or run_dir.parent / f"{run_dir.name}.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        sampler = MemorySampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.stop()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"fedser simulate exited {rc}; see {log_path}:\n" + log_path.read_text()[-3000:])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = {"rounds": rounds, "config": config, "wall": wall, "peak_pss_mb": sampler.peak_pss,
           "peak_rss_one_mb": sampler.peak_rss_one, "peak_processes": sampler.peak_procs,
           "rows": metrics["rounds"], "summary": metrics["summary"]}
    record.write_text(json.dumps(out, indent=1, default=float))
    return out


def bench_env(work: Path) -> dict:
    """fedser and Flower state (feature cache, ledgers, FLWR_HOME) under ``work``."""
    env = dict(os.environ)
    env.update(FEDSER_HOME=str(work / "home"), FEDSER_CACHE=str(work / "home"), FLWR_HOME=str(work / "flwr"),
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return env


# ---------------------------------------------------------------- corpus

def synth_corpus(work: Path, corpora: int) -> Path:
    """``corpora`` synthesized corpora merged into one manifest, one speaker id per synthetic person."""
    from fedser.tools import synth
    from fedser.common.corpora import load_corpus, write_manifest
    from dataclasses import replace

    merged = work / ("corpus.csv" if corpora == 3 else f"corpus-{corpora}.csv")
    if merged.exists():
        return merged
    utterances = []
    for seed in range(corpora):
        root = work / f"synth-{seed}"
        if not synth.is_complete(root):
            t0 = time.perf_counter()
            synth.synthesize_corpus(root, n_speakers=SPEAKERS_PER_CORPUS, seed=seed, statements=1, repetitions=1,
                                    command_repetitions=1, unknown_repetitions=1, noise_seconds=10.0,
                                    overwrite=True, progress=False)
            print(f"synthesized {root} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        people = json.loads((root / synth.MANIFEST).read_text())["speakers"]
        by_hash = {p["hash"]: p["actor"] for p in people}
        for part in ("commands", "emotion"):
            for u in load_corpus(root / part).utterances:
                actor = int(u.speaker) if u.task == "emotion" else by_hash.get(u.speaker)
                person = f"s{seed}-{actor:02d}" if actor is not None else f"s{seed}-{u.speaker}"
                utterances.append(replace(u, speaker=person))
    write_manifest(utterances, merged)
    return merged


def partition(corpus: Path, out: Path, clients: int, test: float, env: dict) -> dict:
    from fedser.common.partitions import read_partitions

    if (out / "partitions.json").exists():
        meta = read_partitions(out)
        if meta["num-partitions"] == clients and meta["test"] == test:
            return meta
    subprocess.run(fedser_argv() + ["partition", "--data", str(corpus), "--clients", str(clients), "--test",
                                    str(test), "--out", str(out)], check=True, env=env, stdout=subprocess.DEVNULL)
    return read_partitions(out)


# ---------------------------------------------------------------- report

def fmt(x, digits=3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if x == float("inf"):
            return "inf"
        return f"{x:.{digits}f}"
    return str(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--per-round", type=int, default=20, help="clients sampled for training each round (m)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--noise-multiplier", type=float, default=1.0, help="user-level z (distributed noise)")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--client-cpus", type=int, default=1)
    p.add_argument("--secure-aggregation", action="store_true", help="rounds under secure aggregation")
    p.add_argument("--work", type=Path, default=Path("/tmp/fedser-bench/simulation"),
                   help="corpus, partitions and runs (kept between invocations; finished runs are reused)")
    p.add_argument("--quick", action="store_true", help="40 clients, 8 per round, 2 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.per_round, args.rounds = 40, 8, 2
    try:
        from fedser.tools.synth import locate_espeak
        locate_espeak()
    except Exception as exc:  # noqa: BLE001 - any reason espeak-ng is unusable
        print(f"skipped: the synthesized corpus needs espeak-ng ({exc})")
        return 0

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = bench_env(work)
    name = "bench_simulation" + ("_quick" if args.quick else f"_{args.clients}" if args.clients != 200 else "") \
        + ("_secagg" if args.secure_aggregation else "")
    rep = Report(name, "Flower Simulation Engine: virtual clients partitioned by speaker")
    load0 = load_average()
    t0 = time.perf_counter()
    corpora = corpora_for(args.clients)
    corpus = synth_corpus(work, corpora)
    meta = partition(corpus, work / f"parts-{args.clients}", args.clients, 0.1, env)
    prep = time.perf_counter() - t0
    q = args.per_round / args.clients
    config = {"fraction-train": q, "fraction-evaluate": min(1.0, max(0.5 * args.per_round, 2) / args.clients),
              "min-clients": 2, "local-epochs": args.local_epochs, "dp": True, "noise-mode": "distributed",
              "noise-multiplier": args.noise_multiplier, "clip-norm": 2.0, "partition-max-epsilon": 8.0}
    if args.secure_aggregation:
        config["secure-aggregation"] = True
    res = run_simulation(work / f"parts-{args.clients}", work / (f"run-{args.clients}-z{args.noise_multiplier:g}"
                                                                 + ("-secagg" if args.secure_aggregation else "")),
                         args.rounds, config, env, args.ray_cpus, args.client_cpus)
    load1 = load_average()
    rows, summary = res["rows"], res["summary"]
    sizes = sorted(d["utterances"] for d in meta["devices"])
    speakers = sum(d["speakers"] for d in meta["devices"])
    round_secs = [r["seconds"] for r in rows]
    startup = res["wall"] - sum(round_secs)
    last = rows[-1]

    rep.add(f"{machine_line()}. {load_note(load0, load1)}.")
    rep.add("")
    rep.add(f"Corpus: {corpora} synthesized corpora x {SPEAKERS_PER_CORPUS} speakers (one id per person across "
            f"both tasks) + noise sources for `_silence_`; {args.clients} devices holding {speakers} speakers "
            f"({sizes[0]}-{sizes[-1]} utterances each, median {sizes[len(sizes) // 2]}); test: "
            f"{meta['test-speakers']} held-out speakers, {meta['test-utterances']} utterances. Corpus and "
            f"partition prepared in {prep:.0f} s (cached after the first time).")
    rep.add("")
    rep.add(f"Run: `fedser simulate` {args.rounds} rounds, {args.per_round} of {args.clients} clients sampled per "
            f"round (q = {q:g}), {args.local_epochs} local epoch(s), DP-SGD on every device (budget eps 8, "
            f"delta 1e-5), update clipping C = 2 (adapting to the median norm) with distributed user-level noise "
            f"z = {args.noise_multiplier:g}{' under secure aggregation' if args.secure_aggregation else ''}; "
            f"Ray with {args.ray_cpus} CPU(s), {args.client_cpus} per virtual client "
            f"({args.ray_cpus // args.client_cpus} client(s) at a time).")
    rep.add("")
    rep.add(md_table(["round", "seconds", "clients trained", "declined", "server KWS acc", "server emotion UAR",
                      "user eps", "max device eps"],
                     [[r["round"], fmt(r["seconds"], 1), r["clients-used"], r["clients-declined"],
                       fmt(r.get("server-kws-accuracy")), fmt(r.get("server-emotion-uar")),
                       fmt(r["user-epsilon"], 2), fmt(r["max-device-epsilon"], 2)] for r in rows]))
    rep.add("")
    rep.add(md_table(["figure", "value"], [
        ["virtual clients (N) / sampled per round (m)", f"{args.clients} / {args.per_round}"],
        ["wall time, whole command", f"{res['wall']:.0f} s"],
        ["start-up + shutdown (SuperLink, flwr-simulation, Ray, ServerApp; Ray teardown)", f"{startup:.0f} s"],
        ["round wall time: first / median of the rest",
         f"{round_secs[0]:.1f} s / {sorted(round_secs[1:])[len(round_secs[1:]) // 2]:.1f} s"
         if len(round_secs) > 1 else f"{round_secs[0]:.1f} s"],
        ["rounds per second (the rounds' own wall time)", f"{len(rows) / sum(round_secs):.4f}"],
        ["peak memory, whole process tree (sum of PSS)", f"{res['peak_pss_mb']:.0f} MiB"],
        ["peak RSS of one process (a Ray ClientAppActor or flwr-simulation)", f"{res['peak_rss_one_mb']:.0f} MiB"],
        ["most processes at once", res["peak_processes"]],
        [f"user-level epsilon after {len(rows)} rounds (delta {summary.get('user-delta')}, q = {q:g}, "
         f"z = {args.noise_multiplier:g})", fmt(summary.get("user-epsilon"), 2)],
        ["max device (sample-level) epsilon", fmt(last["max-device-epsilon"], 2)],
        ["final server-side KWS accuracy / emotion UAR (held-out speakers)",
         f"{fmt(last.get('server-kws-accuracy'))} / {fmt(last.get('server-emotion-uar'))}"],
        ["bytes sent / received per trained client per round (mean)",
         f"{sum(r['bytes-sent'] for r in rows) / max(1, sum(r['clients-used'] for r in rows)):,.0f} / "
         f"{sum(r['bytes-received'] for r in rows) / max(1, sum(r['clients-used'] for r in rows)):,.0f}"],
    ]))
    rep.add("")
    rep.add(f"Accounting note: {summary.get('user-note', '')}. User-level noise on the mean has std "
            f"z*C/m = {args.noise_multiplier * 2.0 / args.per_round:.3f} per element with m = {args.per_round}, "
            "against a clipped update of norm <= 2 spread over ~10^5 elements, so with so few clients per "
            "round the user-level noise dominates the update and accuracy stays near chance; "
            "bench_federated.py reports the accuracy trade-off on the real corpus.")
    rep.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
