"""``fedser testbed``: prepare and run the docker-compose test bed (``deploy/docker-compose.yml``).

    fedser testbed prepare --out deploy/testbed [--clients N] [--data CORPUS ...]
    fedser testbed up [--testbed deploy/testbed] [--rounds R] [--runner auto|docker|netns] [--dev]

``prepare`` fills the folder the compose files read (``FEDSER_TESTBED``)::

    client-<i>/data/      the device's data volume: its speakers' audio and data.csv (relative paths)
    client-<i>/state/     the device's ledger, feature cache and Flower home
    secrets/              ca.pem, server.pem, server.key, supernodes.pub (every device's public key)
    keys/client-<i>       each device's private key (secret client-<i>.key) and .pub
    ca/                   the CA key, which signs server certificates and never enters a container
    superlink/            the SuperLink's database (registered keys, runs)
    run/                  the server's run directory: checkpoints, metrics, plots, model, report.md
    docker-compose.clients.yml   devices 4..N (only when --clients > 3)

The data are partitioned by speaker (``fedser partition``): a device is a person, and the
held-out speakers' manifest stays in ``partitions/test.csv``. ``up`` runs the compose project
with ``docker compose`` when it is installed, else with ``deploy/netns_runner.py`` (root, one
network namespace per service), waits for the server app to finish and writes ``run/report.md``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from fedser.common import keys
from fedser.common import processes
from fedser.common.certs import generate_ca_and_server_cert, generate_node_keypair
from fedser.common.corpora import write_manifest
from fedser.common.errors import ConfigError, FedserError
from .args import load_data
from .partition import partition_corpus

HELP = "prepare and run the docker-compose multi-client test bed (deploy/docker-compose.yml)"

BASE_CLIENTS = 3            # client-1..3 are in the base compose file
CONTAINER_UID = 10001       # the images' unprivileged user (Dockerfile.server / Dockerfile.client)
TESTBED_FILE = "testbed.json"
CLIENTS_OVERLAY = "docker-compose.clients.yml"
SUPERLINK_HOST = "superlink"


def deploy_dir() -> Path | None:
    """The repository's ``deploy/`` folder, when fedser runs from a checkout."""
    found = Path(__file__).resolve().parents[2] / "deploy"
    return found if (found / "docker-compose.yml").is_file() else None


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="testbed_command", required=True, metavar="ACTION")
    pr = sub.add_parser("prepare", help="data volumes, certificates and device keys for N clients")
    pr.add_argument("--out", default="deploy/testbed", metavar="DIR", help="the test bed folder (FEDSER_TESTBED)")
    pr.add_argument("--clients", type=int, default=BASE_CLIENTS, help=f"devices (default {BASE_CLIENTS}; at least 3)")
    pr.add_argument("--data", action="append", default=None, metavar="PATH",
                    help="corpus folder or manifest; repeatable (default: synthesize the demo corpus)")
    pr.add_argument("--test", type=float, default=0.2, help="share of speakers held out (partitions/test.csv)")
    pr.add_argument("--tiers", default="1.0,0.5,0.25", help="width tiers of devices 4..N, in turn")
    pr.add_argument("--max-epsilon", type=float, default=8.0, help="privacy budget of devices 4..N")
    pr.add_argument("--host", action="append", default=[], metavar="NAME",
                    help="extra name of the SuperLink in its certificate (superlink is always there)")
    pr.add_argument("--uid", type=int, default=CONTAINER_UID,
                    help=f"user the containers run as (default {CONTAINER_UID}); as root, files are given to it")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--force", action="store_true", help="prepare again over an existing test bed (new CA, new keys)")
    up = sub.add_parser("up", help="bring the test bed up, run the rounds, write run/report.md")
    up.add_argument("--testbed", default="deploy/testbed", metavar="DIR", help="folder made by `prepare`")
    up.add_argument("--rounds", type=int, default=3)
    up.add_argument("--min-clients", type=int, default=None, help="devices a round waits for (default: all)")
    up.add_argument("--local-epochs", type=int, default=1)
    up.add_argument("--runner", choices=("auto", "docker", "netns"), default="auto",
                    help="docker compose, or network namespaces (root); auto: docker when installed")
    up.add_argument("--dev", action="store_true", help="add docker-compose.dev.yml: plain text, no node auth")
    up.add_argument("--compose-dir", default=None, metavar="DIR", help="folder of the compose files (default deploy/)")


