"""Read docker-compose files the way ``docker compose`` does, for the keys the test bed uses.

The network-namespace sandbox (``netns.py``) runs compose projects on machines without a
container engine, and the deploy tests hold the compose files to the test bed's rules; both
need the files exactly as compose would see them: variables interpolated, overlays merged,
volumes and secrets resolved to host paths, start order from ``depends_on``. Kept apart from
the sandbox so reading and checking a project needs neither root nor namespaces.

    python deploy/netns_runner.py config -f deploy/docker-compose.yml     # merged, interpolated
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import yaml

_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class ComposeError(ValueError):
    """A compose file this module cannot read (or that compose itself would refuse)."""


# ---------------------------------------------------------------- compose files

def interpolate(value, env: Mapping[str, str]):
    """Compose's variable substitution: ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?message}``, ``$$`` for a literal ``$``; applied to every string in ``value``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        current = env.get(name)
        if op == ":-":
            return current if current else interpolate(arg, env)
        if op == "-":
            return current if current is not None else interpolate(arg, env)
        if op in (":?", "?"):
            if (op == ":?" and not current) or current is None:
                raise ComposeError(f"variable {name} is required: {arg}")
            return current
        return current or ""

    return _VAR.sub(sub, value)


def _env_dict(value) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, list):
        out = {}
        for item in value:
            k, _, v = str(item).partition("=")
            out[k] = v
        return out
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def _volume_target(v) -> str:
    if isinstance(v, dict):
        return str(v["target"])
    parts = str(v).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def _secret_source(s) -> str:
    return str(s["source"]) if isinstance(s, dict) else str(s)


def merge_service(base: dict, over: dict) -> dict:
    """Merge one service of an overlay onto the base the way ``docker compose -f a -f b`` does
    for the keys the test bed uses: mappings merge, ``command``/``entrypoint``/``healthcheck.test``
    replace, ``environment`` merges by name, ``volumes`` by target, ``secrets`` by source."""
    out = dict(base)
    for key, value in over.items():
        if key == "environment":
            out[key] = {**_env_dict(base.get(key)), **_env_dict(value)}
        elif key == "volumes":
            merged = {_volume_target(v): v for v in base.get(key, [])}
            merged.update({_volume_target(v): v for v in value})
            out[key] = list(merged.values())
        elif key == "secrets":
            merged = {_secret_source(s): s for s in base.get(key, [])}
            merged.update({_secret_source(s): s for s in value})
            out[key] = list(merged.values())
        elif isinstance(value, dict) and isinstance(base.get(key), dict) and key not in ("healthcheck",):
            out[key] = {**base[key], **value}
        else:
            out[key] = value
    return out


def load_compose(files: list[str | Path], env: Mapping[str, str] | None = None) -> dict:
    """Read compose files (base first, overlays after), interpolate and merge them.

    Relative paths resolve against the first file's folder (compose's project directory),
    as ``docker compose`` resolves them. Returns the merged document.
    """
    if not files:
        raise ComposeError("no compose file given")
    env = dict(os.environ if env is None else env)
    project_dir = Path(files[0]).resolve().parent
    merged: dict = {"services": {}, "secrets": {}, "volumes": {}}
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ComposeError(f"{path}: no such compose file")
        doc = yaml.safe_load(path.read_text()) or {}
        if not isinstance(doc, dict) or not isinstance(doc.get("services", {}), dict):
            raise ComposeError(f"{path}: not a compose file (no services mapping)")
        doc = interpolate({k: v for k, v in doc.items() if not str(k).startswith("x-")}, env)
        for name, svc in (doc.get("services") or {}).items():
            merged["services"][name] = merge_service(merged["services"].get(name, {}), svc or {})
        for section in ("secrets", "volumes"):
            for name, spec in (doc.get(section) or {}).items():
                merged[section][name] = {**merged[section].get(name, {}), **(spec or {})}
        if "name" in doc:
            merged["name"] = doc["name"]
    merged["project_dir"] = str(project_dir)
    return merged


# ---------------------------------------------------------------- what a service needs

@dataclass(frozen=True)
class Mount:
    """A bind mount of a service: a volume, or a secret under ``/run/secrets``."""

    source: str      # host path
    target: str      # path inside the service
    read_only: bool = False
    secret: str | None = None   # the secret's name, for a secret


