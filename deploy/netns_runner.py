#!/usr/bin/env python3
"""Run the docker-compose test bed without a container engine: one network namespace per service.

Where Docker is missing (CI machines, this project's build hosts) but root is available, this
runner brings up the services of the same compose files as separate network hosts:

* a Linux bridge and, per service, a network namespace with a veth pair, its own IP address and
  loopback up; ``/etc/netns/<ns>/hosts`` maps every service name to its address, so
  ``superlink:8000`` resolves as on a compose network;
* per service, a private mount namespace whose root is assembled on a tmpfs: the host's
  directories are bind-mounted in, except along the paths of the service's volumes and
  secrets, which are real folders holding exactly those mounts (``/run/secrets/<name>``,
  ``/data``, ...), and a fresh ``/tmp``. Nothing is created on the host outside the runner's
  work folder;
* the service's ``command`` and ``environment`` (after compose's ``${VAR:-default}``
  interpolation and overlay merging), run as its ``user`` after ``chroot``, with this Python
  environment's ``bin`` first on ``PATH`` (where the image has its virtual environment).

Docker's isolation beyond network and mounts (PID namespace, cgroups, ``read_only``,
``cap_drop``, ``restart``) is not reproduced: the runner proves the topology, the commands,
the secrets and the volumes, and lets fault drills cut a link (``ip link set ... down``),
pause a service (SIGSTOP) or kill one (every process in its namespace).

    python deploy/netns_runner.py up -f deploy/docker-compose.yml [-f overlay.yml] --workdir DIR
    python deploy/netns_runner.py config -f deploy/docker-compose.yml     # merged, interpolated
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import secrets as _secrets
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import yaml

SUBNET = "10.77.0"          # a bridge without a host address: no route on the host, no clash between beds
FIRST_HOST = 10

_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class ComposeError(ValueError):
    """A compose file this runner cannot read (or that compose itself would refuse)."""


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
    source: str      # host path
    target: str      # path inside the service
    read_only: bool = False


@dataclass
class Service:
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


def services_from(doc: dict) -> dict[str, Service]:
    """The runnable form of every service; ``ComposeError`` for what compose would refuse too."""
    project_dir = Path(doc["project_dir"])
    problems = []
    out = {}
    for name, svc in doc["services"].items():
        command = svc.get("command")
        if isinstance(command, str):
            command = shlex.split(command)
        if not command:
            problems.append(f"service {name}: no command (the runner cannot read an image's default)")
            continue
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
            mounts.append(Mount(_host_path(spec["file"], project_dir), target, True))
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


# ---------------------------------------------------------------- inside the namespace (stage 2)

_libc = None


def _mount(source: str, target: str, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 1, 32, 4096, 16384


def _package_roots() -> list[str]:
    """Folders that hold the installed fedser packages (the checkout itself for an editable install)."""
    import importlib.util

    roots = []
    for name in ("fedser.common", "fedser.client", "fedser.server"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            roots.append(str(Path(spec.origin).resolve().parents[1]))
    return roots


def _build_root(root: str, mounts: list[dict], expose: list[str], tmpfs: list[str]) -> None:
    """Assemble the service's file system under ``root`` (see the module docstring)."""
    _mount("tmpfs", root, "tmpfs", 0, "mode=0755")
    targets = {m["target"].rstrip("/") or "/" for m in mounts} | set(expose) | {"/tmp", "/run", *tmpfs}
    spine = {"/"}
    for t in targets:
        p = Path(t)
        spine.update(str(a) for a in p.parents)
    for d in sorted(spine, key=lambda s: s.count("/")):
        dst = root + d if d != "/" else root
        os.makedirs(dst, exist_ok=True)
        try:
            mode = os.stat(d).st_mode
        except FileNotFoundError:
            continue
        if not mode & stat.S_IXOTH:   # a folder others may not enter stays closed: only the spine shows
            continue
        for entry in os.scandir(d):
            path = entry.path
            if path in spine or path in targets:
                continue
            dst_entry = root + path
            if entry.is_symlink():
                os.symlink(os.readlink(path), dst_entry)
            elif entry.is_dir():
                os.mkdir(dst_entry)
                _mount(path, dst_entry, None, MS_BIND | MS_REC)
            else:
                Path(dst_entry).touch()
                _mount(path, dst_entry, None, MS_BIND)
    for t in {"/tmp", "/run", *tmpfs}:
        os.makedirs(root + t, exist_ok=True)
        _mount("tmpfs", root + t, "tmpfs", 0, "mode=1777" if t == "/tmp" else "mode=0755")
    # After the tmpfs mounts, so an environment that lives under /tmp is not hidden by them.
    for t in sorted(expose, key=lambda s: s.count("/")):
        os.makedirs(root + t, exist_ok=True)
        _mount(t, root + t, None, MS_BIND | MS_REC)
    for m in mounts:
        dst = root + m["target"]
        if os.path.isdir(m["source"]):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            Path(dst).touch()
        _mount(m["source"], dst, None, MS_BIND | MS_REC)
        if m["read_only"]:
            _mount(m["source"], dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def _exec_service(spec_path: str) -> None:
    """Stage 2, run by ``ip netns exec NS unshare --mount``: build the root, drop to the user, exec."""
    spec = json.loads(Path(spec_path).read_text())
    root = spec["root"]
    _build_root(root, spec["mounts"], spec["expose"], spec["tmpfs"])
    socket.sethostname(spec["hostname"])   # own UTS namespace: the service name, as a container's
    os.chroot(root)
    uid, gid = spec["uid"], spec["gid"]
    if gid is not None:
        os.setgroups([])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
    os.chdir(spec["working_dir"])
    argv = spec["argv"]
    os.execvpe(argv[0], argv, spec["env"])


# ---------------------------------------------------------------- the bed (stage 1, on the host)

def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def netns_available() -> str | None:
    """None when this machine can run the bed; otherwise why not."""
    if os.geteuid() != 0:
        return "the netns runner needs root (ip netns, mount, chroot)"
    probe = f"fedser-probe-{_secrets.token_hex(3)}"
    try:
        done = _run("ip", "netns", "add", probe, check=False)
        if done.returncode != 0:
            return f"ip netns add failed: {done.stderr.strip()}"
        done = _run("ip", "netns", "exec", probe, "unshare", "--mount", "--uts", "--propagation", "private", "true",
                    check=False)
        if done.returncode != 0:
            return f"ip netns exec ... unshare --mount failed: {done.stderr.strip()}"
        return None
    except FileNotFoundError as exc:
        return f"{exc.filename} not found"
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True)


