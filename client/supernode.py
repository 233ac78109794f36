"""The device's ``flower-supernode``: its command line and how a crowd of them shares one machine.

Topology of one device (Flower 1.39)::

    flower-supernode --superlink H:9092 --port 9094
      └─ flower-superexec                           Runtime API for the ClientApp on
           └─ flwr-clientapp (per message)          127.0.0.1:9094, plain HTTP, loopback only
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from fedser.common.errors import ConfigError
from fedser.common.flower_args import SUPERNODE_RUNTIME_PORT, check_port, format_config
from fedser.common.processes import executable

# Flower's exit codes are logged ("Exit Code: 305"); the process itself exits 1.
# 305: a SuperNode could not connect (untrusted certificate, unregistered key).
SUPERNODE_CONNECTION_ERROR = 305


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
    check_port(runtime_port)
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
