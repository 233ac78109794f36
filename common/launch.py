"""Start, watch and stop the Flower Deployment Engine processes.

Used by ``fedser-server start``, ``fedser-client start`` and ``fedser demo``.
Flower 1.41 topology (one HTTPS port per SuperLink, everything else local)::

    flower-superlink --host H --port 8000        Fleet API (SuperNodes), Control API
      └─ flower-superexec (own session)          (flwr CLI) and Runtime API (ServerApp)
           └─ flwr-serverapp  (per run)          all on H:8000, TLS unless --insecure
    flower-supernode --superlink H:8000 --port 9094
      └─ flower-superexec                        Runtime API for the ClientApp on
           └─ flwr-clientapp (per message)       127.0.0.1:9094, plain HTTP, loopback only
    flwr run <app> <connection>                  submits a run through the Control API;
    flwr ls / flwr log / flwr supernode register its connection lives in $FLWR_HOME/config.toml

Ports and defaults:

* ``SUPERLINK_PORT`` (8000): the SuperLink's only port. Flower binds 127.0.0.1 by
  default; a server that devices reach binds ``host="0.0.0.0"``. The SuperLink
  reaches its own Runtime API on 127.0.0.1, so its certificate must name
  127.0.0.1 (``fedser.common.certs`` always adds it).
* ``SUPERNODE_RUNTIME_PORT`` (9094): each SuperNode's local Runtime API. Two
  SuperNodes on one machine need two different ports.

The Control API shares the SuperLink's port and, in Flower's open-source
SuperLink, authenticates no one: whoever reaches the port and trusts its
certificate can submit runs or register SuperNode keys. Restrict who reaches it
(firewall, VPN, a reverse proxy that only passes ``/v1/fleet/`` to devices).

Flower finds ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp``
through ``PATH``; :func:`flower_env` puts this interpreter's ``bin`` folder first
so nothing needs an activated virtual environment. It also turns off Flower's
telemetry and update check, which would otherwise call out to the internet.
"""
from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from .certs import CertPaths
from .errors import ConfigError, FedserError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Flower's own defaults (flwr.supercore.constant); a test keeps them in step.
SUPERLINK_PORT = 8000
SUPERNODE_RUNTIME_PORT = 9094
DEFAULT_CONNECTION = "fedser"

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
    certs: CertPaths | None = None,
    insecure: bool = False,
    enable_supernode_auth: bool = False,
    database: str | Path | None = None,
) -> list[str]:
    """argv for ``flower-superlink``.

    TLS needs ``certs``; ``insecure=True`` is the explicit plain-text opt-out.
    ``database`` keeps the SuperLink's state (runs, registered nodes) in a SQLite
    file instead of memory. Runtime dependency installation (``uv sync`` of the
    app's dependencies into a fresh environment per run) is always disabled: the
    app's code and dependencies are installed with fedser.
    """
    _check_port(port)
    if insecure == (certs is not None):
        raise ConfigError("superlink: pass certs for TLS, or insecure=True without certs")
    if enable_supernode_auth and insecure:
        raise ConfigError("superlink: SuperNode authentication requires TLS (certs)")
    argv = [executable("flower-superlink"), "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]
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
    log_path: str | Path,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> LoggedProcess:
    """Start ``argv`` in its own process group, stdout and stderr appended to ``log_path``.

    The own group lets :func:`stop_process` stop the SuperNode's helpers
    (SuperExec, ClientApp processes) together with it.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = LoggedProcess(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else flower_env(), cwd=cwd,
            start_new_session=True,
        )
    proc.log_path = log_path
    return proc


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


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM the process group of ``proc``, SIGKILL it after ``timeout``; returns the exit code.

    ``proc`` must lead its own group (as :func:`start_process` makes it).
    """
    pgid = proc.pid
    if proc.poll() is None:
        _signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            proc.wait()
    # Helpers that outlive the leader (a ClientApp still writing) get a moment, then go.
    deadline = time.monotonic() + min(timeout, 2.0)
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)
    return proc.returncode


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
