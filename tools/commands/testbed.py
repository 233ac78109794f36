"""``fedser testbed``: prepare and run the docker-compose test bed (``deploy/docker-compose.yml``).

    fedser testbed prepare --out deploy/testbed [--clients N] [--data CORPUS ...] [--deploy-dir DIR]
    fedser testbed up [--testbed deploy/testbed] [--rounds R] [--runner auto|docker|netns] [--dev] [--deploy-dir DIR]

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

This module is the front end and what needs the tools (synthesizer, partitioner, report); the
compose side (which files, the overlay of devices 4..N, their environment, which engine, running
it to the end) is ``deploy/testbed.py``, beside the compose files. deploy/ ships with the source,
not in the wheel, so the command is told where it is: ``--deploy-dir``, by default the
``deploy/`` folder of the checkout this fedser is installed from (``pip install -e``). When
neither has the compose files, the command stops and names the option.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

from fedser.common import keys
from fedser.common.certs import generate_ca_and_server_cert, generate_node_keypair
from fedser.common.corpora import write_manifest
from fedser.common.errors import ConfigError, FedserError
from .args import load_data
from .partition import partition_corpus

HELP = "prepare and run the docker-compose multi-client test bed (deploy/docker-compose.yml)"

CONTAINER_UID = 10001       # the images' unprivileged user (Dockerfile.server / Dockerfile.client)
TESTBED_FILE = "testbed.json"
# An editable install runs this file from the checkout itself: deploy/ is beside tools/ there.
CHECKOUT_DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DEPLOY_FILES = ("docker-compose.yml", "testbed.py", "netns_runner.py")


def find_deploy_dir(given: str | Path | None = None) -> Path:
    """The deploy folder: ``given`` (``--deploy-dir``), else the ``deploy/`` of the checkout beside this source.

    ``ConfigError`` naming ``--deploy-dir`` when the folder lacks the compose files or their code.
    """
    folder = Path(given).expanduser().resolve() if given else CHECKOUT_DEPLOY
    missing = [name for name in DEPLOY_FILES if not (folder / name).is_file()]
    if missing:
        what = f"--deploy-dir {given}" if given else f"{folder} (the deploy/ folder beside this fedser's source)"
        raise ConfigError(f"{what} is not a deploy folder (no {', '.join(missing)}): pass --deploy-dir DIR, "
                          "the deploy/ folder of a fedser checkout")
    return folder


def deploy_module(name: str, given: str | Path | None = None) -> ModuleType:
    """Import ``<deploy folder>/<name>.py`` (``testbed``, ``compose``, ``netns``) from :func:`find_deploy_dir`.

    The deploy modules import each other by bare name, as they do when run as scripts from their
    folder, so the folder goes first on ``sys.path``. A module of that name from elsewhere (another
    deploy folder, an installed package) is refused rather than used in its place.
    """
    folder = find_deploy_dir(given)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    module = importlib.import_module(name)
    origin = Path(getattr(module, "__file__", "") or "").resolve()
    if origin != folder / f"{name}.py":
        raise ConfigError(f"the deploy module {name!r} was already imported from {origin}, not from {folder}; "
                          "use one --deploy-dir per process")
    return module


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="testbed_command", required=True, metavar="ACTION")
    pr = sub.add_parser("prepare", help="data volumes, certificates and device keys for N clients")
    pr.add_argument("--out", default="deploy/testbed", metavar="DIR", help="the test bed folder (FEDSER_TESTBED)")
    pr.add_argument("--clients", type=int, default=None,
                    help="devices (default and least: the base compose file's client-1..3)")
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
    _add_deploy_dir(pr)
    up = sub.add_parser("up", help="bring the test bed up, run the rounds, write run/report.md")
    up.add_argument("--testbed", default="deploy/testbed", metavar="DIR", help="folder made by `prepare`")
    up.add_argument("--rounds", type=int, default=3)
    up.add_argument("--min-clients", type=int, default=None, help="devices a round waits for (default: all)")
    up.add_argument("--local-epochs", type=int, default=1)
    up.add_argument("--runner", choices=("auto", "docker", "netns"), default="auto",
                    help="docker compose, or network namespaces (root); auto: docker when installed")
    up.add_argument("--dev", action="store_true", help="add docker-compose.dev.yml: plain text, no node auth")
    _add_deploy_dir(up)


def _add_deploy_dir(p) -> None:
    # --compose-dir: the option's earlier name, still accepted.
    p.add_argument("--deploy-dir", "--compose-dir", dest="deploy_dir", default=None, metavar="DIR",
                   help="the deploy/ folder: the compose files and the code that runs them "
                        f"(default {CHECKOUT_DEPLOY}: the checkout's, when fedser is installed from one)")


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


def _chown_tree(path: Path, uid: int) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, uid, follow_symlinks=False)


def prepare(out: str | Path, n_clients: int | None = None, data: list[str] | None = None, *, test: float = 0.2,
            tiers: str = "1.0,0.5,0.25", max_epsilon: float = 8.0, hosts: list[str] | tuple = (),
            uid: int = CONTAINER_UID, seed: int = 0, force: bool = False,
            deploy_dir: str | Path | None = None) -> dict:
    """Fill the test bed folder ``out`` (see the module docstring); returns what ``testbed.json`` records.

    ``n_clients`` defaults to the base compose file's devices; ``deploy_dir`` is ``--deploy-dir``.
    """
    problems = []
    bed = None
    try:
        bed = deploy_module("testbed", deploy_dir)
    except ConfigError as exc:
        problems.append(str(exc))
    if bed is not None:
        if n_clients is None:
            n_clients = bed.BASE_CLIENTS
        if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < bed.BASE_CLIENTS:
            problems.append(f"--clients {n_clients!r}: the base compose file has {bed.BASE_CLIENTS} devices; "
                            f"use {bed.BASE_CLIENTS} or more")
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
    if problems:
        raise ConfigError("; ".join(problems))
    if force:
        for stale in ("superlink", "run", "secrets", "keys", "ca", "partitions", *(p.name for p in out.glob("client-*"))):
            shutil.rmtree(out / stale, ignore_errors=True)
        (out / bed.CLIENTS_OVERLAY).unlink(missing_ok=True)
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
    certs = generate_ca_and_server_cert(out / "ca", hosts=[bed.SUPERLINK_HOST, *hosts])
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
    overlay = bed.write_client_overlay(out, n_clients, tier_list, max_epsilon)
    if os.geteuid() == 0:
        # Bind mounts keep host ownership: the containers' user must own what it reads or writes.
        # Data volumes stay as they are: read-only, and their audio may be hard links to the corpus.
        for folder in ("secrets", "superlink", "run", *(f"client-{i}/state" for i in range(1, n_clients + 1))):
            _chown_tree(out / folder, uid)
    meta = {"clients": n_clients, "uid": uid, "devices": devices, "sources": [str(d) for d in data],
            "test-manifest": str(result.test) if result.test else None,
            "overlay": overlay.name if overlay else None}
    (out / TESTBED_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


# ---------------------------------------------------------------- up

def up(args) -> int:
    testbed = Path(args.testbed).resolve()
    problems = []
    if not (testbed / TESTBED_FILE).is_file():
        problems.append(f"{testbed} is not a prepared test bed: run `fedser testbed prepare --out {args.testbed}`")
    bed = None
    try:
        bed = deploy_module("testbed", args.deploy_dir)
    except ConfigError as exc:
        problems.append(str(exc))
    if args.rounds < 1 or args.local_epochs < 1:
        problems.append("--rounds and --local-epochs must be >= 1")
    if problems:
        raise ConfigError("; ".join(problems))
    meta = json.loads((testbed / TESTBED_FILE).read_text())
    min_clients = args.min_clients or int(meta["clients"])
    if not 1 <= min_clients <= int(meta["clients"]):
        raise ConfigError(f"--min-clients {min_clients}: the test bed has {meta['clients']} devices")
    files = bed.compose_files(testbed, args.dev)
    env = {**os.environ, **bed.compose_env(testbed, args.rounds, min_clients, args.local_epochs)}
    engine = bed.choose_engine(files, testbed, args.runner)
    problems = bed.preflight(files, env, testbed, check_ports=engine.publishes_ports)
    if problems:
        raise ConfigError("the test bed cannot start: " + "; ".join(problems))
    for build in engine.builds:
        print(" ".join(build), flush=True)
        code = bed.run_until_done(build, env)
        if code != 0:
            raise FedserError(f"building an image failed (exit {code}): {' '.join(build)}; its output is above")
    print(" ".join(engine.argv), flush=True)
    code = bed.run_until_done(engine.argv, env)
    run_dir = testbed / "run"
    if code != 0 or not (run_dir / "metrics.json").is_file():
        raise FedserError(f"the test bed run failed (exit {code}); logs: {engine.logs}")
    from .demo import report

    text = report(run_dir)
    (run_dir / "report.md").write_text(text + "\n")
    print("\n" + text + f"\n\nrun directory {run_dir}")
    return 0


def run(args) -> int:
    if args.testbed_command == "prepare":
        meta = prepare(args.out, args.clients, args.data, test=args.test, tiers=args.tiers,
                       max_epsilon=args.max_epsilon, hosts=args.host, uid=args.uid, seed=args.seed, force=args.force,
                       deploy_dir=args.deploy_dir)
        print(f"test bed in {Path(args.out).resolve()}: {meta['clients']} devices "
              + ", ".join(f"{d['service']} ({d['speakers']} speakers, {d['utterances']} utterances)"
                          for d in meta["devices"]))
        print(f"next: fedser testbed up --testbed {args.out} --rounds 3")
        return 0
    return up(args)
