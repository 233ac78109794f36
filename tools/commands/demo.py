"""``fedser demo``: a whole federation on this machine, in one command.

Partitions the data by speaker into N devices (default: the synthesized demo corpus),
holds out a speaker-independent test split for the server, then starts the real parts
as separate processes: ``fedser-server start`` (a SuperLink over TLS plus the ServerApp
run) and one ``fedser-client start`` (a SuperNode) per device. Shows live progress and
ends with a report.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

from fedser.common import keys
from fedser.common import processes
from fedser.client import supernode
from fedser.common.certs import generate_ca_and_server_cert, generate_node_keypair
from fedser.common.errors import ConfigError, FedserError
from .args import default_cache_dir, load_data
from .partition import Partition, check_public_share, partition_corpus

HELP = "run a whole federation (server + N devices over TLS gRPC) on this machine and report"
# CPU seconds to start one fedser ClientApp process (Python, Flower, torch, the app), measured on
# the 2-core development machine: 3.5-4 s.
CLIENTAPP_LAUNCH_CPU_S = 4.0


def add_arguments(p) -> None:
    p.add_argument("--data", action="append", default=None, metavar="PATH",
                   help="corpus folder or manifest (default: synthesize the demo corpus)")
    p.add_argument("--clients", type=int, default=4, help="number of devices (speakers are split among them)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="runs/demo", metavar="RUN_DIR")
    p.add_argument("--tiers", default="1.0,0.5,0.25", help="width tiers, assigned to devices in turn")
    p.add_argument("--no-dp", action="store_true", help="no sample-level DP-SGD and no user-level noise")
    p.add_argument("--user-noise", type=float, default=0.0, metavar="Z",
                   help="user-level noise multiplier (distributed noise, under secure aggregation, so the server "
                        "sees only each round's sum). Off by default here: with a handful of devices the noise "
                        "a meaningful user-level epsilon needs swamps the model; it is meant for large cohorts")
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--max-epsilon", type=float, default=8.0, help="each device's sample-level budget")
    p.add_argument("--test", type=float, default=0.2, help="share of speakers held out for the server's test")
    p.add_argument("--public", type=float, default=0.2, metavar="SHARE",
                   help="share of speakers set apart as public speech: the server pretrains on it and the "
                        "devices fine-tune under DP (0: no public speech, devices train from scratch)")
    p.add_argument("--train-scope", default=None, choices=keys.TRAIN_SCOPES,
                   help="what devices train (default: all of the small model over the frozen public encoders; "
                        "norms or heads fine-tune part of a from-scratch encoder pretrained on public speech)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads per device (default: this machine's cores shared among the devices)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="extra run setting passed to fedser-server (e.g. noise-mode=local)")
    p.add_argument("--audit", action="store_true",
                   help="after the run, run `fedser audit` on it (attacks with the demo's speakers) and link "
                        "its report from the run report")
    p.add_argument("--quiet", action="store_true")


def prepare_devices(data: list[str], out: Path, n_clients: int, test: float, seed: int,
                    public: float = 0.0) -> Partition:
    """Partition by speaker (``fedser partition``) into ``out/devices``: the device manifests, the
    server's test manifest and public speech (each None when no speaker went there)."""
    return partition_corpus(load_data(data), out / "devices", n_clients, test=test, seed=seed, sources=data,
                            public=public)


def _wait_for_submission(server: processes.LoggedProcess, timeout: float = 120.0) -> None:
    """Wait until the server has registered the device keys and submitted the run (its log says
    so), so that no device knocks before its key is known."""
    deadline = time.monotonic() + timeout
    while "submitted" not in server.log_path.read_text(errors="replace"):
        if server.poll() is not None:
            raise FedserError(f"the server failed (exit {server.returncode}); its log:\n{server.log_tail(40)}")
        if time.monotonic() > deadline:
            raise FedserError(f"the server did not submit the run within {timeout:.0f} s; its log:\n"
                              f"{server.log_tail(40)}")
        time.sleep(0.2)


def _tail(path: Path, seen: int, quiet: bool) -> int:
    if not path.exists():
        return seen
    lines = path.read_text().splitlines()
    if not quiet:
        for line in lines[seen:]:
            print(f"  {line}", flush=True)
    return len(lines)


