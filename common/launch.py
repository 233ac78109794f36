"""Start, watch and stop the Flower Deployment Engine processes.

Used by ``fedser-server start``, ``fedser-client start`` and ``fedser demo``.
Flower 1.39 topology (the pinned line: its Fleet API is gRPC)::

    fedser-superlink --fleet-api-address H:9092    Fleet API: gRPC (grpc-rere), TLS unless --insecure;
      |               --host 127.0.0.1 --port 8000  the only port devices reach
      |                                             Control API (flwr CLI) and Runtime API (SuperExec,
      |                                             ServerApp): HTTP(S) on 127.0.0.1:8000
      └─ flower-superexec (own session)
           └─ flwr-serverapp  (per run)
    flower-supernode --superlink H:9092 --port 9094
      └─ flower-superexec                           Runtime API for the ClientApp on
           └─ flwr-clientapp (per message)          127.0.0.1:9094, plain HTTP, loopback only
    flwr run <app> <connection>                     submits a run through the Control API;
    flwr ls / flwr log / flwr supernode register    its connection lives in $FLWR_HOME/config.toml

Ports and defaults:

* ``FLEET_PORT`` (9092): the SuperLink's Fleet API, gRPC over TLS; SuperNodes (devices)
  connect here and nowhere else. A server that devices reach binds it on ``0.0.0.0``.
* ``SUPERLINK_PORT`` (8000): the SuperLink's Control and Runtime APIs (HTTP(S)). The
  Control API authenticates no one in Flower's open-source SuperLink: whoever reaches
  it can submit runs or register SuperNode keys. ``fedser-server start`` binds it on
  127.0.0.1 only; where a ServerApp runs in another container (the compose test bed),
  only that container's network reaches it, never the devices' side. The SuperLink
  reaches its own Runtime API on 127.0.0.1, so its certificate must name 127.0.0.1
  (``fedser.common.certs`` always adds it).
* ``SUPERNODE_RUNTIME_PORT`` (9094): each SuperNode's local Runtime API. Two
  SuperNodes on one machine need two different ports.

Flower finds ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp``
through ``PATH``; :func:`flower_env` puts this interpreter's ``bin`` folder first
so nothing needs an activated virtual environment. It also turns off Flower's
telemetry and update check, which would otherwise call out to the internet.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from .certs import CertPaths
from .errors import ConfigError, FedserError


# Flower's own defaults (flwr.common.constant, flwr.supercore.constant); a test keeps them in step.
FLEET_PORT = 9092
SUPERLINK_PORT = 8000
SUPERNODE_RUNTIME_PORT = 9094
DEFAULT_CONNECTION = "fedser"
# Environment variable that marks every process of a tree :func:`start_process` started.
TREE_VAR = "FEDSER_PROCESS_TREE"

# Flower's exit codes are logged ("Exit Code: 305"); the process itself exits 1.
# 305: a SuperNode could not connect (untrusted certificate, unregistered key).
SUPERNODE_CONNECTION_ERROR = 305
_EXIT_CODE_LINE = re.compile(r"Exit Code: (\d+)")

_CONFIG_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


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


class LoggedProcess(subprocess.Popen):
    """A ``Popen`` that remembers the file its output goes to."""

    log_path: Path
    tree_tag: str

    def flower_exit_code(self) -> int | None:
        """The exit code Flower logged (e.g. ``SUPERNODE_CONNECTION_ERROR``), if any.

        Flower processes exit with status 1 on every error; the specific code,
        with an explanation, is only in their log.
        """
        try:
            found = _EXIT_CODE_LINE.findall(self.log_path.read_text(errors="replace"))
        except OSError:
            return None
        return int(found[-1]) if found else None

    def log_tail(self, n_lines: int = 30) -> str:
        """The last ``n_lines`` of the process's log (for error messages)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n_lines:])


# ---------------------------------------------------------------- environment

def executable(name: str) -> str:
    """Absolute path of a console script installed beside ``sys.executable``."""
    path = Path(sys.executable).parent / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(
        f"{name} not found beside {sys.executable} nor on PATH: install flwr in this environment"
    )


