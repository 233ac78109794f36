"""Start, watch and stop process trees: the Flower processes of a device agent, a server or a demo.

Every process tree :func:`start_process` starts runs in a session of its own, carries a tag in its
environment (``TREE_VAR``) and, started from the main thread, ends when its launcher ends
(:func:`die_with_parent`). :func:`stop_processes` stops whole trees at once, helpers that Flower
detached into sessions of their own included.

Flower finds ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` through ``PATH``;
:func:`flower_env` puts this interpreter's ``bin`` folder first so nothing needs an activated
virtual environment. It also turns off Flower's telemetry and update check, which would
otherwise call out to the internet.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Mapping

from .errors import FedserError

# Environment variable that marks every process of a tree :func:`start_process` started.
TREE_VAR = "FEDSER_PROCESS_TREE"

# Flower's exit codes are logged ("Exit Code: 305"); the process itself exits 1.
_EXIT_CODE_LINE = re.compile(r"Exit Code: (\d+)")


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
