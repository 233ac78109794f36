"""Launch the fedser ServerApp and ClientApp on Flower's Simulation Engine (Ray).

``fedser simulate`` calls :func:`run` (so does ``python -m fedser.server.simulation``). Nothing here is a second
implementation of a round: the run is the one ``fedser-server start`` submits, on a
SuperLink started in simulation mode, where each ClientApp call is made in a Ray actor
for a virtual SuperNode instead of on a device::

    fedser-superlink --simulation --insecure (127.0.0.1, a free port; RUN_DIR/superlink.db)
      └─ flower-superexec ─ flwr-simulation (per run): ServerApp + Ray backend
    flwr run RUN_DIR/.app fedser-sim --run-config ... --federation-config num-supernodes=N ...

Virtual node ``partition-id`` i reads ``<partitions>/device-<i>/data.csv`` (see
``fedser.client.device``); ``<partitions>/test.csv`` becomes the server's ``eval-data``.
Ray gets ``--ray-cpus`` CPUs and each virtual client ``--client-cpus``, so at most
ray-cpus / client-cpus clients train at once and the rest wait their turn.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedser.common import flower_args, processes
from . import flower_cli
from fedser.common.errors import ConfigError, FedserError
from fedser.common.partitions import TEST_MANIFEST, read_partitions

from .cli import _typed, follow_run
from .flower_app import run_config_defaults, write_app_dir
from .settings import CORPUS_SETTINGS, RunSettings

CONNECTION = "fedser-sim"


def add_arguments(p) -> None:
    p.add_argument("--partitions", required=True, metavar="DIR", help="a folder written by `fedser partition`")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="checkpoints, metrics, plots and the model go here")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="any run setting, e.g. fraction-train=0.1, noise-mode=none, partition-tiers=1.0,0.5,0.25; "
                        "repeatable")
    p.add_argument("--ray-cpus", type=int, default=2, help="CPUs Ray may use (default 2)")
    p.add_argument("--client-cpus", type=int, default=1,
                   help="CPUs per virtual client (default 1): ray-cpus / client-cpus clients run at once")
    p.add_argument("--resume", action="store_true", help="continue after the last complete round in RUN_DIR")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="give up after this many seconds")
    p.add_argument("--quiet", action="store_true", help="no per-round progress lines")


def build_run_config(partitions: Path, run_dir: Path, rounds: int, overrides: list[str], resume: bool,
                     n_partitions: int) -> dict[str, object]:
    """The run config of a simulated run, validated as the ServerApp will read it."""
    defaults = run_config_defaults()
    cfg: dict[str, object] = {"run-dir": str(run_dir), "num-server-rounds": rounds,
                              "partitions-dir": str(partitions),
                              "min-clients": min(int(defaults["min-clients"]), n_partitions)}
    if (partitions / TEST_MANIFEST).is_file():
        cfg["eval-data"] = str(partitions / TEST_MANIFEST)
    if resume:
        cfg["resume"] = True
    for kv in overrides:
        if "=" not in kv:
            raise ConfigError(f"--config {kv!r}: expected KEY=VALUE")
        k, v = (s.strip() for s in kv.split("=", 1))
        if k in ("run-dir", "partitions-dir", "num-server-rounds"):
            raise ConfigError(f"--config {k}: set it with --out, --partitions or --rounds")
        cfg[k] = _typed(k, v, defaults)
    for key in CORPUS_SETTINGS:
        if cfg.get(key):
            path = Path(str(cfg[key])).resolve()
            if not path.exists():
                raise ConfigError(f"--config {key}={cfg[key]}: no such file or folder")
            cfg[key] = str(path)
    RunSettings.from_run_config(cfg)   # fail here, not in a Ray process minutes later
    return cfg


def federation_config(n_nodes: int, ray_cpus: int, client_cpus: int) -> dict[str, object]:
    """``flwr run --federation-config`` for the Ray backend (Flower's SimulationConfig fields)."""
    if ray_cpus < 1 or client_cpus < 1:
        raise ConfigError("--ray-cpus and --client-cpus must be >= 1")
    if client_cpus > ray_cpus:
        raise ConfigError(f"--client-cpus {client_cpus} > --ray-cpus {ray_cpus}: no client could ever run")
    return {"num-supernodes": n_nodes, "backend": "ray", "client-resources-num-cpus": client_cpus,
            "client-resources-num-gpus": 0.0, "init-args-num-cpus": ray_cpus, "init-args-num-gpus": 0,
            "init-args-logging-level": "WARNING", "init-args-log-to-driver": True}


def _submit(app_dir: Path, run_config: dict, fed_config: dict, env: dict) -> int:
    argv = flower_cli.run_command(app_dir, CONNECTION, run_config) + ["--federation-config",
                                                                 flower_args.format_config(fed_config)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    text = done.stdout
    try:
        answer = json.loads(text[text.find("{"):]) if "{" in text else {}
    except json.JSONDecodeError:
        answer = {}
    if not answer.get("success") or not answer.get("run-id"):
        raise FedserError(f"flwr run was refused (exit {done.returncode}): "
                          f"{answer.get('error-message') or (done.stderr or done.stdout).strip()[-2000:]}")
    return int(answer["run-id"])


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children first); [] where there is no /proc.

    SuperExec, flwr-simulation and Ray's processes run in sessions of their own, so stopping
    the SuperLink's process group does not reach them.
    """
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def _stop_pids(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM ``pids`` still alive, SIGKILL them after ``grace`` seconds."""
    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for p in pids if alive(p)]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)


