"""The server side of Flower's Deployment Engine: SuperLink and SuperExec command lines and the
``flwr`` CLI calls that submit, watch and stop runs and register devices.

Used by ``fedser-server start``, ``fedser simulate`` and ``fedser demo``. Topology (Flower 1.39,
the pinned line: its Fleet API is gRPC)::

    fedser-superlink --fleet-api-address H:9092    Fleet API: gRPC (grpc-rere), TLS unless --insecure;
      |               --host 127.0.0.1 --port 8000  the only port devices reach
      |                                             Control API (flwr CLI) and Runtime API (SuperExec,
      |                                             ServerApp): HTTP(S) on 127.0.0.1:8000
      └─ flower-superexec (own session)
           └─ flwr-serverapp  (per run)
    flwr run <app> <connection>                     submits a run through the Control API;
    flwr ls / flwr log / flwr supernode register    its connection lives in $FLWR_HOME/config.toml

The Control API authenticates no one in Flower's open-source SuperLink: whoever reaches it can
submit runs or register SuperNode keys. ``fedser-server start`` binds it on 127.0.0.1 only;
where a ServerApp runs in another container (the compose test bed), only that container's
network reaches it, never the devices' side. The SuperLink reaches its own Runtime API on
127.0.0.1, so its certificate must name 127.0.0.1 (``fedser.common.certs`` always adds it).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from fedser.common.certs import CertPaths
from fedser.common.errors import ConfigError, FedserError
from fedser.common.fsutil import PUBLIC, atomic_write_text
from fedser.common.flower_args import FLEET_PORT, SUPERLINK_PORT, check_port, format_config, join_host_port
from fedser.common.processes import executable, flower_env

DEFAULT_CONNECTION = "fedser"


class FlowerCommandError(FedserError):
    """A ``flwr`` CLI call failed or answered something unexpected."""


@dataclass(frozen=True)
class SuperLinkConnection:
    """How the ``flwr`` CLI reaches a SuperLink's Control API.

    Written to ``$FLWR_HOME/config.toml`` by :func:`write_connection`; every
    ``flwr`` command then names it (``flwr run <app> <name>``).
    """

    address: str                 # "host:port" of the SuperLink
    root_cert: str | None = None  # CA certificate; None with TLS = system trust store
    insecure: bool = False
    name: str = DEFAULT_CONNECTION

    def __post_init__(self) -> None:
        if self.insecure and self.root_cert:
            raise ConfigError("a connection is either insecure or has a root certificate, not both")
        if not re.match(r"^[A-Za-z0-9_-]+$", self.name):
            raise ConfigError(f"connection name {self.name!r}: use letters, digits, '-' or '_'")


@dataclass(frozen=True)
class RunStatus:
    """State of a run as ``flwr ls`` reports it."""

    run_id: int
    status: str        # "pending" | "starting" | "running" | "finished"
    sub_status: str    # "completed" | "failed" | "stopped" once finished, else ""
    details: str       # Flower's reason, e.g. the ServerApp's exception

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def succeeded(self) -> bool:
        return self.finished and self.sub_status == "completed"


def superlink_command(
    *,
    host: str = "127.0.0.1",
    port: int = SUPERLINK_PORT,
    fleet_host: str | None = None,
    fleet_port: int = FLEET_PORT,
    certs: CertPaths | None = None,
    insecure: bool = False,
    enable_supernode_auth: bool = False,
    database: str | Path | None = None,
    isolation: str | None = None,
) -> list[str]:
    """argv for ``fedser-superlink`` (Flower's ``flower-superlink`` with its SQLite state made safe
    for concurrent devices: :mod:`fedser.server.superlink`).

    ``host:port`` is where the Control and Runtime APIs (HTTP(S)) listen; ``fleet_host``
    (default ``host``) and ``fleet_port`` where the Fleet API (gRPC, grpc-rere) listens for
    SuperNodes. TLS needs ``certs`` and covers both; ``insecure=True`` is the explicit
    plain-text opt-out. ``database`` keeps the SuperLink's state (runs, registered nodes,
    messages) in a SQLite file instead of memory. ``isolation="process"`` leaves the
    ServerApp to a SuperExec started elsewhere (:func:`superexec_command`). Runtime
    dependency installation (``uv sync`` of the app's dependencies into a fresh environment
    per run) is always disabled: the app's code and dependencies are installed with fedser.
    """
    check_port(port)
    check_port(fleet_port)
    if port == fleet_port:
        raise ConfigError(f"superlink: the Fleet API and the Control API need two ports, got {port} twice")
    if insecure == (certs is not None):
        raise ConfigError("superlink: pass certs for TLS, or insecure=True without certs")
    if enable_supernode_auth and insecure:
        raise ConfigError("superlink: SuperNode authentication requires TLS (certs)")
    if isolation not in (None, "subprocess", "process"):
        raise ConfigError(f"superlink: isolation {isolation!r}: expected 'subprocess' or 'process'")
    fleet = fleet_host if fleet_host is not None else host
    argv = [executable("fedser-superlink"), "--host", host, "--port", str(port),
            "--fleet-api-type", "grpc-rere", "--fleet-api-address", join_host_port(fleet, fleet_port),
            "--disable-runtime-dependency-installation"]
    if isolation is not None:
        argv += ["--isolation", isolation]
    if certs is not None:
        argv += [
            "--ssl-ca-certfile", str(Path(certs.ca_cert).resolve()),
            "--ssl-certfile", str(Path(certs.server_cert).resolve()),
            "--ssl-keyfile", str(Path(certs.server_key).resolve()),
        ]
    else:
        argv.append("--insecure")
    if enable_supernode_auth:
        argv.append("--enable-supernode-auth")
    if database is not None:
        argv += ["--database", str(Path(database).resolve())]
    return argv


def superexec_command(
    runtime_api_address: str,
    *,
    root_cert: str | Path | None = None,
    insecure: bool = False,
) -> list[str]:
    """argv for ``flower-superexec`` serving ServerApp runs of a SuperLink started elsewhere.

    Pairs with ``flower-superlink --isolation process``: the SuperLink then starts no
    SuperExec of its own, and this one (in another process, container or host) fetches the
    runs over the SuperLink's Runtime API at ``runtime_api_address`` ("host:port", the
    SuperLink's only port) and runs each ServerApp beside itself, where the run directory is.
    """
    if insecure == (root_cert is not None):
        raise ConfigError("superexec: pass root_cert (the SuperLink's CA) for TLS, or insecure=True")
    argv = [executable("flower-superexec"), "--runtime-api-address", runtime_api_address]
    if insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(Path(root_cert).resolve())]
    return argv


def run_command(
    app_dir: str | Path,
    connection: str = DEFAULT_CONNECTION,
    run_config: Mapping[str, bool | int | float | str] | None = None,
    *,
    stream: bool = False,
) -> list[str]:
    """argv for ``flwr run``: build the app bundle from ``app_dir`` and submit it.

    Every ``run_config`` key must be declared in the app's
    ``[tool.flwr.app.config]``, or the SuperLink refuses the run. Without
    ``stream`` the answer is JSON (see :func:`submit_run`); with it, the run's
    logs follow on stdout until it ends.
    """
    argv = [executable("flwr"), "run", str(Path(app_dir).resolve()), connection]
    if run_config:
        argv += ["--run-config", format_config(run_config)]
    argv += ["--stream"] if stream else ["--format", "json"]
    return argv


def register_node_command(public_key: str | Path, connection: str = DEFAULT_CONNECTION) -> list[str]:
    """argv for ``flwr supernode register`` (SuperLink started with node auth)."""
    return [executable("flwr"), "supernode", "register", str(Path(public_key).resolve()),
            connection, "--format", "json"]


def write_connection(flwr_home: str | Path, connection: SuperLinkConnection, *, default: bool = True) -> Path:
    """Add or replace ``connection`` in ``<flwr_home>/config.toml``; returns that path.

    Other connections in the file are kept.
    """
    import tomli_w  # a Flower dependency; only needed here

    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    config: dict = {}
    if path.is_file():
        with path.open("rb") as fh:
            config = tomllib.load(fh)
    section = config.setdefault("superlink", {})
    entry: dict[str, object] = {"address": connection.address}
    if connection.insecure:
        entry["insecure"] = True
    elif connection.root_cert is not None:
        entry["root-certificates"] = str(Path(connection.root_cert).resolve())
    section[connection.name] = entry
    if default or "default" not in section:
        section["default"] = connection.name
    atomic_write_text(path, tomli_w.dumps(config), PUBLIC)
    return path


def submit_run(
    app_dir: str | Path,
    connection: str = DEFAULT_CONNECTION,
    run_config: Mapping[str, bool | int | float | str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> int:
    """Submit a run with ``flwr run`` and return its run id.

    ``flwr run`` packs every ``*.py``/``*.toml``/``*.md``/``*.json``/``*.yaml``
    file of ``app_dir`` that the root ``.gitignore`` does not exclude and walks
    the whole folder first (a virtual environment inside makes that slow).
    """
    answer = _flwr_json(run_command(app_dir, connection, run_config), env, timeout)
    if not answer.get("success") or "run-id" not in answer:
        raise FlowerCommandError(f"flwr run {app_dir} was refused: {answer.get('error-message', answer)}")
    return int(answer["run-id"])


def register_node(
    public_key: str | Path,
    connection: str = DEFAULT_CONNECTION,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> int:
    """Register a SuperNode's public key with the SuperLink; returns the node id."""
    answer = _flwr_json(register_node_command(public_key, connection), env, timeout)
    if not answer.get("success"):
        raise FlowerCommandError(
            f"registering {public_key} failed: {answer.get('error-message', answer)}"
        )
    return int(answer["node-id"])


