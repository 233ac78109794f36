"""``fedser-client``: the device agent.

    fedser-client enroll --server-ca CA.pem [--out DIR] [--name NAME] [--force]
    fedser-client start --server HOST[:PORT] --data DIR [--tier 1.0|0.5|0.25|auto] [--max-epsilon E]
                        [--root-cert CA] [--auth-key KEY] [--insecure]
    fedser-client status [--data DIR | --ledger PATH] [--json]
    fedser-client ledger reset [--ledger PATH] --yes [--reason TEXT]
    fedser-client listen --model BUNDLE (--input FILE | --mic) [--json]

``enroll`` prepares a device once: it stores the server's CA, makes the device's key pair and
prints the public key line to register on the server. ``start`` runs a Flower SuperNode whose node
config tells the ClientApp where the data, the privacy ledger and the feature cache live; it connects
to the server's Fleet API over gRPC (port 9092 unless ``--server`` names another), after a first
look that the port speaks gRPC with these TLS settings (:mod:`fedser.client.preflight`). The agent
restarts the SuperNode after a lost connection (with back-off), so a device rejoins by itself. Options of ``start`` that a
service manager or a container sets default to environment variables (``FEDSER_SERVER``,
``FEDSER_DATA``, ``FEDSER_TIER``, ``FEDSER_MAX_EPSILON``, ``FEDSER_ROOT_CERT``, ``FEDSER_AUTH_KEY``);
an option on the command line wins.

``status`` prints the device's identity and its privacy ledger: path, whether another process
holds its lock, epsilon spent against the budget, whether its HMAC verified. ``ledger reset``
starts a ledger over at zero spend; a device refuses to do that by itself (a deleted ledger of a
device that has trained is an error, never a fresh budget), so it takes ``--yes``, moves what is
there aside and logs the reset in the fedser home.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from fedser.common import flower_args, processes
from . import supernode
from fedser.common.errors import ConfigError, FedserError

from .listen import cli as listen_cli
from .device import DeviceSettings, device_ledger_path
from .preflight import probe_fleet_api


def _env(name: str, default: str | None = None) -> str | None:
    """An option's default from the environment; empty counts as unset (systemd and compose pass "")."""
    return os.environ.get(name) or default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedser-client", description="fedser device agent")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    en = sub.add_parser("enroll", help="prepare this device: store the server's CA, make its key pair")
    en.add_argument("--server-ca", required=True, metavar="CA.pem", help="the server's CA certificate (ca.pem)")
    en.add_argument("--out", default=None, metavar="DIR",
                    help="where the CA and the key pair go (default $FEDSER_HOME/identity or ~/.fedser/identity)")
    en.add_argument("--name", default="device", help="key file name (default device: DIR/device, DIR/device.pub)")
    en.add_argument("--force", action="store_true", help="replace an existing key pair (it must be registered again)")
    s = sub.add_parser("start", help="join a federation (runs a SuperNode)")
    s.add_argument("--server", default=_env("FEDSER_SERVER"), metavar="HOST[:PORT]",
                   help=f"the aggregation server's Fleet API, gRPC (port {flower_args.FLEET_PORT} unless given) "
                        "(env FEDSER_SERVER)")
    s.add_argument("--data", default=_env("FEDSER_DATA"),
                   help="this device's corpus folder or manifest CSV (env FEDSER_DATA)")
    s.add_argument("--tier", default=_env("FEDSER_TIER", "1.0"),
                   help="width tier 1.0, 0.5, 0.25, or auto (speed probe) (env FEDSER_TIER)")
    s.add_argument("--max-epsilon", type=float, default=_env("FEDSER_MAX_EPSILON", "8.0"),
                   help="sample-level privacy budget of this device (env FEDSER_MAX_EPSILON)")
    s.add_argument("--delta", type=float, default=1e-5)
    pol = s.add_argument_group("privacy policy", "what no server instruction can make this device do; an "
                               "instruction outside it is declined with the reason")
    pol.add_argument("--allow-no-dp", action="store_true",
                     help="follow instructions to train without DP-SGD (by default the device requires it)")
    pol.add_argument("--min-dp-noise", type=float, default=0.0, metavar="Z",
                     help="never train with a DP-SGD noise multiplier below Z (default 0: the budget decides)")
    pol.add_argument("--min-update-noise", type=float, default=0.0, metavar="Z",
                     help="decline rounds whose user-level noise multiplier is below Z (default 0: no minimum)")
    pol.add_argument("--train-scopes", default="all,norms,heads", metavar="LIST",
                     help="which parts of the model the device agrees to train (default all,norms,heads)")
    s.add_argument("--ledger", default=None,
                   help="privacy ledger file (default: ledger-<device id>.json in $FEDSER_HOME or ~/.fedser)")
    s.add_argument("--cache", default=None, help="feature cache folder (default ~/.fedser/features; 'none' = off)")
    s.add_argument("--root-cert", default=_env("FEDSER_ROOT_CERT"),
                   help="CA certificate of the server (TLS) (env FEDSER_ROOT_CERT)")
    s.add_argument("--auth-key", default=_env("FEDSER_AUTH_KEY"),
                   help="this device's private key (SuperNode authentication) (env FEDSER_AUTH_KEY)")
    s.add_argument("--threads", type=int, default=_env("FEDSER_THREADS", "0"),
                   help="CPU threads for training (OMP_NUM_THREADS of the ClientApp processes); 0 = torch's "
                        "default, all cores. Set it when several agents share one machine (env FEDSER_THREADS)")
    s.add_argument("--task-poll", type=float, default=_env("FEDSER_TASK_POLL"), metavar="SECONDS",
                   help="how often the SuperNode looks for new instructions (Flower's default 1 s); longer "
                        "spreads the start of many agents sharing one machine (env FEDSER_TASK_POLL)")
    s.add_argument("--insecure", action="store_true", help="plain-text gRPC (development only)")
    s.add_argument("--port", type=int, default=flower_args.SUPERNODE_RUNTIME_PORT,
                   help="local port of the SuperNode's ClientApp API (one per agent on a machine)")
    s.add_argument("--log", default=None, help="SuperNode log file (default: print to this terminal)")
    s.add_argument("--max-restarts", type=int, default=-1, help="give up after this many restarts (-1: never)")
    s.add_argument("--no-prepare", action="store_true",
                   help="join at once, without first extracting this device's features into the cache (by "
                        "default they are extracted before joining, so that the first round does not wait for it)")
    st = sub.add_parser("status", help="print the device identity and its privacy ledger: epsilon spent / budget, "
                                       "rounds joined, whether it verified")
    st.add_argument("--data", default=None, help="the --data given to start (adopts a ledger named by it, as "
                                                 "older versions named ledgers)")
    st.add_argument("--ledger", default=None, help="the --ledger given to start (default: this device's ledger)")
    st.add_argument("--max-epsilon", type=float, default=8.0)
    st.add_argument("--delta", type=float, default=1e-5)
    st.add_argument("--json", action="store_true")
    led = sub.add_parser("ledger", help="manage the privacy ledger")
    led_sub = led.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    rs = led_sub.add_parser("reset", help="start the privacy ledger over at zero spend, knowingly (logged)")
    rs.add_argument("--ledger", default=None, help="the --ledger given to start (default: this device's ledger)")
    rs.add_argument("--data", default=None, help="the --data given to start, for a ledger named by it")
    rs.add_argument("--yes", action="store_true",
                    help="confirm: the recorded spend no longer counts against the budget")
    rs.add_argument("--reason", default="", help="why, for the reset log")
    li = sub.add_parser("listen", help="spot keywords and read the emotion of utterances in an audio stream")
    listen_cli.add_arguments(li)
    return p


