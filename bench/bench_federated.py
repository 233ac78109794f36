"""Federated vs centralized on the real corpus: accuracy, privacy, width tiers, traffic and round time.

One split for every row: ``fedser partition`` shares Speech Commands + RAVDESS + EmoDB
(``--data``, default ../shared/data) by speaker into ``--clients`` devices (groups of a few
speakers) and holds 20 % of the speakers out as ``test.csv``; every figure below is measured
on those held-out speakers (KWS: accuracy over 12 classes; emotion: UAR over the 9 classes).
The held-out speakers do not depend on ``--clients``.

Rows:

1. Accuracy and privacy (federated rows on Flower's Simulation Engine, ``fedser simulate``,
   every device training each round, ``--rounds`` rounds x ``--local-epochs`` local epochs,
   Adam at ``--lr`` on the devices):
   - centralized, no DP: ``fedser train`` (30 epochs, early stopping) on the union of the
     device manifests (15 % of those speakers for validation), then ``fedser evaluate`` on
     ``test.csv``;
   - federated, no DP;
   - federated, sample-level DP only (DP-SGD on each device, budget epsilon 8 / delta 1e-5
     spread over the rounds planned, no user-level noise: ``noise-mode none``, so the
     user-level epsilon is infinite);
   - federated, sample-level DP + user-level noise (update clipping ``--user-clip-norm`` C,
     distributed noise z = ``--user-noise``; user-level epsilon accounted by the server).
   - federated with public pretraining: the utterances of the last ``--public-devices`` devices
     become the server's public corpus (``public-corpus``: the server pretrains the encoder and
     both heads on it, ``--pretrain-epochs``), the other devices federate with DP-SGD on
     part of it (``--public-scope``, run setting ``train-scope``; default ``norms``: the heads and
     the normalisation layers' scale and shift, so DP noise falls on 2,693 weights, not
     the whole network). Fewer private devices than the other rows; the same test speakers.
   Rows without user-level noise clip updates at ``--clip-norm`` (only a bound there).
   Targets: federated + DP keeps >= 90 % of the centralized KWS accuracy and >= 85 % of the
   centralized emotion UAR.
2. Width tiers: devices on 1.0 / 0.5 / 0.25 in turn vs all on 1.0 (both without DP).
   Target: within 3 points.
3. Traffic and time: parameters and bytes of each tier's sub-model (a training round moves
   one slice down and one update of the same size up; an evaluating device also downloads the
   full model), bytes measured per trained client per round in the runs above, and the round
   wall time with 5 real SuperNodes over TLS (``fedser demo --clients 5 --rounds 2``, its
   defaults: DP-SGD, 2 local epochs, tiers 1.0/0.5/0.25) on the speakers of the first 5 devices.

Runs are kept in ``--work`` and reused when complete with the same settings (delete a run
folder to redo it).

    python bench/bench_federated.py [--data DIR] [--clients 20] [--rounds 30] [--dp-rounds R] [--local-epochs 5]
                                    [--lr 0.003] [--user-noise 1.0] [--only central fed tiers dp dp-user dp-public demo]
                                    [--quick]

``--quick``: 2 rounds, 3 centralized epochs (checks the pipeline; figures mean nothing).
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, Report, data_or_skip, load_average, load_note, machine_line, md_table  # noqa: E402
from bench_simulation import bench_env, fedser_argv, fmt, run_simulation  # noqa: E402

CORPORA = ("speech_commands", "ravdess", "emodb")
TIERS = (1.0, 0.5, 0.25)


def sh(argv: list[str], env: dict, log: Path, timeout: float | None = None) -> float:
    """Run ``argv`` with output to ``log``; returns wall seconds; raises with the log's tail on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                            stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} exited {rc}; {log} ends:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def union_manifest(parts: Path, n: int, out: Path, devices: range | None = None) -> Path:
    """One manifest holding the utterances of the given device manifests (all by default)."""
    header, rows = None, []
    for i in devices if devices is not None else range(n):
        with open(parts / f"device-{i}" / "data.csv", newline="") as f:
            r = csv.reader(f)
            header = next(r)
            rows += list(r)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return out