def _pretraining_rows(settings: dict) -> list[str]:
    """Report rows on public pretraining, from the run's settings (none when it had none)."""
    public = [p for p in (settings.get("public_corpus"), settings.get("kws_corpus")) if p]
    if not public:
        return []
    return [f"| server pretraining on public speech | {', '.join(public)} |",
            f"| what devices trained (train-scope) | {settings.get('train_scope', 'all')} |"]


def _guarantees(settings: dict, user_eps, max_device_eps: float, delta) -> list[str]:
    """Which guarantee this run gives, per thing protected, in plain words (the report's privacy lines)."""
    dp = bool(settings.get("dp", True))
    mode = settings.get("noise_mode", "none")
    sample = (f"DP-SGD on every device: each utterance is protected with epsilon <= {max_device_eps:.2f} against "
              "anyone who sees an update or a model: the server operator, other devices, whoever uses the final "
              "model" if dp and math.isfinite(max_device_eps) and max_device_eps > 0
              else "no DP-SGD on the devices: single utterances are not protected")
    finite_user = isinstance(user_eps, (int, float)) and math.isfinite(user_eps)
    if finite_user:
        user = (f"user-level noise: each person (all of a device's utterances) is protected with epsilon "
                f"{user_eps:.2f} (delta {delta}) in the global models")
    else:
        user = ("no user-level guarantee: a person's voice, gender and mood as a whole are protected only "
                "through their utterances (user-level epsilon is infinite"
                + (": this run adds no user-level noise; with a handful of devices the noise a finite epsilon "
                   "needs swamps the model, it is meant for large cohorts)" if mode == "none" else ")"))
    if settings.get("secure_aggregation"):
        share = float(settings.get("secure_aggregation_threshold", 0.6))
        secure = ("secure aggregation: the server sees only the sum of each round's updates, never one of them "
                  f"(a server that colludes with fewer than {share:.0%} of a round's devices learns nothing more)")
        if finite_user and mode == "distributed":
            secure += ", and that sum carries the whole user-level noise, so the figure above holds against the " \
                      "server operator too"
        return ["", "What this run guarantees:", "", f"- {sample};", f"- {user};", f"- {secure}."]
    secure = "the server sees each device's update (no secure aggregation): "
    if finite_user and mode == "distributed":
        secure += ("the distributed noise on one update is sqrt(m) times smaller than on their sum, so against the "
                   "server operator the user-level figure is weaker than printed")
    elif finite_user and mode == "local":
        secure += "each update carries the full user-level noise (local mode), so the server reads it under that noise"
    else:
        secure += "what protects a device from the server operator is the DP above"
    return ["", "What this run guarantees:", "", f"- {sample};", f"- {user};", f"- {secure}."]


def _trend(curve: list[float]) -> str:
    """How held-out accuracy moved over the rounds, in words."""
    if len(curve) < 2:
        return "measured once"
    steps = [b - a for a, b in zip(curve, curve[1:])]
    if all(d > 0 for d in steps):
        return f"rose every round ({curve[0]:.3f} to {curve[-1]:.3f})"
    if curve[-1] > curve[0]:
        return f"rose from {curve[0]:.3f} to {curve[-1]:.3f}, not every round"
    return f"did not rise ({curve[0]:.3f} to {curve[-1]:.3f})"