def flower_env(flwr_home: str | Path | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes and ``flwr`` CLI calls.

    ``flwr_home`` sets ``FLWR_HOME``: where the CLI keeps its connections and
    SuperLink/SuperNode install the app bundles they run (default ``~/.flwr``).
    """
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *[p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]])
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    return env


# ---------------------------------------------------------------- config strings

def format_config(values: Mapping[str, bool | int | float | str]) -> str:
    """``{"a": 1, "p": "/x y"}`` -> ``a=1 p='/x y'`` for ``--node-config`` / ``--run-config``.

    Flower splits the string on ``key=value`` pairs and reads each value as TOML,
    so strings are quoted (single quotes keep backslashes and spaces literal) and
    values arrive in the app typed as bool, int, float or str.
    """
    parts = []
    problems = []
    for key, value in values.items():
        if not isinstance(key, str) or not _CONFIG_KEY.match(key):
            problems.append(f"key {key!r}: use letters, digits, '-', '_' (dots nest)")
            continue
        try:
            parts.append(f"{key}={_toml_value(value)}")
        except ValueError as err:
            problems.append(f"{key}: {err}")
    if problems:
        raise ConfigError("; ".join(problems))
    return " ".join(parts)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)  # "inf", "-inf", "0.1", "1e-05": all valid TOML
    if isinstance(value, str):
        if "'" not in value and not _CONTROL_CHARS.search(value):
            return f"'{value}'"
        if '"' not in value:
            escaped = value.replace("\\", "\\\\")
            escaped = _CONTROL_CHARS.sub(lambda m: f"\\u{ord(m.group()):04x}", escaped)
            return f'"{escaped}"'
        raise ValueError(f"{value!r} holds both quote characters, which Flower's parser cannot carry")
    raise ValueError(f"{value!r} is a {type(value).__name__}; use bool, int, float or str")


# ---------------------------------------------------------------- argv builders

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
    _check_port(port)
    _check_port(fleet_port)
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


def join_host_port(host: str, port: int) -> str:
    """``"h:p"``, with an IPv6 address in brackets (``"[::1]:9092"``)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def split_host_port(text: str, what: str = "address",
                    example: str = f"server.example.org:{FLEET_PORT}") -> tuple[str, int]:
    """``"h:p"`` or ``"[v6]:p"`` -> ``(host, port)``; a clear ``ConfigError`` otherwise."""
    host, sep, port = str(text).strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{what} {text!r}: expected HOST:PORT, e.g. {example}")
    return host, int(port)


def supernode_command(
    superlink_address: str,
    node_config: Mapping[str, bool | int | float | str] | None = None,
    *,
    root_cert: str | Path | None = None,
    insecure: bool = False,
    auth_key: str | Path | None = None,
    runtime_port: int = SUPERNODE_RUNTIME_PORT,
    max_wait_time: float | None = None,
) -> list[str]:
    """argv for ``flower-supernode``.

    ``node_config`` reaches the ClientApp as ``context.node_config`` with its
    types kept. ``root_cert`` is the CA that signed the SuperLink's certificate
    (None with TLS: the system trust store). ``auth_key`` is the private key from
    :func:`fedser.common.certs.generate_node_keypair`. ``max_wait_time`` bounds
    how long the node keeps retrying an unreachable SuperLink (None: forever).
    """
    _check_port(runtime_port)
    if insecure and (root_cert is not None or auth_key is not None):
        raise ConfigError("supernode: insecure excludes root_cert and auth_key (both need TLS)")
    argv = [executable("flower-supernode"), "--superlink", superlink_address,
            "--port", str(runtime_port)]
    if insecure:
        argv.append("--insecure")
    elif root_cert is not None:
        argv += ["--root-certificates", str(Path(root_cert).resolve())]
    if auth_key is not None:
        argv += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
    if node_config:
        argv += ["--node-config", format_config(node_config)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(float(max_wait_time))]
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


def _check_port(port: int) -> None:
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"port {port!r}: expected an integer in 1..65535")