def public_split(parts: Path, n: int, k: int, out: Path) -> tuple[Path, Path]:
    """Devices ``n-k .. n-1`` turned public: their utterances become ``public_<n>_<k>.csv`` (the
    server's public corpus) and the federation keeps devices ``0 .. n-k-1``; the test speakers stay
    held out. Returns (partition folder of the n-k devices, public manifest)."""
    fed = out / f"parts-{n}-public-{k}"
    public = out / f"public_{n}_{k}.csv"
    if not public.exists():
        import shutil
        meta = json.loads((parts / "partitions.json").read_text())
        fed.mkdir(parents=True, exist_ok=True)
        for i in range(n - k):
            shutil.copytree(parts / f"device-{i}", fed / f"device-{i}", dirs_exist_ok=True)
        shutil.copy(parts / "test.csv", fed / "test.csv")
        meta["num-partitions"] = n - k
        meta["devices"] = meta["devices"][: n - k]
        with open(public, "w", newline="") as f:
            w = csv.writer(f)
            header = None
            for i in range(n - k, n):
                with open(parts / f"device-{i}" / "data.csv", newline="") as g:
                    r = csv.DictReader(g)
                    if header is None:
                        header = r.fieldnames
                        w.writerow(header)
                    w.writerows([row[h] for h in header] for row in r)
        (fed / "partitions.json").write_text(json.dumps(meta, indent=1))
    return fed, public


def centralized(task: str, pool: Path, test_csv: Path, work: Path, env: dict, epochs: int) -> dict:
    run = work / f"central-{task}"
    record = run / "bench.json"
    if record.exists() and json.loads(record.read_text()).get("epochs") == epochs:
        return json.loads(record.read_text())
    train_s = sh(fedser_argv() + ["train", "--task", task, "--data", str(pool), "--val", "0.15", "--test", "0",
                                  "--epochs", str(epochs), "--out", str(run), "--quiet"], env, work / f"central-{task}.log")
    t0 = time.perf_counter()
    done = subprocess.run(fedser_argv() + ["evaluate", str(run), "--data", str(test_csv), "--task", task, "--json",
                                           "--quiet"], capture_output=True, text=True, env=env, check=True)
    report = json.loads(done.stdout)
    metrics = json.loads((run / "metrics.json").read_text())
    out = {"epochs": epochs, "train_seconds": train_s, "eval_seconds": time.perf_counter() - t0,
           "accuracy": report["accuracy"], "uar": report["uar"], "n": report["n"],
           "best_epoch": metrics.get("best_epoch"), "epochs_run": len(metrics.get("history", []))}
    record.write_text(json.dumps(out, indent=1))
    return out


def run_demo(parts: Path, clients: int, work: Path, env: dict, wanted: bool) -> dict | None:
    """``fedser demo --clients 5 --rounds 2`` (real SuperLink + 5 SuperNodes over TLS) on the speakers
    of the first 5 devices; None when not wanted and not run before."""
    demo_dir = work / "demo-5"
    record = demo_dir / "bench.json"
    if record.exists():
        return json.loads(record.read_text())
    if not wanted:
        return None
    import shutil
    if demo_dir.exists():
        shutil.rmtree(demo_dir)
    small = union_manifest(parts, clients, work / "demo_small.csv", range(min(5, clients)))
    wall = sh(fedser_argv() + ["demo", "--clients", "5", "--rounds", "2", "--data", str(small),
                               "--out", str(demo_dir), "--quiet"], env, work / "demo-5.log")
    m = json.loads((demo_dir / "metrics.json").read_text())
    demo = {"wall": wall, "rows": m["rounds"], "summary": m["summary"]}
    record.write_text(json.dumps(demo, indent=1, default=float))
    return demo


def tier_sizes() -> list[tuple[float, int, int]]:
    """(tier, parameters, bytes of its ArrayRecord) for the default model."""
    from fedser.common.features import FeatureSpec
    from fedser.common.models import ModelConfig, build_model
    from fedser.common.params import state_to_arrays
    from fedser.common.records import arrays_to_record
    from fedser.common.slicing import slice_state

    cfg = ModelConfig(n_features=FeatureSpec().n_features())
    full = state_to_arrays(build_model(cfg))
    out = []
    for t in TIERS:
        sub = slice_state(full, cfg, t)
        out.append((t, int(sum(v.size for v in sub.values())), arrays_to_record(sub).count_bytes()))
    return out


def last(res: dict, key: str):
    return res["rows"][-1].get(key)


