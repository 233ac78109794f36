"""The namespace sandbox: a compose project's services as separate hosts, without a container engine.

Where Docker is missing (CI machines, this project's build hosts) but root is available, the
services of the compose files (as ``compose.py`` reads them) run as separate network hosts:

* a Linux bridge and, per service, a network namespace with a veth pair, its own IP address and
  loopback up; ``/etc/netns/<ns>/hosts`` maps every service name to its address, so
  ``superlink:8000`` resolves as on a compose network;
* per service, a private mount namespace whose root is assembled on a tmpfs: the host's
  directories are bind-mounted in, except along the paths of the service's volumes and
  secrets, which are real folders holding exactly those mounts (``/run/secrets/<name>``,
  ``/data``, ...), and a fresh ``/tmp``. Nothing is created on the host outside the bed's
  work folder;
* the service's ``command`` and ``environment`` (after compose's ``${VAR:-default}``
  interpolation and overlay merging), run as its ``user`` after ``chroot``, with this Python
  environment's ``bin`` first on ``PATH`` (where the image has its virtual environment).

Docker's isolation beyond network and mounts (PID namespace, cgroups, ``read_only``,
``cap_drop``, ``restart``) is not reproduced: the sandbox proves the topology, the commands,
the secrets and the volumes, and lets fault drills cut a link (``ip link set ... down``),
pause a service (SIGSTOP) or kill one (every process in its namespace).

A service starts in two stages: :class:`NetnsBed` (stage 1, on the host) writes the service's
spec and runs this file again inside the service's namespaces (``python netns.py _exec SPEC``),
where stage 2 builds the root, drops to the user and execs the command. People run the
sandbox through ``netns_runner.py``.
"""
from __future__ import annotations

import ctypes
import json
import os
import secrets as _secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from compose import ComposeError, Service, load_compose, parse_user, services_from, start_order

SUBNET = "10.77.0"          # a bridge without a host address: no route on the host, no clash between beds
FIRST_HOST = 10


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


class NetnsBed:
    """The services of a compose project, each in a network namespace of its own.

    Use as a context manager, or call :meth:`down` in a ``finally``: it removes every
    process, namespace, link and ``/etc/netns`` folder it made, even after a failure.
    """

    def __init__(self, files: list[str | Path], workdir: str | Path, env: Mapping[str, str] | None = None,
                 prefix: str = "fsr"):
        self.env = dict(os.environ if env is None else env)
        self.doc = load_compose(files, self.env)
        self.services: dict[str, Service] = services_from(self.doc)
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
        uid, gid = parse_user(svc.user)
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
        """Stage 2's command line: this file again, inside the service's network, mount and UTS namespaces."""
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


if __name__ == "__main__":
    # Stage 2 only: NetnsBed runs this file inside a service's namespaces (see NetnsBed._wrap).
    if len(sys.argv) != 3 or sys.argv[1] != "_exec":
        sys.exit("usage: netns.py _exec SPEC (run by NetnsBed; people run netns_runner.py)")
    _exec_service(sys.argv[2])