# ---------------------------------------------------------------- flwr CLI calls

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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(tomli_w.dumps(config))
    os.replace(tmp, path)
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
) -> RunStatus:
    """Poll until ``run_id`` is finished and return its final status.

    Check ``.succeeded`` (sub-status "completed"); a failed run carries the
    ServerApp's error in ``.details`` and its log in :func:`run_logs`. Raises
    ``TimeoutError`` if the run is still going after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
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
        time.sleep(poll)


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


# ---------------------------------------------------------------- processes

def start_process(
    argv: list[str],
    log_path: str | Path | None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> LoggedProcess:
    """Start ``argv`` in its own process group, stdout and stderr appended to ``log_path``.

    ``log_path=None`` leaves the output on this process's terminal. The own group lets
    :func:`stop_process` stop the SuperNode's helpers (SuperExec, ClientApp processes)
    together with it. Flower starts some helpers in sessions of their own, out of the group;
    every process of the tree therefore carries a tag in its environment (``TREE_VAR``), by
    which :func:`stop_process` finds those too. Started from the main thread, the child is
    also told to end when this process ends (:func:`die_with_parent`).
    """
    env = dict(env) if env is not None else flower_env()
    tag = uuid.uuid4().hex[:16]
    env[TREE_VAR] = ":".join(filter(None, [env.get(TREE_VAR, ""), tag]))
    log_path = Path(log_path) if log_path is not None else None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") if log_path is not None else contextlib.nullcontext() as log:
        proc = LoggedProcess(
            argv, stdout=log, stderr=subprocess.STDOUT if log else None, stdin=subprocess.DEVNULL, env=env,
            cwd=cwd, start_new_session=True, preexec_fn=die_with_parent(),
        )
    proc.log_path = log_path if log_path is not None else Path(os.devnull)
    proc.tree_tag = tag
    return proc


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive SIGTERM when this process dies.

    Children run in sessions of their own (so a terminal's Ctrl-C reaches only the
    launcher, which stops them in order); without this, a launcher killed by SIGKILL or
    a crash would leave them running, and an agent would keep restarting its SuperNode
    for a parent that is gone. Linux only (``prctl(PR_SET_PDEATHSIG)``), and only from
    the main thread: the kernel ties the signal to the thread that forks, and a worker
    thread's end would otherwise stop the child.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):  # pragma: no cover - no usable libc
        return None
    parent = os.getpid()

    def _preexec() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return _preexec


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 30.0,
    process: subprocess.Popen | None = None,
) -> float:
    """Block until ``host:port`` accepts TCP connections; returns the seconds waited.

    Raises ``TimeoutError``, or ``FedserError`` at once if ``process`` (the one
    meant to listen there) exits first.
    """
    start = time.monotonic()
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return time.monotonic() - start
        except OSError:
            pass
        if process is not None and process.poll() is not None:
            tail = process.log_tail() if isinstance(process, LoggedProcess) else ""
            raise FedserError(
                f"{Path(str(process.args[0])).name} exited with code {process.returncode} "
                f"before listening on {host}:{port}" + (f"; its log ends:\n{tail}" if tail else "")
            )
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")
        time.sleep(0.1)


def interrupt_on_sigterm() -> None:
    """Turn SIGTERM into ``KeyboardInterrupt`` in this (main-thread) process.

    The processes this one starts run in sessions of their own (see :func:`start_process`), so a
    SIGTERM that ends this process with the default action (``systemctl stop``, ``docker stop``)
    would leave them running. As an exception, it unwinds through the ``finally`` blocks that
    stop them.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)


def ignore_interrupts() -> None:
    """Ignore SIGINT and SIGTERM from here on (main thread only): for the ``finally`` that stops children.

    A second Ctrl-C or SIGTERM while children are being stopped would otherwise unwind out of
    the stopping and leave some of them running.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM the process group of ``proc``, SIGKILL it after ``timeout``; returns the exit code.

    ``proc`` must lead its own group (as :func:`start_process` makes it).
    """
    return stop_processes([proc], timeout)[0]


