"""The compose side of ``fedser testbed``: which compose files make the project, and what runs it.

Lives beside the compose files it names, so the files, the overlay written from them and the
engine that runs them change together, and the command finds them through this module's own
folder instead of guessing where a checkout is. ``fedser testbed`` (``fedser.tools``) keeps
what needs the tools: the data, certificates and keys of a prepared bed, and the report. It
imports this module from its deploy folder (``--deploy-dir``); nothing here imports
``fedser.tools``.

    compose files    docker-compose.yml, the bed's docker-compose.clients.yml, docker-compose.dev.yml
    environment      FEDSER_TESTBED, FEDSER_ROUNDS, ... (the variables the compose files read)
    engine           docker compose (or docker-compose, podman-compose), else netns_runner.py as root
"""
from __future__ import annotations

import copy
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fedser.common import processes
from fedser.common.errors import ConfigError

HERE = Path(__file__).resolve().parent
BASE_COMPOSE = HERE / "docker-compose.yml"
DEV_COMPOSE = HERE / "docker-compose.dev.yml"
NETNS_RUNNER = HERE / "netns_runner.py"

BASE_CLIENTS = 3            # client-1..3 are in the base compose file
CLIENTS_OVERLAY = "docker-compose.clients.yml"   # in the test bed folder, beside the volumes it names
SUPERLINK_HOST = "superlink"   # the SuperLink's service name: devices dial it, its certificate must name it
NETNS_WORKDIR = "netns"     # in the test bed folder: the namespace runner's logs and per-service roots


@dataclass(frozen=True)
class Engine:
    """How a prepared bed runs: the command, and where its services' logs are when it fails."""

    argv: list[str]
    logs: str
    publishes_ports: bool = True    # the namespace runner publishes nothing on the host
    builds: tuple[list[str], ...] = ()   # run first, one after another: each image built once


# ---------------------------------------------------------------- compose files

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


def write_client_overlay(testbed: Path, n_clients: int, tiers: list[float], max_epsilon: float) -> Path | None:
    """Write the overlay of devices 4..N into the test bed folder; None (and no file) for the base devices alone.

    ``max_epsilon`` is the privacy budget of each added device; ``tiers`` are their width tiers, in turn.
    """
    if n_clients <= BASE_CLIENTS:
        return None
    import yaml

    overlay = client_overlay(BASE_COMPOSE, n_clients, tiers, max_epsilon)
    header = (f"# Devices {BASE_CLIENTS + 1}..{n_clients} of the test bed, made by `fedser testbed prepare "
              f"--clients {n_clients}` from client-1 of the base file.\n")
    path = testbed / CLIENTS_OVERLAY
    path.write_text(header + yaml.safe_dump(overlay, sort_keys=False))
    return path


def compose_files(testbed: Path, dev: bool = False) -> list[Path]:
    """The compose files of a prepared test bed, base first."""
    files = [BASE_COMPOSE]
    if (testbed / CLIENTS_OVERLAY).is_file():
        files.append(testbed / CLIENTS_OVERLAY)
    if dev:
        files.append(DEV_COMPOSE)
    return files


def compose_env(testbed: Path, rounds: int, min_clients: int, local_epochs: int) -> dict[str, str]:
    """The variables the compose files read (``${FEDSER_...}``), for a run of ``rounds`` rounds.

    Also ``BUILDAH_FORMAT=docker``: podman builds OCI images by default, and OCI has no place for
    the Dockerfiles' ``HEALTHCHECK`` (Docker ignores the variable).
    """
    env = {"FEDSER_TESTBED": str(testbed), "FEDSER_ROUNDS": str(rounds), "FEDSER_MIN_CLIENTS": str(min_clients),
           "FEDSER_LOCAL_EPOCHS": str(local_epochs), "BUILDAH_FORMAT": "docker"}
    if os.geteuid() != 0:
        # Files prepared by this (unprivileged) user are readable by containers running as it.
        env.update({"FEDSER_UID": str(os.getuid()), "FEDSER_GID": str(os.getgid())})
    return env


# ---------------------------------------------------------------- before anything starts

def _host_port(spec) -> int | None:
    """The host side of a ``ports:`` entry (``"9092:9092"``, ``"127.0.0.1:9092:9092"``, long form); None if unpublished."""
    if isinstance(spec, dict):
        published = spec.get("published")
        return int(published) if published not in (None, "") else None
    parts = str(spec).split("/")[0].split(":")
    return int(parts[-2]) if len(parts) >= 2 and parts[-2] else None