def node_config_from_args(args) -> dict:
    cfg: dict[str, object] = {"data": str(Path(args.data).resolve()), "tier": args.tier,
                              "max-epsilon": float(args.max_epsilon), "delta": float(args.delta),
                              "require-dp": not args.allow_no_dp, "min-dp-noise": float(args.min_dp_noise),
                              "min-update-noise": float(args.min_update_noise), "train-scopes": args.train_scopes}
    if args.ledger:
        cfg["ledger"] = str(Path(args.ledger).resolve())
    if args.cache:
        cfg["cache"] = args.cache if args.cache == "none" else str(Path(args.cache).resolve())
    settings = DeviceSettings.from_node_config(cfg)  # fail here, clearly, not inside the SuperNode
    cfg["tier"] = settings.tier  # "auto" is resolved once, on this device
    cfg["ledger"] = settings.ledger
    return cfg


def enroll(args) -> int:
    from .enroll import enroll_device

    identity = enroll_device(args.server_ca, args.out, name=args.name, force=args.force)
    print(f"CA stored at        {identity.ca}")
    print(f"private key         {identity.private_key} (stays on this device)")
    print(f"public key          {identity.public_key}")
    print("\nRegister this public key on the server (fedser-server start --register FILE):\n")
    print(identity.public_key_line)
    print("\nThen start the agent:\n")
    print(f"fedser-client start --server HOST:{flower_args.FLEET_PORT} --data DIR --root-cert {identity.ca} "
          f"--auth-key {identity.private_key}")
    return 0


