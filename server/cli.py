"""``fedser-server``: run the aggregation server (a SuperLink plus the fedser ServerApp run).

    fedser-server start --run-dir DIR [--rounds R] [--min-clients K] [--kws-corpus PATH] [--public-corpus PATH]
                        [--eval-data PATH] [--resume] [--register KEY.pub ...]
                        [--insecure --no-supernode-auth]
    fedser-server start --superlink HOST:PORT --root-cert CA.pem --run-dir DIR [...]

TLS is on unless ``--insecure``: a CA and server certificate are generated into
``--certs`` (default ``RUN_DIR/certs``) when missing; devices need ``ca.pem`` from there.
SuperNode authentication is on unless ``--no-supernode-auth``: only devices whose public keys
are registered (``--register``) may connect, so holding the CA certificate is not enough to
join, and one person cannot add devices at will.

Devices connect to the SuperLink's Fleet API: gRPC on ``--host``:``--port`` (default
0.0.0.0:9092). Its Control and Runtime APIs (HTTP(S), used by the ``flwr`` CLI and the
ServerApp) listen on 127.0.0.1:``--control-port`` (default 8000) only.

With ``--superlink`` the SuperLink runs elsewhere (another container or host, started with
``flower-superlink --isolation process``): this process starts the SuperExec that runs the
ServerApp here, beside the run directory, registers device keys and submits the run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedser.common import flower_args, processes
from . import flower_cli
from fedser.common.certs import CertPaths, generate_ca_and_server_cert
from fedser.common.errors import ConfigError, FedserError

from .checkpoint import CHECKPOINT_FILE
from .flower_app import run_config_defaults, write_app_dir
from .settings import CORPUS_SETTINGS, RUN_ENDED


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
    s.add_argument("--kws-corpus", default=None, help="public command corpus to pretrain the encoder + KWS head on")
    s.add_argument("--public-corpus", default=None,
                   help="public speech (commands and/or emotions) to pretrain the encoder + heads on")
    s.add_argument("--eval-data", default=None, help="corpus for server-side evaluation each round")
    s.add_argument("--resume", action="store_true", help="continue after the last complete round in RUN_DIR")
    s.add_argument("--insecure", action="store_true", help="plain-text gRPC (development only)")
    s.add_argument("--superlink", default=None, metavar="HOST:PORT",
                   help="use a SuperLink started elsewhere (flower-superlink --isolation process) instead of "
                        "starting one")
    s.add_argument("--root-cert", default=None, metavar="CA.pem",
                   help="with --superlink: the CA that signed the SuperLink's certificate")
    s.add_argument("--host", default="0.0.0.0",
                   help="address the Fleet API (gRPC, the devices' port) listens on (default all interfaces)")
    s.add_argument("--port", type=int, default=None,
                   help=f"Fleet API port, where devices connect over gRPC (default {flower_args.FLEET_PORT})")
    s.add_argument("--control-port", type=int, default=None,
                   help=f"Control and Runtime API port, on 127.0.0.1 only (default {flower_args.SUPERLINK_PORT})")
    s.add_argument("--hostname", action="append", default=[], help="extra DNS name/IP for the certificate")
    s.add_argument("--certs", default=None, help="certificate folder (default RUN_DIR/certs)")
    s.add_argument("--supernode-auth", action=argparse.BooleanOptionalAction, default=None,
                   help="only registered device keys may connect (the default); --no-supernode-auth lets any "
                        "holder of the CA certificate join, for local experiments only")
    s.add_argument("--register", action="append", default=[], metavar="KEY.pub",
                   help="device public key(s) to register: a .pub file with one or more key lines "
                        "(fedser-client enroll prints one); repeatable")
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
                     ("kws-corpus", args.kws_corpus), ("public-corpus", args.public_corpus),
                     ("eval-data", args.eval_data)):
        if val is not None:
            cfg[key] = str(Path(val).resolve()) if key in CORPUS_SETTINGS else val
    if args.resume:
        cfg["resume"] = True
    for k, v in args.config:
        cfg[k] = _typed(k, v, defaults)
    for key in CORPUS_SETTINGS:
        if cfg.get(key) and not Path(str(cfg[key])).exists():
            raise ConfigError(f"--{key} {cfg[key]}: no such file or folder")
    return cfg


def _print_progress(path: Path, seen: int, echo: bool = True) -> list[str]:
    """The lines of ``path`` after the first ``seen``, printed unless ``echo`` is False."""
    if not path.exists():
        return []
    new = path.read_text().splitlines()[seen:]
    for line in new if echo else ():
        print(f"[server] {line}", flush=True)
    return new


def _ends_run(line: str) -> bool:
    """Whether a progress.log line ("HH:MM:SS text") is the ServerApp's last."""
    return line.partition(" ")[2].startswith(RUN_ENDED)