# ---------------------------------------------------------------- prepare

def _copy_device_data(part, data_dir: Path) -> Path:
    """Copy a device's utterances into its data volume; the manifest names them relative to itself."""
    audio = data_dir / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    moved, placed = [], {}
    for u in part:
        if u.path not in placed:
            name = f"{len(placed):05d}-{Path(u.path).name}"
            target = audio / name
            try:
                os.link(u.path, target)          # same file system: no second copy of the audio
            except OSError:
                shutil.copy2(u.path, target)
            placed[u.path] = f"audio/{name}"
        moved.append(dataclasses.replace(u, path=placed[u.path]))
    return write_manifest(moved, data_dir / "data.csv")


def client_overlay(base_compose: Path, n_clients: int, tiers: list[float], max_epsilon: float) -> dict:
    """Compose overlay adding devices 4..N, each made from the base file's ``client-1``.

    Built as data from the base definition (never text templates): every setting of the base
    device carries over, and only its name, key, tier, budget and volumes change.
    """
    import yaml

    base = yaml.safe_load(base_compose.read_text())
    template = base["services"]["client-1"]
    services, secrets = {}, {}
    for i in range(BASE_CLIENTS + 1, n_clients + 1):
        svc = copy.deepcopy(template)
        env = dict(svc["environment"])
        env.update({"FEDSER_TIER": str(tiers[(i - 1) % len(tiers)]), "FEDSER_MAX_EPSILON": str(float(max_epsilon)),
                    "FEDSER_AUTH_KEY": f"/run/secrets/client-{i}.key"})
        svc["environment"] = env
        svc["secrets"] = ["ca.pem", f"client-{i}.key"]
        svc["volumes"] = [v.replace("/client-1/", f"/client-{i}/") for v in template["volumes"]]
        services[f"client-{i}"] = svc
        secrets[f"client-{i}.key"] = {"file": base["secrets"]["client-1.key"]["file"].replace("client-1", f"client-{i}")}
    return {"services": services, "secrets": secrets}


def _chown_tree(path: Path, uid: int) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, uid, follow_symlinks=False)