def _parse_user(user: str | None) -> tuple[int | None, int | None]:
    if user is None:
        return None, None
    u, _, g = user.partition(":")
    if not u.isdigit() or (g and not g.isdigit()):
        raise ComposeError(f"user {user!r}: the runner needs numeric UID[:GID] (no passwd inside)")
    return int(u), int(g) if g else int(u)


class NetnsBed:
    """The services of a compose project, each in a network namespace of its own.

    Use as a context manager, or call :meth:`down` in a ``finally``: it removes every
    process, namespace, link and ``/etc/netns`` folder it made, even after a failure.
    """

    def __init__(self, files: list[str | Path], workdir: str | Path, env: Mapping[str, str] | None = None,
                 prefix: str = "fsr"):
        self.env = dict(os.environ if env is None else env)
        self.doc = load_compose(files, self.env)
        self.services = services_from(self.doc)
        self.order = start_order(self.services)
        self.workdir = Path(workdir).resolve()
        self.id = _secrets.token_hex(3)
        self.prefix = f"{prefix}{self.id}"            # <= 9 characters: interface names stop at 15
        self.bridge = f"{self.prefix}br"
        self.ns = {name: f"{self.prefix}-{name}" for name in self.services}
        self.ip = {name: f"{SUBNET}.{FIRST_HOST + i}" for i, name in enumerate(self.services)}
        self.veth = {name: f"{self.prefix}v{i}" for i, name in enumerate(self.services)}
        self.procs: dict[str, subprocess.Popen] = {}
        self._network_up = False
        self.bin_dir = str(Path(sys.executable).parent)

    # -------------------------------------------------- network

    def _create_network(self) -> None:
        self._network_up = True   # from here on, down() cleans up whatever part exists
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "link", "set", self.bridge, "up")
        hosts = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n" + "".join(
            f"{self.ip[n]} {n}\n" for n in self.services)
        for name in self.services:
            ns, veth, peer = self.ns[name], self.veth[name], self.veth[name] + "p"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
            _run("ip", "link", "set", veth, "master", self.bridge)
            _run("ip", "link", "set", veth, "up")
            _run("ip", "link", "set", peer, "netns", ns)
            _run("ip", "-n", ns, "link", "set", peer, "name", "eth0")
            _run("ip", "-n", ns, "addr", "add", f"{self.ip[name]}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)
            (etc / "hostname").write_text(name + "\n")

    def link(self, name: str, up: bool) -> None:
        """Cut (``up=False``) or restore a service's network link, as a pulled cable would."""
        _run("ip", "link", "set", self.veth[name], "up" if up else "down")

    # -------------------------------------------------- processes

    def _spec(self, name: str, argv: list[str], tag: str) -> Path:
        svc = self.services[name]
        uid, gid = _parse_user(svc.user)
        root = self.workdir / "roots" / f"{name}-{tag}"
        root.mkdir(parents=True, exist_ok=True)
        for m in svc.mounts:
            if not Path(m.source).exists():
                raise ComposeError(f"service {name}: {m.source} (mounted at {m.target}) does not exist; "
                                   "run `fedser testbed prepare` first")
        mounts = [m.__dict__ for m in svc.mounts] + self._account_files(name, uid, gid)
        env = {"PATH": f"{self.bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOSTNAME": name, **svc.environment}
        # The runner's stand-in for the image's virtual environment, the interpreter it links to and
        # the source tree of an editable install; they stay visible even under a fresh /tmp.
        expose = sorted({str(Path(sys.base_prefix).resolve()), str(Path(sys.prefix).resolve()),
                         *_package_roots()})
        spec = {"root": str(root), "mounts": mounts, "expose": expose,
                "tmpfs": svc.tmpfs, "hostname": name, "uid": uid, "gid": gid, "working_dir": svc.working_dir,
                "argv": argv, "env": env}
        path = self.workdir / "specs" / f"{name}-{tag}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(spec))
        return path

    def _account_files(self, name: str, uid: int | None, gid: int | None) -> list[dict]:
        """``/etc/passwd`` and ``/etc/group`` naming the service's user, as the image's ``useradd`` does.

        Without an entry, ``getpass.getuser()`` (torch, Flower) fails for an unknown UID.
        """
        out = []
        for fname, ident, line in (("passwd", uid, f"fedser:x:{uid}:{gid}:fedser:/tmp:/usr/sbin/nologin"),
                                   ("group", gid, f"fedser:x:{gid}:")):
            if ident is None:
                continue
            host = Path("/etc") / fname
            text = host.read_text() if host.is_file() else ""
            if any(row.split(":")[2:3] == [str(ident)] for row in text.splitlines()):
                continue
            path = self.workdir / "etc" / name / fname
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line + "\n")
            out.append({"source": str(path), "target": f"/etc/{fname}", "read_only": True})
        return out

    def _wrap(self, name: str, spec: Path) -> list[str]:
        return ["ip", "netns", "exec", self.ns[name], "unshare", "--mount", "--uts", "--propagation", "private",
                sys.executable, str(Path(__file__).resolve()), "_exec", str(spec)]

    def start(self, name: str, argv: list[str] | None = None) -> subprocess.Popen:
        """Start service ``name`` (its compose command, or ``argv``); output appends to ``logs/<name>.log``."""
        if name in self.procs and self.procs[name].poll() is None:
            raise RuntimeError(f"service {name} is already running")
        svc = self.services[name]
        spec = self._spec(name, argv or svc.command, "main")
        log = self.log_path(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as fh:
            proc = subprocess.Popen(self._wrap(name, spec), stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def exec(self, name: str, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run ``argv`` inside service ``name``'s namespace and file system (``docker compose exec``)."""
        tag = f"exec{_secrets.token_hex(3)}"
        spec = self._spec(name, argv, tag)
        out_path, err_path = (self.workdir / "specs" / f"{name}-{tag}.{s}" for s in ("out", "err"))
        # Files, not pipes: helpers the command leaves behind (Flower's SuperExec) would hold a
        # pipe open after the command itself has exited.
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.Popen(self._wrap(name, spec), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = 124
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        stdout, stderr = (p.read_text(errors="replace") for p in (out_path, err_path))
        for path in (spec, out_path, err_path):
            path.unlink(missing_ok=True)
        if code == 124:
            stderr += f"\ntimed out after {timeout} s"
        return subprocess.CompletedProcess(argv, code, stdout, stderr)

    def healthy(self, name: str) -> bool:
        check = self.services[name].healthcheck
        if check is None:
            return self.running(name)
        return self.exec(name, check, timeout=10).returncode == 0

    def wait_healthy(self, name: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy(name):
            if not self.running(name):
                raise RuntimeError(f"service {name} exited ({self.procs[name].returncode}) before it was healthy; "
                                   f"its log ends:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"service {name} not healthy after {timeout:.0f} s; its log ends:\n"
                                   f"{self.log_tail(name)}")
            time.sleep(1.0)

    def up(self, names: list[str] | None = None, timeout: float = 180.0) -> None:
        """Create the network and start services in dependency order, honouring ``service_healthy``."""
        if not self._network_up:
            self._create_network()
        wanted = [n for n in self.order if names is None or n in names]
        for name in wanted:
            for dep, condition in self.services[name].depends_on.items():
                if condition == "service_healthy":
                    self.wait_healthy(dep, timeout)
            self.start(name)

    def running(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def pids(self, name: str) -> list[int]:
        """Every live process of the service: those in its network namespace."""
        done = _run("ip", "netns", "pids", self.ns[name], check=False)
        return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []

    def signal(self, name: str, sig: int) -> int:
        pids = self.pids(name)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return len(pids)

    def kill(self, name: str) -> int:
        """SIGKILL every process of the service (``docker compose kill``); returns how many."""
        n = self.signal(name, signal.SIGKILL)
        self._reap(name, 10.0)
        return n

    def stop(self, name: str, timeout: float = 15.0) -> None:
        """SIGTERM the service, SIGKILL what is left after ``timeout`` (``docker compose stop``)."""
        self.signal(name, signal.SIGTERM)
        self.signal(name, signal.SIGCONT)
        deadline = time.monotonic() + timeout
        while self.pids(name) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.kill(name)

    def _reap(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.pids(name) and time.monotonic() < deadline:
            time.sleep(0.1)
        proc = self.procs.get(name)
        if proc is not None:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass

    def wait(self, name: str, timeout: float) -> int:
        """Wait for the service's command to exit; returns its exit code."""
        return self.procs[name].wait(timeout=timeout)

    def log_path(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def log_tail(self, name: str, n: int = 40) -> str:
        path = self.log_path(name)
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def down(self) -> None:
        """Stop every service and remove the namespaces, links, bridge and /etc/netns folders."""
        for name in reversed(self.order):
            if name in self.ns and self.pids(name):
                self.stop(name, timeout=5.0)
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
        if not self._network_up:
            return
        for name in self.services:
            subprocess.run(["ip", "link", "delete", self.veth[name]], capture_output=True)
            subprocess.run(["ip", "netns", "delete", self.ns[name]], capture_output=True)
            etc = Path("/etc/netns") / self.ns[name]
            for f in ("hosts", "hostname"):
                (etc / f).unlink(missing_ok=True)
            try:
                etc.rmdir()
            except OSError:
                pass
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        try:
            Path("/etc/netns").rmdir()   # only if no other bed (or tool) uses it
        except OSError:
            pass
        self._network_up = False

    def __enter__(self) -> "NetnsBed":
        return self

    def __exit__(self, *exc) -> None:
        self.down()


# ---------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netns_runner.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("up", "config"):
        s = sub.add_parser(name)
        s.add_argument("-f", "--file", action="append", required=True, help="compose file (repeat for overlays)")
        if name == "up":
            s.add_argument("--workdir", required=True, help="logs and per-service roots go here")
            s.add_argument("--wait-for", default="serverapp",
                           help="stop everything once this service exits (default serverapp: the run is over)")
            s.add_argument("--timeout", type=float, default=3600.0)
    ex = sub.add_parser("_exec", help=argparse.SUPPRESS)
    ex.add_argument("spec")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "_exec":
        _exec_service(args.spec)
        return 127  # not reached: exec replaced this process
    if args.command == "config":
        print(yaml.safe_dump(load_compose(args.file), sort_keys=False))
        return 0
    why = netns_available()
    if why:
        print(f"netns_runner: {why}", file=sys.stderr)
        return 2
    bed = NetnsBed(args.file, args.workdir)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        bed.up()
        print(f"{len(bed.services)} services up: "
              + ", ".join(f"{n} {bed.ip[n]}" for n in bed.order) + f"; logs in {bed.workdir / 'logs'}", flush=True)
        code = bed.wait(args.wait_for, args.timeout)
        print(f"{args.wait_for} exited with {code}", flush=True)
        if code != 0:
            print(bed.log_tail(args.wait_for), file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 130
    except (ComposeError, RuntimeError, TimeoutError) as exc:
        print(f"netns_runner: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bed.down()


if __name__ == "__main__":
    sys.exit(main())