def follow_run(run_id: int, progress: Path, seen: int, *, env: dict, timeout: float,
               connection: str = flower_cli.DEFAULT_CONNECTION, echo: bool = True) -> flower_cli.RunStatus:
    """Follow run ``run_id`` to its end: its progress log (lines after the first ``seen``, printed
    unless ``echo`` is False) every half second, and the SuperLink every 15 s, or at once when the
    log says the run ended, since each question starts a ``flwr`` process (about 1.4 CPU-s)."""
    ended = False

    def show_progress() -> bool:
        nonlocal seen, ended
        new = _print_progress(progress, seen, echo)
        seen += len(new)
        ended = ended or any(_ends_run(line) for line in new)
        return ended

    status = flower_cli.wait_for_run(run_id, connection, env=env, timeout=timeout, poll=15.0,
                                     on_poll=lambda _status: show_progress(), check_now=show_progress)
    show_progress()
    return status


def _superlink_address(text: str) -> tuple[str, int]:
    """The SuperLink's Runtime API address given to ``--superlink``."""
    return flower_args.split_host_port(text, "--superlink", example=f"superlink:{flower_args.SUPERLINK_PORT}")


def _check_attach_args(args) -> None:
    """``--superlink`` replaces every option that shapes a SuperLink this process would start."""
    problems = []
    if args.superlink:
        try:
            _superlink_address(args.superlink)
        except ConfigError as exc:
            problems.append(str(exc))
        clashes = [name for name, given in (("--certs", args.certs), ("--hostname", args.hostname),
                                            ("--supernode-auth", args.supernode_auth is not None),
                                            ("--port", args.port),
                                            ("--control-port", args.control_port))
                   if given]
        if args.host != "0.0.0.0":
            clashes.append("--host")
        if clashes:
            problems.append(f"{', '.join(clashes)} shape a SuperLink this process starts; with --superlink "
                            "set them on that SuperLink")
        if args.insecure == bool(args.root_cert):
            problems.append("with --superlink pass --root-cert CA.pem (TLS) or --insecure, one of them")
        elif args.root_cert and not Path(args.root_cert).is_file():
            problems.append(f"--root-cert {args.root_cert}: no such file")
    else:
        if args.root_cert:
            problems.append("--root-cert is for --superlink; a SuperLink started here uses --certs")
        if args.register and args.supernode_auth is False:
            problems.append("--register needs SuperNode authentication: drop --no-supernode-auth")
        if args.insecure and args.supernode_auth is not False:
            problems.append("SuperNode authentication needs TLS: with --insecure pass --no-supernode-auth as well "
                            "(local experiments only)")
    for key in args.register:
        if not Path(key).is_file():
            problems.append(f"--register {key}: no such file")
    if problems:
        raise ConfigError("; ".join(problems))


def _public_keys(path: str | Path) -> list[str]:
    """The key lines of a ``.pub`` file (one key, or one per line as in ``authorized_keys``)."""
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    keys = [ln for ln in lines if ln and not ln.startswith("#")]
    bad = [k for k in keys if not k.startswith("ecdsa-sha2-")]
    if not keys or bad:
        raise ConfigError(f"--register {path}: expected OpenSSH ECDSA public key lines (fedser-client enroll "
                          f"or fedser certs --node make them); got {(bad or ['nothing'])[0][:40]!r}")
    return keys


def register_keys(paths: list[str], key_dir: Path, env: dict) -> None:
    """Register every public key in ``paths``; a key the SuperLink already knows is kept as it is.

    A restarted server (``--resume``) registers the same keys again, so "already in use" is
    not an error here.
    """
    key_dir.mkdir(parents=True, exist_ok=True)
    for path in paths:
        for i, key in enumerate(_public_keys(path)):
            single = key_dir / f"{Path(path).name}.{i}"
            single.write_text(key + "\n")
            try:
                node_id = flower_cli.register_node(single, env=env)
            except flower_cli.FlowerCommandError as exc:
                if "already in use" not in str(exc):
                    raise
                print(f"device key {i + 1} of {path} is already registered", flush=True)
            else:
                print(f"registered device key {i + 1} of {path} as node {node_id}", flush=True)