def stop_processes(procs: list[subprocess.Popen], timeout: float = 10.0) -> list[int]:
    """Stop several process trees at once: SIGTERM to all, one shared ``timeout``, then SIGKILL.

    A tree is ``proc``'s process group plus every process carrying its tag (helpers that Flower
    detached into sessions of their own: a ServerApp, a SuperExec). Stopping the trees one
    after another would cost up to ``timeout`` each; twenty devices that ignore SIGTERM would
    keep a Ctrl-C waiting for minutes. Returns the exit codes.
    """
    tags = [getattr(p, "tree_tag", None) for p in procs]
    deadline = time.monotonic() + timeout
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    # Helpers that outlive their leader (a ClientApp still writing, a detached ServerApp) are told
    # to stop too, get a moment, then go.
    _signal_pids(tagged_pids(tags), signal.SIGTERM)
    grace = time.monotonic() + min(timeout, 2.0)
    while (any(_group_alive(p.pid) for p in procs) or tagged_pids(tags)) and time.monotonic() < grace:
        time.sleep(0.05)
    for proc in procs:
        _signal_group(proc.pid, signal.SIGKILL)
    _signal_pids(tagged_pids(tags), signal.SIGKILL)
    return [proc.returncode for proc in procs]


def tagged_pids(tags: list[str | None]) -> list[int]:
    """Live processes whose ``TREE_VAR`` names one of ``tags`` (Linux; elsewhere none are found)."""
    wanted = {t for t in tags if t}
    found = []
    if not wanted:
        return found
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            pid = int(environ.parent.name)
            for entry in environ.read_bytes().split(b"\0"):
                if entry.startswith(TREE_VAR.encode() + b"="):
                    if wanted & set(entry.split(b"=", 1)[1].decode(errors="replace").split(":")):
                        stat = (environ.parent / "stat").read_text()
                        if stat.rsplit(")", 1)[1].split()[0] != "Z" and pid != os.getpid():
                            found.append(pid)
                    break
        except (OSError, ValueError, IndexError):
            continue
    return found


def _signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in group ``pgid``."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():  # not Linux: ask the kernel, zombies included
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for stat in proc_dir.glob("[0-9]*/stat"):
        try:
            # Fields after the ")" that closes the command name: state ppid pgrp ...
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


# Flower's SuperNode hands each message to a fresh ClientApp process and gives that process 30 s
# (flwr's HEARTBEAT_DEFAULT_INTERVAL) from the task's claim to check in, or the claim lapses and the
# task is launched again. Each SuperNode's SuperExec looks for tasks every
# FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds (1 s by default, at most 60).
TASK_CLAIM_WINDOW_S = 30.0
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
TASK_POLL_RANGE = (0.01, 60.0)


def task_poll_interval(agents: int, cores: int, launch_cpu_s: float) -> float | None:
    """A SuperExec poll interval for ``agents`` SuperNodes that share ``cores`` CPUs, or None (Flower's).

    A round reaches every device at once. Devices on machines of their own start their ClientApps
    in parallel; SuperNodes sharing one small machine (a demo, a test bed) start them all on its
    few cores, each costing ``launch_cpu_s`` of Python start-up. When that burst would not fit
    well inside the claim window, late starters lose their claim and are launched again, which
    only adds load. Polling every P seconds, each SuperExec at its own phase, spreads the starts
    over P: with P about the burst's length they run a few at a time and each starts quickly
    (start the agents :func:`start_spacing` apart, so that their phases differ).
    """
    burst = agents * launch_cpu_s / max(1, cores)
    if burst <= TASK_CLAIM_WINDOW_S * 2 / 3:
        return None
    return round(min(TASK_POLL_RANGE[1], max(1.0, burst)), 1)


def start_spacing(agents: int, poll: float | None) -> float:
    """Seconds between starting consecutive agents so that their SuperExecs poll at spread phases.

    A SuperExec's phase is set by when it starts; agents started in one go would all poll together
    and the spreading of :func:`task_poll_interval` would be lost.
    """
    return 0.0 if not poll or agents < 2 else poll / agents


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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