def prepare(out: str | Path, n_clients: int = BASE_CLIENTS, data: list[str] | None = None, *, test: float = 0.2,
            tiers: str = "1.0,0.5,0.25", max_epsilon: float = 8.0, hosts: list[str] | tuple = (),
            uid: int = CONTAINER_UID, seed: int = 0, force: bool = False,
            compose_dir: str | Path | None = None) -> dict:
    """Fill the test bed folder ``out`` (see the module docstring); returns what ``testbed.json`` records."""
    problems = []
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < BASE_CLIENTS:
        problems.append(f"--clients {n_clients!r}: the base compose file has {BASE_CLIENTS} devices; "
                        f"use {BASE_CLIENTS} or more")
    tier_list: list[float] = []
    try:
        tier_list = keys.parse_tiers(tiers)
    except ConfigError as exc:
        problems.append(f"--tiers {exc}")
    if not max_epsilon > 0:
        problems.append(f"--max-epsilon {max_epsilon}: must be > 0")
    if not 0 <= uid < 2 ** 31 or uid == 0:
        problems.append(f"--uid {uid}: containers run as an unprivileged user (not 0)")
    out = Path(out).resolve()
    if (out / TESTBED_FILE).exists() and not force:
        problems.append(f"{out} already holds a test bed: pass --force to prepare it again (new CA and keys; "
                        "the SuperLink database and device state are cleared), or another --out")
    base_compose = Path(compose_dir or deploy_dir() or "deploy") / "docker-compose.yml"
    if n_clients > BASE_CLIENTS and not base_compose.is_file():
        problems.append(f"{base_compose}: the base compose file is needed to add devices (pass --compose-dir)")
    if problems:
        raise ConfigError("; ".join(problems))
    if force:
        for stale in ("superlink", "run", "secrets", "keys", "ca", "partitions", *(p.name for p in out.glob("client-*"))):
            shutil.rmtree(out / stale, ignore_errors=True)
        (out / CLIENTS_OVERLAY).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not data:
        from fedser.tools import synth

        corpus = out / "corpus"
        if not synth.is_complete(corpus):
            print(f"synthesizing the demo corpus into {corpus} ...", flush=True)
            synth.synthesize_corpus(corpus, seed=seed, progress=False, overwrite=True)
        data = [str(corpus / "commands"), str(corpus / "emotion")]
    result = partition_corpus(load_data(data), out / "partitions", n_clients, test=test, seed=seed, sources=data)
    devices = []
    for i, part in enumerate(result.parts, start=1):
        manifest = _copy_device_data(part, out / f"client-{i}" / "data")
        (out / f"client-{i}" / "state").mkdir(parents=True, exist_ok=True)
        devices.append({"service": f"client-{i}", "manifest": str(manifest), "utterances": len(part),
                        "speakers": len({u.speaker for u in part})})
    certs = generate_ca_and_server_cert(out / "ca", hosts=[SUPERLINK_HOST, *hosts])
    secrets = out / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    for src, name in ((certs.ca_cert, "ca.pem"), (certs.server_cert, "server.pem"), (certs.server_key, "server.key")):
        shutil.copy2(src, secrets / name)
    public_lines = []
    for i in range(1, n_clients + 1):
        private, public = generate_node_keypair(out / "keys", f"client-{i}")
        shutil.copy2(private, secrets / f"client-{i}.key")
        public_lines.append(public.read_text().strip())
    (secrets / "supernodes.pub").write_text("\n".join(public_lines) + "\n")
    for folder in ("superlink", "run"):
        (out / folder).mkdir(exist_ok=True)
    if n_clients > BASE_CLIENTS:
        import yaml

        overlay = client_overlay(base_compose, n_clients, tier_list, max_epsilon)
        header = (f"# Devices {BASE_CLIENTS + 1}..{n_clients} of the test bed, made by `fedser testbed prepare "
                  f"--clients {n_clients}` from client-1 of the base file.\n")
        (out / CLIENTS_OVERLAY).write_text(header + yaml.safe_dump(overlay, sort_keys=False))
    if os.geteuid() == 0:
        # Bind mounts keep host ownership: the containers' user must own what it reads or writes.
        # Data volumes stay as they are: read-only, and their audio may be hard links to the corpus.
        for folder in ("secrets", "superlink", "run", *(f"client-{i}/state" for i in range(1, n_clients + 1))):
            _chown_tree(out / folder, uid)
    meta = {"clients": n_clients, "uid": uid, "devices": devices, "sources": [str(d) for d in data],
            "test-manifest": str(result.test) if result.test else None,
            "overlay": CLIENTS_OVERLAY if n_clients > BASE_CLIENTS else None}
    (out / TESTBED_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


# ---------------------------------------------------------------- up

def compose_files(testbed: Path, compose_dir: Path, dev: bool = False) -> list[Path]:
    """The compose files of a prepared test bed, base first."""
    files = [compose_dir / "docker-compose.yml"]
    if (testbed / CLIENTS_OVERLAY).is_file():
        files.append(testbed / CLIENTS_OVERLAY)
    if dev:
        files.append(compose_dir / "docker-compose.dev.yml")
    return files


def compose_env(testbed: Path, rounds: int, min_clients: int, local_epochs: int) -> dict[str, str]:
    env = {"FEDSER_TESTBED": str(testbed), "FEDSER_ROUNDS": str(rounds), "FEDSER_MIN_CLIENTS": str(min_clients),
           "FEDSER_LOCAL_EPOCHS": str(local_epochs)}
    if os.geteuid() != 0:
        # Files prepared by this (unprivileged) user are readable by containers running as it.
        env.update({"FEDSER_UID": str(os.getuid()), "FEDSER_GID": str(os.getgid())})
    return env


def _docker_compose() -> list[str] | None:
    for argv in (["docker", "compose"], ["docker-compose"], ["podman-compose"]):
        if shutil.which(argv[0]) is None:
            continue
        done = subprocess.run([*argv, "version"], capture_output=True, text=True)
        if done.returncode == 0:
            return argv
    return None


def up(args) -> int:
    testbed = Path(args.testbed).resolve()
    compose_dir = Path(args.compose_dir).resolve() if args.compose_dir else deploy_dir()
    problems = []
    if not (testbed / TESTBED_FILE).is_file():
        problems.append(f"{testbed} is not a prepared test bed: run `fedser testbed prepare --out {args.testbed}`")
    if compose_dir is None or not (compose_dir / "docker-compose.yml").is_file():
        problems.append("the compose files were not found: pass --compose-dir (the deploy/ folder)")
    if args.rounds < 1 or args.local_epochs < 1:
        problems.append("--rounds and --local-epochs must be >= 1")
    if problems:
        raise ConfigError("; ".join(problems))
    meta = json.loads((testbed / TESTBED_FILE).read_text())
    min_clients = args.min_clients or int(meta["clients"])
    if not 1 <= min_clients <= int(meta["clients"]):
        raise ConfigError(f"--min-clients {min_clients}: the test bed has {meta['clients']} devices")
    files = compose_files(testbed, compose_dir, args.dev)
    env = {**os.environ, **compose_env(testbed, args.rounds, min_clients, args.local_epochs)}
    compose = _docker_compose() if args.runner in ("auto", "docker") else None
    if compose is not None:
        argv = [*compose, *sum((["-f", str(f)] for f in files), []), "up", "--build",
                "--abort-on-container-exit", "--exit-code-from", "serverapp"]
    elif args.runner == "docker":
        raise ConfigError("docker compose is not installed here; use --runner netns (as root) or install Docker")
    elif os.geteuid() != 0:
        raise ConfigError("no docker compose here, and the network-namespace runner needs root: "
                          "install Docker, or run as root with --runner netns")
    else:
        argv = [sys.executable, str(compose_dir / "netns_runner.py"), "up",
                *sum((["-f", str(f)] for f in files), []), "--workdir", str(testbed / "netns")]
    print(" ".join(argv), flush=True)
    code = _run_until_done(argv, env)
    run_dir = testbed / "run"
    if code != 0 or not (run_dir / "metrics.json").is_file():
        raise FedserError(f"the test bed run failed (exit {code}); logs: "
                          + ("docker compose logs" if compose else str(testbed / "netns" / "logs")))
    from .demo import report

    text = report(run_dir)
    (run_dir / "report.md").write_text(text + "\n")
    print("\n" + text + f"\n\nrun directory {run_dir}")
    return 0


def _run_until_done(argv: list[str], env: dict[str, str]) -> int:
    """Run the compose engine (or the namespace runner) to its end; Ctrl-C or SIGTERM stops it first.

    Both take SIGINT as "stop every service and clean up" (docker compose's graceful stop, the
    runner's ``down``). A terminal's Ctrl-C reaches them directly (same process group); a SIGTERM
    to this command alone is passed on as SIGINT. Either way this command waits for them, and
    the engine also ends if this process is killed outright (``processes.die_with_parent``).
    """
    terminated = False

    def _on_sigterm(signum, frame):
        nonlocal terminated
        terminated = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_sigterm)
    proc = subprocess.Popen(argv, env=env, preexec_fn=processes.die_with_parent())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        processes.ignore_interrupts()
        if terminated and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def run(args) -> int:
    if args.testbed_command == "prepare":
        meta = prepare(args.out, args.clients, args.data, test=args.test, tiers=args.tiers,
                       max_epsilon=args.max_epsilon, hosts=args.host, uid=args.uid, seed=args.seed, force=args.force)
        print(f"test bed in {Path(args.out).resolve()}: {meta['clients']} devices "
              + ", ".join(f"{d['service']} ({d['speakers']} speakers, {d['utterances']} utterances)"
                          for d in meta["devices"]))
        print(f"next: fedser testbed up --testbed {args.out} --rounds 3")
        return 0
    return up(args)