def _wait(run_id: int, env: dict, progress: Path, seen: int, args) -> flower_cli.RunStatus:
    """Follow the run to its end (``follow_run``: the progress log, and the SuperLink seldom)."""
    try:
        return follow_run(run_id, progress, seen, env=env, timeout=args.timeout, connection=CONNECTION,
                          echo=not args.quiet)
    except TimeoutError:
        raise FedserError(f"simulation run {run_id} still going after {args.timeout:.0f} s; stopped") from None


def simulate(args) -> int:
    partitions = Path(args.partitions).resolve()
    run_dir = Path(args.out).resolve()
    meta = read_partitions(partitions)
    n = int(meta["num-partitions"])
    if args.rounds < 1:
        raise ConfigError("--rounds must be >= 1")
    if not args.resume and (run_dir / "checkpoint.pt").exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or another --out")
    run_config = build_run_config(partitions, run_dir, args.rounds, args.config, args.resume, n)
    fed = federation_config(n, args.ray_cpus, args.client_cpus)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = processes.flower_env(run_dir / ".flwr")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    port = processes.free_port()
    argv = [processes.executable("fedser-superlink"), "--simulation", "--insecure", "--host", "127.0.0.1",
            "--port", str(port), "--disable-runtime-dependency-installation",
            "--database", str(run_dir / "superlink.db")]
    t0 = time.perf_counter()
    link = processes.start_process(argv, run_dir / "logs" / "superlink.log", env=env)
    run_id = None
    try:
        processes.wait_for_port("127.0.0.1", port, timeout=90, process=link)
        flower_cli.write_connection(run_dir / ".flwr", flower_cli.SuperLinkConnection(f"127.0.0.1:{port}", insecure=True,
                                                                             name=CONNECTION))
        app_dir = write_app_dir(run_dir / ".app")
        progress = run_dir / "progress.log"
        seen = len(progress.read_text().splitlines()) if progress.exists() else 0
        run_id = _submit(app_dir, run_config, fed, env)
        print(f"simulation run {run_id}: {n} virtual clients from {partitions}; Ray with {args.ray_cpus} CPU(s), "
              f"{args.client_cpus} per client; {args.rounds} round(s); run directory {run_dir}", flush=True)

        status = _wait(run_id, env, progress, seen, args)
        logs = flower_cli.run_logs(run_id, CONNECTION, env=env)
        (run_dir / "logs").mkdir(exist_ok=True)
        (run_dir / "logs" / f"simulation-run-{run_id}.log").write_text(logs)
        if not status.succeeded:
            print(f"simulation run {run_id} {status.sub_status or status.status}: {status.details}", file=sys.stderr)
            print(logs[-4000:], file=sys.stderr)
            return 1
    except BaseException:
        # The run goes on in flwr-simulation and Ray (sessions of their own) unless it is stopped;
        # a second Ctrl-C must not cut that short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if run_id is not None:
            try:
                flower_cli.stop_run(run_id, CONNECTION, env=env, timeout=20)
            except (flower_cli.FlowerCommandError, OSError):
                pass
        raise
    finally:
        left = descendants(link.pid)
        processes.stop_process(link)
        _stop_pids(left)
    summary = json.loads((run_dir / "metrics.json").read_text())["summary"]
    print(f"simulation complete in {time.perf_counter() - t0:.0f} s: {summary.get('rounds')} rounds; user-level "
          f"epsilon {summary.get('user-epsilon')} (delta {summary.get('user-delta')}); model bundle in {run_dir}; "
          f"per-round figures in {run_dir / 'metrics.csv'}")
    return 0


def run(args) -> int:
    """``simulate(args)`` with SIGTERM turned into an orderly exit: the run, Ray and the SuperLink
    are stopped on the way out."""
    def terminate(signum, _frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return simulate(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedser simulate", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except FedserError as exc:
        print(f"fedser simulate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedser simulate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