def start(args) -> int:
    run_dir = Path(args.run_dir).resolve()
    if not args.resume and (run_dir / CHECKPOINT_FILE).exists():
        raise ConfigError(f"{run_dir} already holds a run: pass --resume to continue it, or another --run-dir")
    _check_attach_args(args)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_config = run_config_from_args(args)
    if args.superlink:
        return _follow(args, run_dir, run_config, attach=_superlink_address(args.superlink))
    return _follow(args, run_dir, run_config, attach=None)


def _follow(args, run_dir: Path, run_config: dict, attach: tuple[str, int] | None) -> int:
    """Start the SuperLink (or, with ``attach``, a SuperExec for a remote one), submit the run, follow it."""
    fleet_port = args.port or flower_args.FLEET_PORT
    control_port = args.control_port or flower_args.SUPERLINK_PORT
    certs: CertPaths | None = None
    if not args.insecure and attach is None:
        cert_dir = Path(args.certs) if args.certs else run_dir / "certs"
        if (cert_dir / "server.pem").exists() and (cert_dir / "ca.pem").exists():
            certs = CertPaths(ca_cert=cert_dir / "ca.pem", ca_key=cert_dir / "ca.key",
                              server_cert=cert_dir / "server.pem", server_key=cert_dir / "server.key")
        else:
            certs = generate_ca_and_server_cert(cert_dir, hosts=args.hostname)
            print(f"generated a CA and server certificate in {cert_dir}; give devices {certs.ca_cert}")
    flwr_home = run_dir / ".flwr"
    env = processes.flower_env(flwr_home)
    processes.interrupt_on_sigterm()  # so that `finally` stops the SuperLink, which has its own session
    helper = None
    try:
        if attach is None:
            link_host, port = "127.0.0.1", control_port
            address, root_cert = f"127.0.0.1:{control_port}", str(certs.ca_cert) if certs else None
            helper = processes.start_process(
                flower_cli.superlink_command(host="127.0.0.1", port=control_port, fleet_host=args.host,
                                         fleet_port=fleet_port, certs=certs, insecure=args.insecure,
                                         enable_supernode_auth=args.supernode_auth is not False,
                                         database=run_dir / "superlink.db"),
                run_dir / "logs" / "superlink.log", env=env)
        else:
            (link_host, port), address, root_cert = attach, args.superlink, args.root_cert
            helper = processes.start_process(
                flower_cli.superexec_command(address, root_cert=root_cert, insecure=args.insecure),
                run_dir / "logs" / "superexec.log", env=env)
        # A SuperLink in another container may come up after this one: wait longer for it.
        processes.wait_for_port(link_host, port, timeout=60 if attach is None else 300, process=helper)
        if attach is None:
            processes.wait_for_port("127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host, fleet_port,
                                 timeout=60, process=helper)
        conn = flower_cli.SuperLinkConnection(address, root_cert=root_cert, insecure=args.insecure)
        flower_cli.write_connection(flwr_home, conn)
        register_keys(args.register, flwr_home / "keys", env)
        if attach is None and args.supernode_auth is not False and not args.register:
            print("SuperNode authentication is on and no device key was given: devices join once their keys "
                  "are registered (--register KEY.pub; a resumed run keeps the keys it registered)", flush=True)
        app_dir = write_app_dir(run_dir / ".app")
        progress = run_dir / "progress.log"
        seen = len(progress.read_text().splitlines()) if progress.exists() else 0
        run_id = flower_cli.submit_run(app_dir, run_config=run_config, env=env)
        security = "INSECURE plain text" if args.insecure else "TLS"
        where = (f"Fleet API (gRPC, {security}) listening on {flower_args.join_host_port(args.host, fleet_port)} "
                 f"for devices; Control API on {address}" if attach is None else f"at {address} ({security})")
        print(f"SuperLink {where}; run {run_id} submitted; waiting for {run_config.get('min-clients', 2)} "
              "device(s)", flush=True)

        status = follow_run(run_id, progress, seen, env=env, timeout=args.timeout)
        if not status.succeeded:
            print(f"run {run_id} {status.sub_status or status.status}: {status.details}", file=sys.stderr)
            print(flower_cli.run_logs(run_id, env=env)[-4000:], file=sys.stderr)
            return 1
        summary = json.loads((run_dir / "metrics.json").read_text())["summary"]
        print(f"run complete: {summary.get('rounds')} rounds; user-level epsilon {summary.get('user-epsilon')} "
              f"(delta {summary.get('user-delta')}); model bundle {run_dir / 'model.fedser'}")
        return 0
    finally:
        if helper is not None:
            processes.ignore_interrupts()
            processes.stop_process(helper)


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
