"""Flower Deployment Engine transport: SuperLink + SuperNodes over TLS on localhost.

The slow tests start real ``flower-superlink`` / ``flower-supernode`` processes
on free ports and run the toy app in ``tests/e2e/toyapp`` (the server sends an
array, every client adds one and replies with metrics; the server writes what it
saw to a JSON file named in the run config). The fast tests check the argv and
config strings ``fedser.common.flower_args`` builds.
"""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedser.common import flower_args, processes
from fedser.client import supernode
from fedser.server import flower_cli
from fedser.common.certs import CertPaths, generate_ca_and_server_cert, generate_node_keypair
from fedser.common.errors import ConfigError, FedserError

# Flower's own imports raise these; they say nothing about fedser.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*GitWildMatchPattern:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:'click.utils:DeprecationWarning"),
]

TOYAPP = Path(__file__).parent / "toyapp"
HOST = "127.0.0.1"


@dataclass
class Deployment:
    """One SuperLink and the SuperNodes started against it, all stopped at teardown."""

    root: Path
    certs: CertPaths
    env: dict
    port: int = 0          # Control and Runtime APIs (HTTP(S)): the flwr CLI
    fleet_port: int = 0    # Fleet API (gRPC): the SuperNodes
    link: processes.LoggedProcess | None = None
    nodes: list = field(default_factory=list)
    startup_s: float = 0.0   # until the SuperLink's port accepted connections

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def fleet_address(self) -> str:
        return f"{HOST}:{self.fleet_port}"

    def start_link(self, **kwargs) -> None:
        self.port, self.fleet_port = processes.free_port(HOST), processes.free_port(HOST)
        argv = flower_cli.superlink_command(host=HOST, port=self.port, fleet_port=self.fleet_port, certs=self.certs,
                                        **kwargs)
        self.link = processes.start_process(argv, self.root / "superlink.log", env=self.env)
        self.startup_s = processes.wait_for_port(HOST, self.port, timeout=30, process=self.link)
        processes.wait_for_port(HOST, self.fleet_port, timeout=30, process=self.link)
        flower_cli.write_connection(
            self.root / "flwr", flower_cli.SuperLinkConnection(self.address, root_cert=str(self.certs.ca_cert))
        )

    def start_node(self, name: str, node_config=None, root_cert=None, auth_key=None) -> processes.LoggedProcess:
        argv = supernode.supernode_command(
            self.fleet_address, node_config, root_cert=root_cert or self.certs.ca_cert, auth_key=auth_key,
            runtime_port=processes.free_port(HOST), max_wait_time=20,
        )
        proc = processes.start_process(argv, self.root / f"{name}.log", env=self.env)
        self.nodes.append(proc)
        return proc

    def wait_online(self, n: int, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            online = [x for x in flower_cli.list_nodes(env=self.env) if x.get("status") == "online"]
            if len(online) >= n or time.monotonic() > deadline:
                return online
            time.sleep(0.5)

    def stop(self) -> None:
        for proc in [*self.nodes, self.link]:
            if proc is not None:
                processes.stop_process(proc, timeout=10)


def _deployment(root: Path) -> Deployment:
    root.mkdir(parents=True, exist_ok=True)
    certs = generate_ca_and_server_cert(root / "tls")
    return Deployment(root=root, certs=certs, env=processes.flower_env(flwr_home=root / "flwr"))


def _exit_code(proc: processes.LoggedProcess, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # still running
        return None


@pytest.fixture(scope="module")
def tls_link(tmp_path_factory):
    """A TLS SuperLink without node authentication, shared by the tests below."""
    dep = _deployment(tmp_path_factory.mktemp("tls"))
    dep.start_link()
    yield dep
    dep.stop()


# ---------------------------------------------------------------- slow: real processes

@pytest.mark.slow
def test_two_supernodes_finish_two_rounds_over_tls(tls_link, tmp_path):
    # Prepare
    dep = tls_link
    result = tmp_path / "result dir" / "result.json"
    result.parent.mkdir()
    configs = [
        {"partition-id": i, "name": f"device {i}", "data-dir": f"/tmp/my data/{i}", "ratio": 0.25, "gpu": False}
        for i in (0, 1)
    ]
    nodes = [dep.start_node(f"node{i}", cfg) for i, cfg in enumerate(configs)]
    assert len(dep.wait_online(2)) == 2

    # Execute
    run_id = flower_cli.submit_run(TOYAPP, run_config={"result-path": str(result)}, env=dep.env)
    status = flower_cli.wait_for_run(run_id, env=dep.env, timeout=60, poll=1.0)

    # Assert
    assert status.succeeded, (status, flower_cli.run_logs(run_id, env=dep.env))
    report = json.loads(result.read_text())
    assert len(report["nodes"]) == 2
    assert [sorted(e["node"] for e in r) for r in report["rounds"]] == [report["nodes"]] * 2
    assert all(e["w"] == [1.0] * 4 for e in report["rounds"][0])
    assert all(e["w"] == [2.0] * 4 for e in report["rounds"][1])
    assert all(e["metrics"] == {"num-examples": 1, "server-round": 2, "w-sum": 8.0} for e in report["rounds"][1])
    assert report["final"] == [2.0] * 4
    # --node-config values arrive typed and unmangled; the run config reaches both sides.
    seen = sorted((e["node_config"] for e in report["rounds"][0]), key=lambda c: c["partition-id"][0])
    for cfg, got in zip(configs, seen):
        assert got == {k: [v, type(v).__name__] for k, v in cfg.items()}
    assert report["run_config"]["result-path"] == str(result)
    assert all(e["run_config"]["result-path"] == str(result) for e in report["rounds"][0])

    # Stopping a SuperNode takes its SuperExec and ClientApp helpers with it.
    for proc in nodes:
        processes.stop_process(proc)
        assert not processes._group_alive(proc.pid)
    print(f"\nSuperLink up in {dep.startup_s:.1f} s; run {run_id} finished: {status}")


def _tcp_peers(pid: int) -> set[tuple[str, int]]:
    """Remote (address, port) of every established TCP connection that process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    peers = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            remote, state, inode = cols[2], cols[3], cols[9]
            if state == "01" and inode in inodes:   # 01: ESTABLISHED
                addr, port = remote.split(":")
                peers.add((addr, int(port, 16)))
    return peers


@pytest.mark.slow
def test_supernode_traffic_is_grpc_over_tls_on_the_fleet_port(tls_link):
    # Prepare
    import socket
    import ssl

    import grpc
    from flwr.proto.fleet_pb2_grpc import FleetStub
    from flwr.proto.run_pb2 import GetRunRequest

    from fedser.client.preflight import FleetEndpointError, probe_fleet_api

    dep = tls_link
    node = dep.start_node("wire")
    assert len(dep.wait_online(1)) >= 1, node.log_tail()
    ca = Path(dep.certs.ca_cert).read_bytes()

    def handshake(port: int, context: ssl.SSLContext) -> str | None:
        with socket.create_connection((HOST, port), timeout=5) as sock, \
                context.wrap_socket(sock, server_hostname=HOST) as tls:
            return tls.selected_alpn_protocol()

    def get_run(channel) -> grpc.StatusCode:
        try:
            FleetStub(channel).GetRun(GetRunRequest(run_id=0), timeout=5)
        except grpc.RpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    trusting = ssl.create_default_context(cafile=str(dep.certs.ca_cert))
    trusting.set_alpn_protocols(["h2", "http/1.1"])

    # Execute
    peer_ports = {port for addr, port in _tcp_peers(node.pid)} & {dep.port, dep.fleet_port}
    fleet_alpn = handshake(dep.fleet_port, trusting)
    control_alpn = handshake(dep.port, trusting)
    with grpc.secure_channel(dep.fleet_address, grpc.ssl_channel_credentials(ca)) as channel:
        over_tls = get_run(channel)
    with grpc.insecure_channel(dep.fleet_address) as channel:
        plain = get_run(channel)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(dep.fleet_port, ssl.create_default_context())   # the system trust store does not know the CA
    with pytest.raises(FleetEndpointError, match="expects TLS"):
        probe_fleet_api(dep.fleet_address, insecure=True)

    # Assert: the SuperNode talks to the SuperLink on the Fleet port alone; that port is TLS carrying
    # HTTP/2 (gRPC) and its Fleet service answers a gRPC call there, while plain text gets no service.
    assert peer_ports == {dep.fleet_port}, _tcp_peers(node.pid)
    assert fleet_alpn == "h2"
    assert over_tls not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED), over_tls
    assert plain == grpc.StatusCode.UNAVAILABLE
    # The Control API is a different port and speaks HTTP/1.1, not gRPC.
    assert control_alpn != "h2"
    assert probe_fleet_api(dep.fleet_address, root_cert=dep.certs.ca_cert).reachable
    print(f"\nFleet API {dep.fleet_address}: ALPN {fleet_alpn}, GetRun over TLS -> {over_tls.name}, "
          f"plain text -> {plain.name}; Control API ALPN {control_alpn}")
    processes.stop_process(node)


@pytest.mark.slow
def test_supernode_with_a_wrong_root_certificate_is_refused(tls_link, tmp_path):
    # Prepare
    stranger_ca = generate_ca_and_server_cert(tmp_path / "stranger").ca_cert

    # Execute
    proc = tls_link.start_node("stranger", root_cert=stranger_ca)
    code = _exit_code(proc, timeout=30)

    # Assert
    assert code not in (None, 0), proc.log_tail()
    assert proc.flower_exit_code() == supernode.SUPERNODE_CONNECTION_ERROR
    assert "CERTIFICATE_VERIFY_FAILED" in proc.log_path.read_text()


@pytest.mark.slow
def test_run_with_an_undeclared_run_config_key_is_refused(tls_link):
    # Execute / Assert
    with pytest.raises(flower_cli.FlowerCommandError, match="Invalid run configuration"):
        flower_cli.submit_run(TOYAPP, run_config={"no-such-key": 1}, env=tls_link.env)


@pytest.mark.slow
def test_failing_server_app_reports_failed_status_and_its_error(tls_link):
    # Prepare: min-nodes must be an int; the toy ServerApp raises on a string.
    run_id = flower_cli.submit_run(TOYAPP, run_config={"min-nodes": "two"}, env=tls_link.env)

    # Execute
    status = flower_cli.wait_for_run(run_id, env=tls_link.env, timeout=60, poll=1.0)

    # Assert
    assert status.finished and not status.succeeded
    assert status.sub_status == "failed"
    assert "two" in status.details
    assert "ValueError" in flower_cli.run_logs(run_id, env=tls_link.env)


@pytest.mark.slow
def test_node_authentication_accepts_registered_key_and_refuses_others(tmp_path):
    # Prepare
    dep = _deployment(tmp_path)
    keys = tmp_path / "keys"
    known_key, known_pub = generate_node_keypair(keys, "known")
    unknown_key, _ = generate_node_keypair(keys, "unknown")
    result = tmp_path / "result.json"
    # The toy app is importable from the environment here (as an installed fedser
    # is), so the bundle submitted carries only its pyproject.toml.
    dep.env["PYTHONPATH"] = str(TOYAPP)
    staged = flower_cli.stage_app(TOYAPP / "pyproject.toml", tmp_path / "staged app")
    try:
        dep.start_link(enable_supernode_auth=True)
        node_id = flower_cli.register_node(known_pub, env=dep.env)

        # Execute
        known = dep.start_node("known", auth_key=known_key)
        unknown = dep.start_node("unknown", auth_key=unknown_key)
        anonymous = dep.start_node("anonymous")
        online = dep.wait_online(1)
        run_id = flower_cli.submit_run(
            staged, run_config={"result-path": str(result), "min-nodes": 1, "num-server-rounds": 1}, env=dep.env
        )
        status = flower_cli.wait_for_run(run_id, env=dep.env, timeout=60, poll=1.0)

        # Assert
        assert [int(x["node-id"]) for x in online] == [node_id]
        assert status.succeeded, (status, flower_cli.run_logs(run_id, env=dep.env))
        assert json.loads(result.read_text())["nodes"] == [node_id]
        assert known.poll() is None, known.log_tail()
        assert _exit_code(unknown, timeout=30) not in (None, 0), unknown.log_tail()
        assert unknown.flower_exit_code() == supernode.SUPERNODE_CONNECTION_ERROR
        assert "Failed to activate SuperNode" in unknown.log_path.read_text()
        assert _exit_code(anonymous, timeout=30) not in (None, 0), anonymous.log_tail()
        assert "must be registered" in anonymous.log_path.read_text()
    finally:
        dep.stop()


@pytest.mark.slow
def test_wait_for_port_reports_a_superlink_that_dies(tmp_path):
    # Prepare: certificate paths that do not exist make flower-superlink exit at once.
    missing = CertPaths(*(tmp_path / name for name in ("ca.pem", "ca.key", "server.pem", "server.key")))
    port = processes.free_port(HOST)
    proc = processes.start_process(
        flower_cli.superlink_command(host=HOST, port=port, certs=missing), tmp_path / "link.log",
        env=processes.flower_env(flwr_home=tmp_path / "flwr"),
    )

    # Execute / Assert
    try:
        with pytest.raises(FedserError, match="exited with code"):
            processes.wait_for_port(HOST, port, timeout=30, process=proc)
    finally:
        processes.stop_process(proc)


# ---------------------------------------------------------------- fast: argv and config

def test_config_string_round_trips_through_flowers_parser():
    # Prepare
    from flwr.common.config import parse_config_args

    values = {
        "partition-id": 3, "lr": 1e-05, "ratio": 0.5, "neg": -2, "on": True, "off": False,
        "path": "/data/my corpus/a=b", "quote": "it's here", "win": "C:\\data\\x",
        "double": "say \"hi\"", "both-and-backslash": "O'Brien\\data", "tab": "a\tb", "empty": "",
        "dotted.key": 7, "big": float("inf"),
    }

    # Execute
    parsed = parse_config_args([flower_args.format_config(values)])

    # Assert
    assert parsed == values
    assert {k: type(v) for k, v in parsed.items()} == {k: type(v) for k, v in values.items()}


def test_config_string_refuses_what_flower_cannot_carry():
    # Execute / Assert
    with pytest.raises(ConfigError) as err:
        flower_args.format_config({"bad key": 1, "mixed": "it's \"x\"", "list": [1, 2], "ok": 1})
    message = str(err.value)
    assert "bad key" in message and "mixed" in message and "list" in message and "ok" not in message


def test_superlink_command_requires_tls_or_explicit_insecure(tmp_path):
    # Prepare
    certs = generate_ca_and_server_cert(tmp_path)

    # Execute
    secure = flower_cli.superlink_command(host="0.0.0.0", port=9100, certs=certs, enable_supernode_auth=True,
                                      database=tmp_path / "state.db")
    plain = flower_cli.superlink_command(insecure=True)

    # Assert
    assert Path(secure[0]).name == "fedser-superlink" and Path(secure[0]).is_file()
    assert secure[secure.index("--ssl-ca-certfile") + 1] == str(certs.ca_cert.resolve())
    assert secure[secure.index("--ssl-certfile") + 1] == str(certs.server_cert.resolve())
    assert secure[secure.index("--ssl-keyfile") + 1] == str(certs.server_key.resolve())
    assert secure[secure.index("--port") + 1] == "9100" and secure[secure.index("--host") + 1] == "0.0.0.0"
    assert "--enable-supernode-auth" in secure and "--insecure" not in secure
    assert "--disable-runtime-dependency-installation" in secure
    assert secure[secure.index("--database") + 1] == str((tmp_path / "state.db").resolve())
    assert "--insecure" in plain and "--ssl-certfile" not in plain
    assert plain[plain.index("--port") + 1] == str(flower_args.SUPERLINK_PORT)
    # The Fleet API is gRPC, on its own port, on the Control API's host unless told otherwise.
    assert secure[secure.index("--fleet-api-type") + 1] == "grpc-rere"
    assert secure[secure.index("--fleet-api-address") + 1] == f"0.0.0.0:{flower_args.FLEET_PORT}"
    split = flower_cli.superlink_command(port=9100, fleet_host="::", fleet_port=9200, insecure=True,
                                     isolation="process")
    assert split[split.index("--fleet-api-address") + 1] == "[::]:9200"
    assert split[split.index("--host") + 1] == "127.0.0.1" and split[split.index("--isolation") + 1] == "process"
    with pytest.raises(ConfigError, match="two ports"):
        flower_cli.superlink_command(insecure=True, port=9100, fleet_port=9100)
    with pytest.raises(ConfigError, match="isolation"):
        flower_cli.superlink_command(insecure=True, isolation="thread")
    with pytest.raises(ConfigError):
        flower_cli.superlink_command()
    with pytest.raises(ConfigError):
        flower_cli.superlink_command(certs=certs, insecure=True)
    with pytest.raises(ConfigError):
        flower_cli.superlink_command(insecure=True, enable_supernode_auth=True)
    with pytest.raises(ConfigError):
        flower_cli.superlink_command(insecure=True, port=70000)


def test_supernode_and_run_commands_carry_paths_with_spaces_as_single_arguments(tmp_path):
    # Prepare
    ca = tmp_path / "my certs" / "ca.pem"
    key = tmp_path / "my keys" / "node"

    # Execute
    node = supernode.supernode_command("server.lan:9100", {"data-dir": "/srv/my data"}, root_cert=ca,
                                    auth_key=key, runtime_port=9200)
    run = flower_cli.run_command(tmp_path / "my app", "lab", {"rounds": 2})

    # Assert
    assert node[1:5] == ["--superlink", "server.lan:9100", "--port", "9200"]
    assert node[node.index("--root-certificates") + 1] == str(ca.resolve())
    assert node[node.index("--auth-supernode-private-key") + 1] == str(key.resolve())
    assert node[node.index("--node-config") + 1] == "data-dir='/srv/my data'"
    assert Path(run[0]).name == "flwr" and run[1:4] == ["run", str((tmp_path / "my app").resolve()), "lab"]
    assert run[run.index("--run-config") + 1] == "rounds=2" and run[-2:] == ["--format", "json"]
    with pytest.raises(ConfigError):
        supernode.supernode_command("h:1", insecure=True, root_cert=ca)


def test_connection_file_is_what_the_flwr_cli_reads(tmp_path, monkeypatch):
    # Prepare
    from flwr.cli.flower_config import read_superlink_connection

    home = tmp_path / "flwr home"
    flower_cli.write_connection(home, flower_cli.SuperLinkConnection("10.0.0.1:9100", insecure=True, name="lab"))

    # Execute
    flower_cli.write_connection(home, flower_cli.SuperLinkConnection("server.lan:9100", root_cert=str(tmp_path / "ca.pem")))
    monkeypatch.setenv("FLWR_HOME", str(home))
    default, lab = read_superlink_connection(None), read_superlink_connection("lab")

    # Assert
    assert (default.name, default.address, default.root_certificates) == (
        flower_cli.DEFAULT_CONNECTION, "server.lan:9100", str((tmp_path / "ca.pem").resolve()))
    assert (lab.address, lab.insecure) == ("10.0.0.1:9100", True)
    with pytest.raises(ConfigError):
        flower_cli.SuperLinkConnection("h:1", root_cert="ca.pem", insecure=True)


def test_flower_env_finds_flower_scripts_without_an_activated_venv(tmp_path):
    # Execute
    env = processes.flower_env(flwr_home=tmp_path, base={"PATH": "/usr/bin"})

    # Assert
    first = Path(env["PATH"].split(":")[0])
    assert (first / "flower-superexec").is_file() and (first / "flwr-clientapp").is_file()
    assert env["FLWR_HOME"] == str(tmp_path.resolve())
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"


def test_stopping_several_groups_shares_one_deadline(tmp_path):
    # Prepare: three process groups that ignore SIGTERM (as a stuck SuperNode may).
    import os
    import sys

    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                      "print('ready', flush=True); time.sleep(60)"]
    procs = [processes.start_process(stubborn, tmp_path / f"p{i}.log", env=dict(os.environ))
             for i in range(3)]
    deadline = time.monotonic() + 20
    while not all("ready" in p.log_path.read_text() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)

    # Execute
    started = time.monotonic()
    codes = processes.stop_processes(procs, timeout=1.0)
    took = time.monotonic() - started

    # Assert: one timeout for all, not one each; every group is gone.
    assert codes == [-9, -9, -9]
    assert took < 1.0 + 2.0 + 1.5, took
    assert not any(processes._group_alive(p.pid) for p in procs)


def test_a_started_process_ends_when_its_launcher_is_killed(tmp_path):
    # Prepare: a launcher that starts a long sleeper through start_process, then waits.
    import os
    import signal
    import sys

    pid_file = tmp_path / "child.pid"
    launcher = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from fedser.common import processes; "
        f"p = processes.start_process([sys.executable, '-c', 'import time; time.sleep(60)'], {str(tmp_path / 'c.log')!r}); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())

    # Execute: the launcher dies without a chance to clean up.
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()

    # Assert: its child (in a session of its own) is told and ends.
    deadline = time.monotonic() + 10
    while processes._group_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes._group_alive(child)
    try:
        os.waitpid(child, os.WNOHANG)
    except ChildProcessError:
        pass


def test_default_ports_match_flowers_own():
    # Prepare
    from flwr.supercore import constant

    # Assert
    from flwr.common.constant import FLEETAPI_GRPC_RERE_PORT

    assert flower_args.SUPERLINK_PORT == constant.SUPERLINK_UVICORN_DEFAULT_PORT
    assert flower_args.FLEET_PORT == int(FLEETAPI_GRPC_RERE_PORT)
    assert flower_args.SUPERNODE_RUNTIME_PORT == constant.SUPERNODE_UVICORN_DEFAULT_PORT


def test_staged_app_bundle_holds_only_the_pyproject(tmp_path):
    # Prepare
    from flwr.cli.build import build_fab_from_disk
    import io
    import zipfile

    # Execute
    app = flower_cli.stage_app(TOYAPP / "pyproject.toml", tmp_path / "app")
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()

    # Assert
    assert sorted(names) == [".info/CONTENT", "pyproject.toml"]