def per_client_bytes(res: dict) -> tuple[float, float]:
    """(upload, download incl. evaluation) bytes per trained client per round, measured."""
    used = max(1, sum(r["clients-used"] for r in res["rows"]))
    return (sum(r["bytes-received"] for r in res["rows"]) / used, sum(r["bytes-sent"] for r in res["rows"]) / used)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus root (default ../shared/data)")
    p.add_argument("--clients", type=int, default=20, help="devices (speaker groups)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--local-epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.003, help="devices' Adam learning rate (centralized: 0.003)")
    p.add_argument("--dp-rounds", type=int, default=None,
                   help="rounds of the two DP rows (default --rounds; DP-SGD rounds cost several times more)")
    p.add_argument("--central-epochs", type=int, default=30)
    p.add_argument("--user-noise", type=float, default=1.0, help="user-level noise multiplier z of the DP row")
    p.add_argument("--user-clip-norm", type=float, default=2.0, help="update clipping bound C of that row")
    p.add_argument("--clip-norm", type=float, default=10.0,
                   help="update clipping bound of the rows without user-level noise (there it only bounds updates)")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--client-cpus", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/tmp/fedser-bench/federated"))
    p.add_argument("--public-devices", type=int, default=5,
                   help="devices whose command utterances become the server's public corpus in the dp-public row")
    p.add_argument("--pretrain-epochs", type=int, default=60, help="server pretraining epochs on that public corpus")
    p.add_argument("--public-scope", default="norms", choices=("heads", "norms", "all"),
                   help="what devices train in the dp-public row (run setting train-scope)")
    p.add_argument("--public-local-epochs", type=int, default=2, help="local epochs of the dp-public row")
    p.add_argument("--public-lr", type=float, default=0.01,
                   help="devices' learning rate in the dp-public row (DP fine-tuning, as `fedser train --dp`)")
    p.add_argument("--public-batch", type=int, default=64,
                   help="devices' batch size in the dp-public row (DP-SGD's noise on the mean gradient is z*C/B)")
    p.add_argument("--only", nargs="+", default=None,
                   choices=("central", "fed", "tiers", "dp", "dp-user", "dp-public", "demo"),
                   help="run only these parts (the table shows what exists)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if not data_or_skip(args.data, *CORPORA):
        return 0
    if args.quick:
        args.rounds, args.central_epochs, args.dp_rounds = 2, 3, None
        args.work = args.work.with_name(args.work.name + "-quick")
    wanted = set(args.only or ("central", "fed", "tiers", "dp", "dp-user", "dp-public", "demo"))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = bench_env(work)
    name = "bench_federated" + ("_quick" if args.quick else "")
    rep = Report(name, "Federated vs centralized: accuracy, privacy, width tiers, traffic, round time")
    load0 = load_average()

    # ---- one split for everything
    from fedser.common.partitions import read_partitions

    parts = work / f"parts-{args.clients}"
    if not (parts / "partitions.json").exists():
        sh(fedser_argv() + ["partition", *sum((["--data", str(args.data / c)] for c in CORPORA), []),
                            "--clients", str(args.clients), "--test", "0.2", "--seed", "0", "--out", str(parts)],
           env, work / "partition.log")
    meta = read_partitions(parts)
    test_csv = parts / "test.csv"
    pool = union_manifest(parts, args.clients, work / "train_pool.csv")

    # ---- centralized baselines
    central = {}
    if "central" in wanted or (work / "central-kws" / "bench.json").exists():
        for task in ("kws", "emotion"):
            central[task] = centralized(task, pool, test_csv, work, env, args.central_epochs)
            print(f"centralized {task}: {central[task]}", file=sys.stderr, flush=True)

    # ---- federated runs on the Simulation Engine
    base = {"fraction-train": 1.0, "fraction-evaluate": 0.1, "min-clients": 2, "local-epochs": args.local_epochs,
            "learning-rate": args.lr, "partition-max-epsilon": 8.0, "clip-norm": args.clip_norm}
    runs_spec = {
        "fed": ("federated, no DP", {**base, "dp": False, "noise-mode": "none", "partition-tiers": "1.0",
                                     "partition-require-dp": False}),
        "tiers": ("federated, no DP, tiers 1.0/0.5/0.25",
                  {**base, "dp": False, "noise-mode": "none", "partition-tiers": "1.0,0.5,0.25",
                   "partition-require-dp": False}),
        "dp": ("federated, sample-level DP (eps 8/device), no user-level noise",
               {**base, "dp": True, "noise-mode": "none", "partition-tiers": "1.0"}),
        "dp-user": (f"federated, sample-level DP + user-level noise z={args.user_noise:g}",
                    {**base, "dp": True, "noise-mode": "distributed", "noise-multiplier": args.user_noise,
                     "clip-norm": args.user_clip_norm, "partition-tiers": "1.0"}),
    }
    k = args.public_devices
    fed_parts, public_csv = public_split(parts, args.clients, k, work)
    runs_spec["dp-public"] = (
        f"federated on {args.clients - k} devices, sample-level DP (eps 8/device), `train-scope {args.public_scope}` "
        f"({args.public_local_epochs} local epoch(s), batch {args.public_batch}, lr {args.public_lr:g}); encoder and "
        f"heads pretrained on "
        f"the speech of {k} other devices' speakers (public, `public-corpus`)",
        {**base, "dp": True, "noise-mode": "none", "partition-tiers": "1.0", "public-corpus": str(public_csv),
         "kws-pretrain-epochs": args.pretrain_epochs, "train-scope": args.public_scope,
         "local-epochs": args.public_local_epochs, "batch-size": args.public_batch, "learning-rate": args.public_lr})
    results, demo = {}, None
    for key, (label, cfg) in runs_spec.items():
        if key == "dp":   # the 5-SuperNode row before the long DP rows
            demo = run_demo(parts, args.clients, work, env, "demo" in wanted)
        run_dir = work / f"run-{key}-{args.clients}"
        if key in wanted or (run_dir / "bench.json").exists():
            t0 = time.perf_counter()
            rounds = args.dp_rounds if key.startswith("dp") and args.dp_rounds else args.rounds
            results[key] = run_simulation(fed_parts if key == "dp-public" else parts, run_dir, rounds, cfg, env,
                                          args.ray_cpus, args.client_cpus)
            print(f"{key}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    if demo is None:
        demo = run_demo(parts, args.clients, work, env, "demo" in wanted)

    load1 = load_average()

    # ---- report
    sizes = sorted(d["utterances"] for d in meta["devices"])
    rep.add(f"{machine_line()}. {load_note(load0, load1)}.")
    rep.add("")
    rep.add(f"Split: {args.clients} devices holding {sum(d['speakers'] for d in meta['devices'])} speakers "
            f"({sizes[0]}-{sizes[-1]} utterances each, median {sizes[len(sizes) // 2]}); test: "
            f"{meta['test-speakers']} held-out speakers, {meta['test-utterances']} utterances "
            f"(Speech Commands + RAVDESS + EmoDB; speakers are corpus-prefixed, `_silence_` slices of each "
            f"noise file count as a speaker). Federated: rounds as the table says x {args.local_epochs} local "
            f"epoch(s), all {args.clients} devices each round, batch 16, Adam lr {args.lr:g}, server-side evaluation "
            f"of the global model on the test speakers after the last round.")
    rep.add("")
    rep.add("### 1. Accuracy and privacy")
    rep.add("")
    table = []
    if central:
        table.append(["centralized, no DP (`fedser train`)", fmt(central["kws"]["accuracy"]),
                      fmt(central["emotion"]["uar"]), "—", "—",
                      f"{central['kws']['train_seconds'] + central['emotion']['train_seconds']:.0f} s "
                      f"(kws {central['kws']['epochs_run']} / emotion {central['emotion']['epochs_run']} epochs)"])
        table[-1].insert(-1, "—")
    for key in ("fed", "dp", "dp-user", "dp-public"):
        if key in results:
            r = results[key]
            user_eps = r["summary"].get("user-epsilon")
            table.append([runs_spec[key][0], fmt(last(r, "server-kws-accuracy")), fmt(last(r, "server-emotion-uar")),
                          fmt(last(r, "max-device-epsilon"), 2) if runs_spec[key][1]["dp"] else "—",
                          fmt(user_eps, 2) if runs_spec[key][1]["noise-mode"] != "none" else "inf (no noise)",
                          r["rounds"], f"{r['wall']:.0f} s"])
    rep.add(md_table(["run", "KWS accuracy", "emotion UAR", "max device eps (sample-level)",
                      "user-level eps (delta 1e-5)", "rounds", "wall time"], table))
    rep.add("")
    if central:
        for key in ("dp", "dp-user", "dp-public", "fed"):
            if key in results:
                kws = last(results[key], "server-kws-accuracy") / central["kws"]["accuracy"]
                emo = last(results[key], "server-emotion-uar") / central["emotion"]["uar"]
                rep.add(f"- {runs_spec[key][0]}: KWS {kws:.0%} of centralized (target >= 90 %: "
                        f"{'met' if kws >= 0.9 else 'NOT met'}), emotion UAR {emo:.0%} of centralized "
                        f"(target >= 85 %: {'met' if emo >= 0.85 else 'NOT met'})")
        rep.add("")
    if "dp-public" in results:
        r = results["dp-public"]
        first = r["rows"][0]
        rep.add(f"Public pretraining row, after round 1 (the pretrained model plus one round of DP fine-tuning): "
                f"KWS {fmt(first.get('server-kws-accuracy'))}, emotion UAR {fmt(first.get('server-emotion-uar'))}; "
                f"after round {len(r['rows'])}: KWS {fmt(last(r, 'server-kws-accuracy'))}, emotion UAR "
                f"{fmt(last(r, 'server-emotion-uar'))}.")
        rep.add("")
    if "dp-user" in results:
        m = args.clients
        rep.add(f"User-level noise: each round's mean update carries noise of std z*C/m = "
                f"{args.user_noise:g}*{args.user_clip_norm:g}/{m} = {args.user_noise * args.user_clip_norm / m:.3f} "
                f"per element (C = {args.user_clip_norm:g}, m = {m} devices), "
                f"while a clipped update has norm <= C over ~6.7*10^4 elements; {results['dp-user']['summary'].get('user-note', '')}.")
        rep.add("")
    rep.add("### 2. Width tiers (no DP)")
    rep.add("")
    if "fed" in results and "tiers" in results:
        a, b = results["fed"], results["tiers"]
        dk = (last(b, "server-kws-accuracy") - last(a, "server-kws-accuracy")) * 100
        de = (last(b, "server-emotion-uar") - last(a, "server-emotion-uar")) * 100
        rep.add(md_table(["devices", "KWS accuracy", "emotion UAR", "wall time"], [
            ["all 1.0", fmt(last(a, "server-kws-accuracy")), fmt(last(a, "server-emotion-uar")), f"{a['wall']:.0f} s"],
            ["1.0 / 0.5 / 0.25 in turn", fmt(last(b, "server-kws-accuracy")), fmt(last(b, "server-emotion-uar")),
             f"{b['wall']:.0f} s"]]))
        rep.add("")
        rep.add(f"Difference (tiers - all 1.0): KWS {dk:+.1f} points, emotion UAR {de:+.1f} points "
                f"(target: within 3 points: {'met' if abs(dk) <= 3 and abs(de) <= 3 else 'NOT met'}).")
    else:
        rep.add("(not run)")
    rep.add("")
    rep.add("### 3. Traffic and round time")
    rep.add("")
    rep.add(md_table(["tier", "parameters", "bytes per slice (ArrayRecord)",
                      "train round traffic per device (down + up)"],
                     [[t, f"{n:,}", f"{b:,}", f"{2 * b:,}"] for t, n, b in tier_sizes()]))
    rep.add("")
    rows = []
    for key, res in results.items():
        up, down = per_client_bytes(res)
        secs = [r["seconds"] for r in res["rows"]]
        rows.append([runs_spec[key][0], f"{up:,.0f}", f"{down:,.0f}", f"{secs[0]:.1f}",
                     f"{sorted(secs)[len(secs) // 2]:.1f}", f"{res['peak_pss_mb']:.0f}"])
    if demo:
        used = max(1, sum(r["clients-used"] for r in demo["rows"]))
        secs = [r["seconds"] for r in demo["rows"]]
        rows.append(["5 real SuperNodes over TLS (`fedser demo --clients 5 --rounds 2`, tiers 1.0/0.5/0.25, DP)",
                     f"{sum(r['bytes-received'] for r in demo['rows']) / used:,.0f}",
                     f"{sum(r['bytes-sent'] for r in demo['rows']) / used:,.0f}", f"{secs[0]:.1f}",
                     f"{sorted(secs)[len(secs) // 2]:.1f}", "—"])
    rep.add(md_table(["run", "bytes up per trained client per round", "bytes down per trained client per round "
                      "(incl. evaluation broadcasts)", "round 1 s", "median round s", "peak memory MiB (PSS)"], rows))
    if demo:
        rep.add("")
        rep.add(f"The demo row: {demo['wall']:.0f} s for the whole command (TLS certificates, SuperLink, 5 "
                f"SuperNodes, 2 rounds, report); its devices hold the speakers of the first 5 of the "
                f"{args.clients} devices above, re-partitioned into 5.")
    rep.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