def report(out: Path, audit: Path | None = None) -> str:
    metrics = json.loads((out / "metrics.json").read_text())
    settings_path = out / "run_settings.json"
    settings = json.loads(settings_path.read_text()) if settings_path.exists() else {}
    rows, summary = metrics["rounds"], metrics["summary"]
    last = rows[-1] if rows else {}
    # The server's own evaluation on held-out speakers when the run had one (--eval-data); else the
    # devices' evaluation of the global model on utterances they held out of their training.
    server_side = any(key.startswith("server-") and key.endswith("-accuracy") for key in last)
    prefix = "server-" if server_side else ""
    where = ("global model evaluated on held-out speakers (server-side)" if server_side else
             "global model evaluated by the devices on utterances they held out (federated evaluation; "
             "no server-side test set)")
    lines = ["# fedser demo report", "", f"{len(rows)} rounds; {where}.", "",
             "| task | accuracy | UAR | accuracy by round |", "|---|---:|---:|---|"]
    trends = []
    for task in ("kws", "emotion"):
        if last.get(f"{prefix}{task}-accuracy") is not None:
            curve = [r[f"{prefix}{task}-accuracy"] for r in rows if r.get(f"{prefix}{task}-accuracy") is not None]
            lines.append(f"| {task} | {last[f'{prefix}{task}-accuracy']:.3f} | {last[f'{prefix}{task}-uar']:.3f} | "
                         f"{' -> '.join(f'{a:.3f}' for a in curve)} |")
            trends.append(f"{task} {_trend(curve)}")
    if trends:
        lines += ["", f"Held-out accuracy over the rounds: {'; '.join(trends)}."]
    eps = summary.get("user-epsilon")
    max_dev = max((r.get("max-device-epsilon") or 0.0 for r in rows), default=0.0)
    sent = sum(r.get("bytes-sent") or 0 for r in rows)
    recv = sum(r.get("bytes-received") or 0 for r in rows)
    secs = [r["seconds"] for r in rows if r.get("seconds") is not None]
    lines += ["", "| figure | value |", "|---|---|",
              f"| user-level epsilon (delta {summary.get('user-delta')}) | {eps} |",
              f"| max device (sample-level) epsilon | {max_dev:.3f} |",
              f"| bytes sent / received | {sent:,} / {recv:,} |",
              f"| time per round (mean) | {sum(secs) / max(len(secs), 1):.1f} s |",
              f"| updates rejected | {summary.get('rejections', 0)} |",
              *_pretraining_rows(settings),
              *_guarantees(settings, eps, max_dev, summary.get("user-delta")),
              "", f"{summary.get('user-note', '')}", "",
              "Plots: accuracy.png, privacy_and_traffic.png. Per-round figures: metrics.csv / metrics.json.",
              "Evaluate the final model on any corpus: `fedser evaluate RUN_DIR --data PATH --task kws --json`."]
    if audit is not None:
        link = audit.relative_to(out) if audit.is_relative_to(out) else audit
        lines += ["", f"Privacy audit (attacks on updates and on the final model, DP checks): [{link}]({link})"]
    return "\n".join(lines)


def run_demo_audit(out: Path, data: list[str], seed: int, quiet: bool) -> Path:
    """``fedser audit`` on the finished demo run, with the demo's own speakers; returns the report path."""
    from fedser.tools.audit.runner import AuditOptions, run_audit
    from fedser.common.cache import FeatureCache

    opts = AuditOptions(updates_per_speaker=2, reference_models=2, seed=seed,
                        cache=FeatureCache(default_cache_dir() / "features"), progress=not quiet)
    return run_audit(out, data, out / "audit", opts, log=(lambda s: None) if quiet else print).report