@dataclass
class Service:
    """A compose service in the form the sandbox runs it: argv, environment, user and mounts."""

    name: str
    command: list[str]
    environment: dict[str, str]
    user: str | None
    mounts: list[Mount]
    depends_on: dict[str, str]          # service -> condition
    healthcheck: list[str] | None       # argv
    working_dir: str = "/"
    tmpfs: list[str] = field(default_factory=list)


def _host_path(text: str, project_dir: Path) -> str:
    p = Path(text).expanduser()
    return str(p if p.is_absolute() else (project_dir / p).resolve())


def service_mounts(name: str, svc: dict, doc: dict, problems: list[str]) -> list[Mount]:
    """The bind mounts of service ``name`` (its volumes, then its secrets), host paths resolved
    against the project folder; what is not a bind mount or not declared goes to ``problems``."""
    project_dir = Path(doc["project_dir"])
    mounts = []
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            src, tgt, ro = v.get("source"), v["target"], bool(v.get("read_only"))
        else:
            parts = str(v).split(":")
            src, tgt = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
        if src is None or not (src.startswith((".", "/", "~")) or "/" in src):
            problems.append(f"service {name}: volume {v!r} is not a bind mount (named volumes: use a folder)")
            continue
        mounts.append(Mount(_host_path(src, project_dir), str(tgt), ro))
    for s in svc.get("secrets", []):
        src = _secret_source(s)
        target = s.get("target", src) if isinstance(s, dict) else src
        spec = doc["secrets"].get(src)
        if spec is None or "file" not in spec:
            problems.append(f"service {name}: secret {src!r} is not declared with a file")
            continue
        target = target if target.startswith("/") else f"/run/secrets/{target}"
        mounts.append(Mount(_host_path(spec["file"], project_dir), target, True, secret=src))
    return mounts


def services_from(doc: dict) -> dict[str, Service]:
    """The runnable form of every service; ``ComposeError`` for what compose would refuse too."""
    problems = []
    out = {}
    for name, svc in doc["services"].items():
        command = svc.get("command")
        if isinstance(command, str):
            command = shlex.split(command)
        if not command:
            problems.append(f"service {name}: no command (the runner cannot read an image's default)")
            continue
        mounts = service_mounts(name, svc, doc, problems)
        hc = svc.get("healthcheck") or {}
        test = hc.get("test")
        if isinstance(test, list) and test and test[0] == "CMD":
            health = [str(x) for x in test[1:]]
        elif isinstance(test, list) and test and test[0] == "CMD-SHELL":
            health = ["/bin/sh", "-c", str(test[1])]
        elif isinstance(test, str):
            health = ["/bin/sh", "-c", test]
        else:
            health = None
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: "service_started" for d in deps}
        else:
            deps = {d: (c or {}).get("condition", "service_started") for d, c in deps.items()}
        out[name] = Service(name, [str(c) for c in command], _env_dict(svc.get("environment")),
                            str(svc["user"]) if svc.get("user") is not None else None, mounts, deps, health,
                            str(svc.get("working_dir", "/")), [str(t).split(":")[0] for t in svc.get("tmpfs", [])])
    for name, svc in out.items():
        for dep in svc.depends_on:
            if dep not in out:
                problems.append(f"service {name} depends on {dep!r}, which is not defined")
    if problems:
        raise ComposeError("; ".join(problems))
    return out


def start_order(services: Mapping[str, Service]) -> list[str]:
    """Service names with every ``depends_on`` before its dependant; ``ComposeError`` on a cycle."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise ComposeError(f"depends_on cycle: {' -> '.join(path + (name,))}")
        for dep in services[name].depends_on:
            visit(dep, path + (name,))
        order.append(name)

    for name in services:
        visit(name, ())
    return order


def parse_user(user: str | None) -> tuple[int | None, int | None]:
    """A service's ``user:`` as (UID, GID); the GID defaults to the UID, as ``docker run -u`` does."""
    if user is None:
        return None, None
    u, _, g = user.partition(":")
    if not u.isdigit() or (g and not g.isdigit()):
        raise ComposeError(f"user {user!r}: the runner needs numeric UID[:GID] (no passwd inside)")
    return int(u), int(g) if g else int(u)