def port_in_use(port: int) -> bool:
    """Whether something on this host already listens on TCP ``port`` (a bind on all addresses fails)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as err:
            return err.errno == errno.EADDRINUSE
    return False


def preflight(files: list[Path], env: dict[str, str], testbed: Path, check_ports: bool = True) -> list[str]:
    """What would stop the project once its containers start, each naming the service and the fix.

    A missing secret file, a missing or empty data volume and a published port already taken on
    this host: a container engine reports the first as a bare path (or makes an empty folder for
    a missing bind mount, so the device fails later inside its container) and the last as a bind
    error of the engine's proxy. Checked here on the merged compose files, before any container.
    """
    from compose import load_compose, service_mounts   # beside this file; reads the files as compose does

    doc = load_compose(files, env)
    prepare = f"run `fedser testbed prepare --out {testbed} --force` (new keys for every service)"
    problems = []
    for name, svc in doc["services"].items():
        # What a container engine accepts (named volumes, say) is not this check's to refuse.
        for m in service_mounts(name, svc, doc, problems=[]):
            if m.secret is not None and not Path(m.source).is_file():
                problems.append(f"service {name}: secret {m.secret} is missing ({m.source}): {prepare}, "
                                f"or put the file back")
            if m.target == "/data" and not (Path(m.source) / "data.csv").is_file():
                problems.append(f"service {name}: no data volume at {m.source} (mounted at /data, with data.csv): "
                                f"{prepare}, or `--data CORPUS` to give it recordings")
        for spec in svc.get("ports", []) if check_ports else ():
            port = _host_port(spec)
            if port is not None and port_in_use(port):
                problems.append(f"service {name}: host port {port} is already in use (another SuperLink or test "
                                f"bed?): stop what holds it (`ss -ltnp sport = :{port}`), or publish another "
                                f"port with FEDSER_FLEET_PORT=<free port>")
    return problems


# ---------------------------------------------------------------- the engine

def docker_compose() -> list[str] | None:
    """The argv prefix of an installed compose engine that answers ``version``, or None.

    Looked for on ``PATH`` and beside this Python (``pip install podman-compose`` into the
    environment fedser runs from puts it there, which ``sudo`` often leaves off ``PATH``).
    """
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), str(Path(sys.executable).parent)])
    for argv in (["docker", "compose"], ["docker-compose"], ["podman-compose"]):
        found = shutil.which(argv[0], path=search)
        if found is None:
            continue
        argv = [found, *argv[1:]]
        done = subprocess.run([*argv, "version"], capture_output=True, text=True)
        if done.returncode == 0:
            return argv
    return None


def image_builders(files: list[Path]) -> list[str]:
    """One service per image the project builds (the first that names it), in file order."""
    import yaml

    seen: dict[str, str] = {}
    for f in files:
        for name, svc in ((yaml.safe_load(Path(f).read_text()) or {}).get("services") or {}).items():
            if (svc or {}).get("build") and svc.get("image") and svc["image"] not in seen:
                seen[svc["image"]] = name
    return list(seen.values())


def choose_engine(files: list[Path], testbed: Path, runner: str = "auto") -> Engine:
    """What runs the project: ``docker compose`` (``runner`` auto or docker), else the namespace runner (netns, root).

    ``ConfigError`` when the chosen engine cannot run here, saying what would.
    """
    compose = docker_compose() if runner in ("auto", "docker") else None
    file_args = sum((["-f", str(f)] for f in files), [])
    if compose is not None:
        # `up --build` builds every service that has a build section, and podman-compose builds them
        # all at once: five builds of two images of several GB each, more than a small disk holds
        # while they are committed. Built first, one image at a time.
        return Engine([*compose, *file_args, "up", "--abort-on-container-exit", "--exit-code-from", "serverapp"],
                      " ".join([Path(compose[0]).name, *compose[1:], "logs"]),
                      builds=tuple([*compose, *file_args, "build", service] for service in image_builders(files)))
    if runner == "docker":
        raise ConfigError("docker compose is not installed here; use --runner netns (as root) or install Docker")
    if os.geteuid() != 0:
        raise ConfigError("no docker compose here, and the network-namespace runner needs root: "
                          "install Docker, or run as root with --runner netns")
    workdir = testbed / NETNS_WORKDIR
    return Engine([sys.executable, str(NETNS_RUNNER), "up", *file_args, "--workdir", str(workdir)],
                  str(workdir / "logs"), publishes_ports=False)


def run_until_done(argv: list[str], env: dict[str, str]) -> int:
    """Run the compose engine (or the namespace runner) to its end; Ctrl-C or SIGTERM stops it first.

    Both take SIGINT as "stop every service and clean up" (docker compose's graceful stop, the
    runner's ``down``). A terminal's Ctrl-C reaches them directly (same process group); a SIGTERM
    to this command alone is passed on as SIGINT. Either way this command waits for them (up to
    60 s, then kills them), and the engine also ends if this process is killed outright
    (``processes.die_with_parent``). Returns the engine's exit code.
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
