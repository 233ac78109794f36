"""The shapes Flower's command lines take, shared by the device agent and the server: ports,
``HOST:PORT`` addresses and ``--node-config`` / ``--run-config`` strings.

Ports (Flower 1.39, the pinned line: its Fleet API is gRPC):

* ``FLEET_PORT`` (9092): the SuperLink's Fleet API, gRPC over TLS; SuperNodes (devices)
  connect here and nowhere else. A server that devices reach binds it on ``0.0.0.0``.
* ``SUPERLINK_PORT`` (8000): the SuperLink's Control and Runtime APIs (HTTP(S)). The
  Control API authenticates no one in Flower's open-source SuperLink, so ``fedser-server
  start`` binds it on 127.0.0.1 only (see ``fedser.server.flower_cli``).
* ``SUPERNODE_RUNTIME_PORT`` (9094): each SuperNode's local Runtime API. Two
  SuperNodes on one machine need two different ports.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

from .errors import ConfigError

# Flower's own defaults (flwr.common.constant, flwr.supercore.constant); a test keeps them in step.
FLEET_PORT = 9092
SUPERLINK_PORT = 8000
SUPERNODE_RUNTIME_PORT = 9094

_CONFIG_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def check_port(port: int) -> None:
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"port {port!r}: expected an integer in 1..65535")


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
