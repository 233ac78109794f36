"""``fedser-server``: run the aggregation server (a SuperLink plus the fedser ServerApp run).

    fedser-server start --run-dir DIR [--rounds R] [--min-clients K] [--kws-corpus PATH]
                        [--eval-data PATH] [--insecure] [--resume] [--supernode-auth --register KEY.pub ...]

TLS is on unless ``--insecure``: a CA and server certificate are generated into
``--certs`` (default ``RUN_DIR/certs``) when missing; devices need ``ca.pem`` from there.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedser.common import launch
from fedser.common.certs import CertPaths, generate_ca_and_server_cert
from fedser.common.errors import ConfigError, FedserError

from .checkpoint import CHECKPOINT_FILE
from .flower_app import run_config_defaults, write_app_dir


def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedser-server", description="fedser aggregation server")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("start", help="start the SuperLink and run the federation")
    s.add_argument("--run-dir", required=True, help="checkpoints, metrics, plots and the final model go here")
    s.add_argument("--rounds", type=int, default=None, help="number of rounds (default 3)")
    s.add_argument("--min-clients", type=int, default=None, help="devices needed before a round starts (default 2)")
    s.add_argument("--kws-corpus", default=None, help="public command corpus to pretrain the KWS head on")
    s.add_argument("--eval-data", default=None, help="corpus for server-side evaluation each round")
    s.add_argument("--resume", action="store_true", help="continue after the last complete round in RUN_DIR")
    s.add_argument("--insecure", action="store_true", help="plain-text gRPC (development only)")
    s.add_argument("--host", default="0.0.0.0", help="address to listen on (default all interfaces)")
    s.add_argument("--port", type=int, default=launch.SUPERLINK_PORT)
    s.add_argument("--hostname", action="append", default=[], help="extra DNS name/IP for the certificate")
    s.add_argument("--certs", default=None, help="certificate folder (default RUN_DIR/certs)")
    s.add_argument("--supernode-auth", action="store_true", help="only registered device keys may connect")
    s.add_argument("--register", action="append", default=[], metavar="KEY.pub",
                   help="device public key to register (with --supernode-auth); repeatable")
    s.add_argument("--config", action="append", default=[], type=_kv, metavar="KEY=VALUE",
                   help="any other run setting, e.g. --config noise-mode=local; repeatable")
    s.add_argument("--timeout", type=float, default=24 * 3600, help="give up after this many seconds")
    return p


def _typed(key: str, raw: str, defaults: dict) -> object:
    if key not in defaults:
        raise ConfigError(f"--config {key}: unknown run setting (known: {', '.join(sorted(defaults))})")
    d = defaults[key]
    try:
        if isinstance(d, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if isinstance(d, int):
            return int(raw)
        if isinstance(d, float):
            return float(raw)
    except ValueError:
        raise ConfigError(f"--config {key}={raw}: expected a {type(d).__name__}") from None
    return raw


def run_config_from_args(args) -> dict:
    defaults = run_config_defaults()
    cfg: dict[str, object] = {"run-dir": str(Path(args.run_dir).resolve())}
    for key, val in (("num-server-rounds", args.rounds), ("min-clients", args.min_clients),
                     ("kws-corpus", args.kws_corpus), ("eval-data", args.eval_data)):
        if val is not None:
            cfg[key] = str(Path(val).resolve()) if key in ("kws-corpus", "eval-data") else val
    if args.resume:
        cfg["resume"] = True
    for k, v in args.config:
        cfg[k] = _typed(k, v, defaults)
    for key in ("kws-corpus", "eval-data"):
        if cfg.get(key) and not Path(str(cfg[key])).exists():
            raise ConfigError(f"--{key} {cfg[key]}: no such file or folder")
    return cfg


def _print_progress(path: Path, seen: int) -> int:
    if not path.exists():
        return seen
    lines = path.read_text().splitlines()
    for line in lines[seen:]:
        print(f"[server] {line}", flush=True)
    return len(lines)


def start(args) -> int:
    run_dir = Path(args.run_dir).resolve()
    if not args.resume and (run_dir / CHECKPOINT_FILE).exists():
        raise ConfigError(f"{run_dir} already holds a run: pass --resume to continue it, or another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    run_config = run_config_from_args(args)
    if args.register and not args.supernode_auth:
        raise ConfigError("--register needs --supernode-auth")
    certs: CertPaths | None = None
    if not args.insecure:
        cert_dir = Path(args.certs) if args.certs else run_dir / "certs"
        if (cert_dir / "server.pem").exists() and (cert_dir / "ca.pem").exists():
            certs = CertPaths(ca_cert=cert_dir / "ca.pem", ca_key=cert_dir / "ca.key",
                              server_cert=cert_dir / "server.pem", server_key=cert_dir / "server.key")
        else:
            certs = generate_ca_and_server_cert(cert_dir, hosts=args.hostname)
            print(f"generated a CA and server certificate in {cert_dir}; give devices {certs.ca_cert}")
    flwr_home = run_dir / ".flwr"
    env = launch.flower_env(flwr_home)
    launch.interrupt_on_sigterm()  # so that `finally` stops the SuperLink, which has its own session
    link = launch.start_process(
        launch.superlink_command(host=args.host, port=args.port, certs=certs, insecure=args.insecure,
                                 enable_supernode_auth=args.supernode_auth, database=run_dir / "superlink.db"),
        run_dir / "logs" / "superlink.log", env=env)
    try:
        launch.wait_for_port("127.0.0.1", args.port, timeout=60, process=link)
        conn = launch.SuperLinkConnection(f"127.0.0.1:{args.port}", root_cert=str(certs.ca_cert) if certs else None,
                                          insecure=args.insecure)
        launch.write_connection(flwr_home, conn)
        for key in args.register:
            node_id = launch.register_node(key, env=env)
            print(f"registered device key {key} as node {node_id}")
        app_dir = write_app_dir(run_dir / ".app")
        progress = run_dir / "progress.log"
        seen = len(progress.read_text().splitlines()) if progress.exists() else 0
        run_id = launch.submit_run(app_dir, run_config=run_config, env=env)
        print(f"SuperLink listening on {args.host}:{args.port} ({'TLS' if certs else 'INSECURE plain text'}); "
              f"run {run_id} submitted; waiting for {run_config.get('min-clients', 2)} device(s)", flush=True)

        def on_poll(_status) -> None:
            nonlocal seen
            seen = _print_progress(progress, seen)

        status = launch.wait_for_run(run_id, env=env, timeout=args.timeout, on_poll=on_poll)
        _print_progress(progress, seen)
        if not status.succeeded:
            print(f"run {run_id} {status.sub_status or status.status}: {status.details}", file=sys.stderr)
            print(launch.run_logs(run_id, env=env)[-4000:], file=sys.stderr)
            return 1
        summary = json.loads((run_dir / "metrics.json").read_text())["summary"]
        print(f"run complete: {summary.get('rounds')} rounds; user-level epsilon {summary.get('user-epsilon')} "
              f"(delta {summary.get('user-delta')}); model bundle {run_dir / 'model.fedser'}")
        return 0
    finally:
        launch.stop_process(link)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "start":
            return start(args)
    except FedserError as exc:
        print(f"fedser-server: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