def run(args) -> int:
    from fedser.tools import synth

    out = Path(args.out).resolve()
    try:
        tiers = keys.parse_tiers(args.tiers)
    except ConfigError as exc:
        raise ConfigError(f"--tiers {exc}") from None
    if args.clients < 1 or args.rounds < 1:
        raise ConfigError("--clients and --rounds must be >= 1")
    check_public_share(args.public, args.test)   # before the corpus is synthesized
    if args.train_scope not in (None, "all") and not args.public > 0:
        raise ConfigError(f"--train-scope {args.train_scope} needs public speech to pretrain on (--public SHARE)")
    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads}: expected a positive count (or 0 for the default)")
    if args.no_dp and args.user_noise > 0:
        raise ConfigError("--no-dp and --user-noise contradict each other")
    if out.exists() and (out / "checkpoint.pt").exists():
        raise ConfigError(f"{out} already holds a run; pass another --out (or delete it)")
    data = args.data
    if not data:
        corpus_dir = out.parent / "demo-corpus"
        if not synth.is_complete(corpus_dir):
            print(f"synthesizing the demo corpus into {corpus_dir} ...", flush=True)
            synth.synthesize_corpus(corpus_dir, seed=args.seed, progress=not args.quiet, overwrite=True)
        data = [str(corpus_dir / "commands"), str(corpus_dir / "emotion")]
    out.mkdir(parents=True, exist_ok=True)
    split = prepare_devices(data, out, args.clients, args.test, args.seed, args.public)
    devices, test_csv, parts, test_u, public_csv = split.devices, split.test, split.parts, split.test_utterances, \
        split.public
    # Devices train all of the small model over the frozen encoders; --train-scope narrows it.
    scope = args.train_scope or "all"
    print(f"{args.clients} devices ({', '.join(str(len({u.speaker for u in p})) + ' speakers' for p in parts)}); "
          f"server test split: {len(test_u)} utterances of {len({u.speaker for u in test_u})} held-out speakers"
          + (f"; public speech for the server's pretraining: {public_csv}" if public_csv else ""), flush=True)
    certs = generate_ca_and_server_cert(out / "certs")
    # SuperNode authentication, as in a deployment: each device has a key pair, the server registers
    # the public keys, and only those devices may connect.
    device_keys = [generate_node_keypair(out / "keys", f"device-{i}") for i in range(len(devices))]
    port, control_port = processes.free_port(), processes.free_port()
    cache = default_cache_dir() / "features"
    server_argv = [processes.executable("fedser-server"), "start", "--run-dir", str(out), "--host", "127.0.0.1",
                   "--port", str(port), "--control-port", str(control_port), "--certs", str(out / "certs"),
                   *[arg for _, public in device_keys for arg in ("--register", str(public))],
                   "--min-clients", str(args.clients),
                   "--rounds", str(args.rounds), "--config", f"local-epochs={args.local_epochs}"]
    if test_csv is not None:
        # The server scores every round on the held-out speakers; the devices score the final model
        # only, which spares each earlier round a ClientApp start per device.
        server_argv += ["--eval-data", str(test_csv), "--config", "evaluate-every=0"]
    if public_csv is not None:
        server_argv += ["--public-corpus", str(public_csv)]
    server_argv += ["--config", f"train-scope={scope}", "--config", f"feature-cache={cache}"]
    if args.no_dp:
        server_argv += ["--config", "dp=false", "--config", "noise-mode=none"]
    elif args.user_noise > 0:
        server_argv += ["--config", "noise-mode=distributed", "--config", f"noise-multiplier={args.user_noise}",
                        "--config", "secure-aggregation=true"]
    else:
        server_argv += ["--config", "noise-mode=none"]
    for kv in args.config:
        server_argv += ["--config", kv]
    # The devices train at the same time on this one machine: each gets its share of the cores,
    # so torch's thread pools do not fight over them.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or max(1, cores // args.clients)
    # Every device starts a ClientApp process (torch and all) for each message, all on these cores.
    poll = supernode.task_poll_interval(args.clients, cores, CLIENTAPP_LAUNCH_CPU_S)
    procs: list[subprocess.Popen] = []
    t0 = time.perf_counter()
    processes.interrupt_on_sigterm()  # so that `finally` stops the server and devices (own sessions)
    try:
        server = processes.start_process(server_argv, out / "logs" / "server.out")
        procs.append(server)
        processes.wait_for_port("127.0.0.1", port, timeout=90, process=server)
        _wait_for_submission(server)
        for i, manifest in enumerate(devices):
            tier = tiers[i % len(tiers)]
            argv = [processes.executable("fedser-client"), "start", "--server", f"127.0.0.1:{port}",
                    "--data", str(manifest), "--tier", str(tier), "--max-epsilon", str(args.max_epsilon),
                    "--root-cert", str(certs.ca_cert), "--auth-key", str(device_keys[i][0]),
                    "--ledger", str(manifest.parent / "ledger.json"),
                    "--cache", str(cache), "--port", str(processes.free_port()), "--threads", str(threads),
                    *(["--allow-no-dp"] if args.no_dp else []),
                    *(["--task-poll", str(poll)] if poll else []),
                    "--log", str(out / "logs" / f"device-{i}.log")]
            procs.append(processes.start_process(argv, out / "logs" / f"device-{i}.out"))
            time.sleep(supernode.start_spacing(len(devices), poll))
        print(f"SuperLink: Fleet API (gRPC, TLS) on 127.0.0.1:{port}, {len(devices)} SuperNodes"
              + (f" (each looks for instructions every {poll:.0f} s, sharing {cores} cores)" if poll else "")
              + "; tiers "
              f"{[tiers[i % len(tiers)] for i in range(len(devices))]}; DP {'off' if args.no_dp else 'on'}",
              flush=True)
        seen = 0
        while server.poll() is None:
            seen = _tail(out / "progress.log", seen, args.quiet)
            time.sleep(1.0)
        _tail(out / "progress.log", seen, args.quiet)
        if server.returncode != 0:
            raise FedserError(f"the server failed (exit {server.returncode}); its log:\n{server.log_tail(40)}")
    finally:
        processes.ignore_interrupts()   # a second Ctrl-C must not cut the stopping short
        processes.stop_processes(list(reversed(procs)))
    audit = None
    if args.audit:
        print("running the privacy audit ...", flush=True)
        audit = run_demo_audit(out, list(data), args.seed, args.quiet)
    text = report(out, audit)
    (out / "report.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; run directory {out}")
    return 0