def fleet_address(server: str) -> str:
    """``--server`` as ``HOST:PORT``; a bare host gets the Fleet API's default port."""
    text = server.strip()
    bare_v6 = text.count(":") > 1 and not text.startswith("[")
    if bare_v6 or ":" not in text:
        text = flower_args.join_host_port(text.strip("[]"), flower_args.FLEET_PORT)
    flower_args.split_host_port(text, "--server")  # a clear error for a malformed one
    return text


def prepare_features(node_config: dict) -> None:
    """Extract this device's features with the default front end into its cache, once, before joining.

    The frozen encoders cost about a tenth of a second per clip; done here, the first round's
    ClientApp reads them from the cache instead. A corpus with nothing usable is reported, not
    fatal: the device still joins and declines rounds with that reason until data arrives.
    """
    from fedser.common.errors import CorpusError
    from fedser.common.features import FeatureSpec
    from .device import load_local_data

    settings = DeviceSettings.from_node_config(node_config)
    t0 = time.perf_counter()
    try:
        data = load_local_data(settings, FeatureSpec(), progress=True)
    except CorpusError as exc:
        print(f"features not prepared: {exc}", file=sys.stderr, flush=True)
        return
    clips = sum(len(d) for part in (data.train, data.holdout) for d in part.values())
    skipped = f", {len(data.skipped)} file(s) skipped" if data.skipped else ""
    print(f"features ready: {clips} clips ({', '.join(sorted(data.tasks))}){skipped} in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)


def _prepare_in_child(node_config: dict) -> None:
    """:func:`prepare_features` in a child process: the encoders' runtimes (about 140 MB) leave with
    it instead of staying resident in the agent for the whole session."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=prepare_features, args=(node_config,), daemon=True)
    child.start()
    try:
        child.join()
    finally:
        if child.is_alive():   # the agent is being stopped
            child.terminate()
            child.join()
    if child.exitcode != 0:
        print(f"features not prepared (exit code {child.exitcode}); rounds will extract them",
              file=sys.stderr, flush=True)


def start(args) -> int:
    missing = [f"--{name} (or {var})" for name, var in (("server", "FEDSER_SERVER"), ("data", "FEDSER_DATA"))
               if not getattr(args, name)]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} required")
    if not Path(args.data).exists():
        raise ConfigError(f"--data {args.data}: no such file or folder (in a container: mount the device's data "
                          "volume there)")
    if not args.insecure and not args.root_cert:
        raise ConfigError("TLS needs --root-cert CA.pem (the server's ca.pem), or --insecure for plain text")
    if args.root_cert and not Path(args.root_cert).is_file():
        raise ConfigError(f"--root-cert {args.root_cert}: no such file")
    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads}: expected 0 (all cores) or a positive count")
    low, high = supernode.TASK_POLL_RANGE
    if args.task_poll is not None and not low <= float(args.task_poll) <= high:
        raise ConfigError(f"--task-poll {args.task_poll}: expected seconds between {low} and {high:.0f}")
    server = fleet_address(args.server)
    node_config = node_config_from_args(args)
    env = processes.flower_env()
    if args.threads:
        # Inherited by the ClientApp processes the SuperNode starts; torch sizes its pool from it.
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    if args.task_poll is not None:
        env[supernode.TASK_POLL_ENV] = str(float(args.task_poll))   # read by the SuperNode's SuperExec
    argv = supernode.supernode_command(server, node_config, root_cert=args.root_cert, insecure=args.insecure,
                                    auth_key=args.auth_key, runtime_port=args.port)
    log_path = Path(args.log) if args.log else None
    print(f"device agent: server {server} (gRPC, {'INSECURE plain text' if args.insecure else 'TLS'}), tier "
          f"{node_config['tier']}, budget epsilon {args.max_epsilon}, ledger {node_config['ledger']}", flush=True)
    restarts, backoff = 0, 2.0

    def _stop(signum, frame):  # unwind: the SuperNode is stopped on the way out
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    proc = None
    try:
        if not args.no_prepare and node_config.get("cache") != "none":
            _prepare_in_child(node_config)
        while True:
            # Wrong port or TLS settings end the agent here, with the fix; a server that is not up yet
            # is left to the SuperNode's own retries.
            seen = probe_fleet_api(server, root_cert=args.root_cert, insecure=args.insecure)
            if not seen.reachable:
                print(f"server not reachable yet ({seen.detail}); the SuperNode keeps trying", flush=True)
            proc = processes.start_process(argv, log_path, env=env)
            code = proc.wait()
            proc = None
            restarts += 1
            if args.max_restarts >= 0 and restarts > args.max_restarts:
                print(f"SuperNode exited with {code}; giving up after {restarts - 1} restart(s)", file=sys.stderr)
                return 1
            print(f"SuperNode exited with {code}; reconnecting in {backoff:.0f}s", file=sys.stderr, flush=True)
            time.sleep(backoff)
            backoff = min(backoff * 2, 60.0)
    except KeyboardInterrupt:
        return 0
    finally:
        if proc is not None:
            processes.ignore_interrupts()
            processes.stop_process(proc)


def _ledger_path(args) -> Path:
    """The ledger ``status`` and ``ledger reset`` act on: ``--ledger``, else this device's own."""
    if args.ledger:
        return Path(args.ledger)
    if args.data:
        return Path(DeviceSettings.from_node_config({"data": args.data}).ledger)
    return device_ledger_path()


def status(args) -> int:
    from .ledger import PrivacyLedger

    path = _ledger_path(args)
    # Raises, naming the fix, for a ledger that is unreadable, fails its HMAC or has gone missing.
    ledger = PrivacyLedger(path, max_epsilon=args.max_epsilon, delta=args.delta)
    if ledger.verified is None:
        others = sorted(str(p) for p in ledger.home.glob("ledger-*.json") if p != path)
        raise ConfigError(f"no privacy ledger at {path}: this device has not trained yet"
                          + ("" if args.ledger else " (pass --ledger PATH if start was given one)")
                          + (f"; other ledgers in {ledger.home}: {', '.join(others)} (one named by a data "
                             "folder is adopted by `status --data DIR`, DIR as given to start)" if others else ""))
    s = {**ledger.summary(), "lock_held": ledger.lock_held()}
    if args.json:
        print(json.dumps(s, default=str))
    else:
        print(f"device            {s['device_id']} ({s['identity']})")
        print(f"ledger            {s['path']} (backup {s['backup']})")
        print(f"lock              {'held by another process (planning or recording now)' if s['lock_held'] else 'free'}")
        print("HMAC              verified (HMAC-SHA256 under this device's secret)")
        print(f"epsilon spent     {s['epsilon']:.3f} of {s['max_epsilon']} (delta {s['delta']})"
              + ("  BUDGET EXHAUSTED" if s.get("exhausted") else ""))
        print(f"rounds joined     {s['rounds_joined']} (last round {s.get('last_round')})")
        print(f"last model        version {s.get('last_model_version')}")
        print(f"DP-SGD steps      {s['steps']}")
    return 0


def ledger_command(args) -> int:
    from .ledger import reset_ledger

    path = _ledger_path(args)
    if not args.yes:
        raise ConfigError(f"ledger reset starts {path} over at zero spend: the privacy this device has already "
                          "spent would no longer count against its budget. Stop the device agent, then run it "
                          "again with --yes if that is what you mean")
    done = reset_ledger(path, reason=args.reason)
    print(f"privacy ledger {done.ledger} reset for device {done.device_id} by {done.user}")
    print(f"found             {done.found}")
    for aside in done.moved_aside:
        print(f"moved aside       {aside}")
    print(f"logged in         {done.log}")
    print("the device starts at zero spend on its next round")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"enroll": enroll, "start": start, "status": status, "ledger": ledger_command,
                "listen": listen_cli.run}[args.command](args)
    except FedserError as exc:
        print(f"fedser-client: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