def list_nodes(
    connection: str = DEFAULT_CONNECTION,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> list[dict]:
    """The SuperLink's SuperNodes as ``flwr supernode ls`` lists them (``status``: "online", ...)."""
    answer = _flwr_json([executable("flwr"), "supernode", "ls", connection, "--format", "json"], env, timeout)
    if not answer.get("success"):
        raise FlowerCommandError(f"flwr supernode ls failed: {answer.get('error-message', answer)}")
    return list(answer.get("nodes", []))


def run_status(
    run_id: int,
    connection: str = DEFAULT_CONNECTION,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> RunStatus:
    """Current status of ``run_id`` (``flwr ls --run-id``)."""
    answer = _flwr_json(
        [executable("flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"], env, timeout
    )
    runs = answer.get("runs") or []
    if not answer.get("success") or not runs:
        raise FlowerCommandError(f"flwr ls --run-id {run_id} failed: {answer.get('error-message', answer)}")
    row = runs[0]
    status, _, sub_status = str(row.get("status", "")).partition(":")
    details = str(row.get("status-details", ""))
    return RunStatus(run_id=int(row["run-id"]), status=status, sub_status=sub_status,
                     details="" if details == "N/A" else details)


def wait_for_run(
    run_id: int,
    connection: str = DEFAULT_CONNECTION,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 3600.0,
    poll: float = 2.0,
    on_poll: Callable[[RunStatus], None] | None = None,
    check_now: Callable[[], bool] | None = None,
) -> RunStatus:
    """Poll until ``run_id`` is finished and return its final status.

    Check ``.succeeded`` (sub-status "completed"); a failed run carries the
    ServerApp's error in ``.details`` and its log in :func:`run_logs`. Raises
    ``TimeoutError`` if the run is still going after ``timeout`` seconds.

    Each poll is a ``flwr ls`` process (about 1.4 CPU seconds), which a small server pays for
    the whole run. ``check_now`` is called every half second between polls; once it returns True
    (e.g. the run's own progress log says it has ended) the status is asked at once and then
    every ``min(poll, 2)`` seconds, so that ``poll`` can be long.
    """
    deadline = time.monotonic() + timeout
    hinted = False
    while True:
        try:
            status = run_status(run_id, connection, env=env)
        except FlowerCommandError:
            # A SuperLink that is busy or restarting answers again shortly.
            if time.monotonic() + poll > deadline:
                raise
        else:
            if on_poll is not None:
                on_poll(status)
            if status.finished:
                return status
            if time.monotonic() + poll > deadline:
                raise TimeoutError(f"run {run_id} still {status.status} after {timeout:.0f} s")
        wake = time.monotonic() + (min(poll, 2.0) if hinted else poll)
        while (left := wake - time.monotonic()) > 0:
            time.sleep(min(0.5, left) if check_now is not None else left)
            if check_now is not None and not hinted and check_now():
                hinted = True
                break


def run_logs(
    run_id: int,
    connection: str = DEFAULT_CONNECTION,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> str:
    """The ServerApp's log of ``run_id`` so far (``flwr log --show``)."""
    done = _flwr(
        [executable("flwr"), "log", str(run_id), connection, "--show"], env, timeout
    )
    return done.stdout


def stop_run(
    run_id: int,
    connection: str = DEFAULT_CONNECTION,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> None:
    """Ask the SuperLink to stop ``run_id`` (``flwr stop``)."""
    answer = _flwr_json([executable("flwr"), "stop", str(run_id), connection, "--format", "json"], env, timeout)
    if not answer.get("success"):
        raise FlowerCommandError(f"flwr stop {run_id} failed: {answer.get('error-message', answer)}")


def _flwr(argv: list[str], env: Mapping[str, str] | None, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            argv, env=dict(env) if env is not None else flower_env(), capture_output=True,
            text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise FlowerCommandError(f"{' '.join(argv[1:3])} did not answer within {timeout:.0f} s") from err


def _flwr_json(argv: list[str], env: Mapping[str, str] | None, timeout: float) -> dict:
    """Run a ``flwr ... --format json`` command and parse its answer.

    ``flwr`` exits 0 even when the SuperLink refuses; the JSON ``success`` field
    is the only reliable verdict.
    """
    done = _flwr(argv, env, timeout)
    # Warnings may precede the JSON object on stdout.
    text = done.stdout
    start = text.find("{")
    try:
        answer = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        command = " ".join([Path(argv[0]).name, *argv[1:3]])
        output = (done.stderr or done.stdout).strip()[-2000:]
        raise FlowerCommandError(f"{command} exited {done.returncode} without a JSON answer: {output}")
    return answer


def stage_app(pyproject: str | Path, dest_dir: str | Path) -> Path:
    """Make a minimal Flower App folder holding only ``pyproject.toml``; returns it.

    When the app's components are importable from the installed package (as
    ``fedser.server.app:app`` is), the bundle needs nothing else, and submitting
    this folder instead of a source tree with a virtual environment inside keeps
    ``flwr run`` fast and the bundle tiny.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pyproject, dest / "pyproject.toml")
    return dest
