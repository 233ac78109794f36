"""The agent's first look at ``--server``: a gRPC Fleet API with matching TLS settings, or a clear error.

Real servers on loopback: gRPC (grpcio, as Flower's SuperLink serves its Fleet API) with and
without TLS, and HTTP/1.1 (the standard library's server, as on the SuperLink's Control API
port) with and without TLS.
"""
from __future__ import annotations

import http.server
import os
import ssl
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from fedser.client.cli import fleet_address
from fedser.client.preflight import FleetEndpointError, probe_fleet_api
from fedser.common import flower_args, processes
from fedser.client import supernode
from fedser.common.certs import generate_ca_and_server_cert
from fedser.common.errors import ConfigError

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return generate_ca_and_server_cert(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def stranger_ca(tmp_path_factory):
    return generate_ca_and_server_cert(tmp_path_factory.mktemp("stranger")).ca_cert


def _grpc_server(certs=None) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    if certs is None:
        port = server.add_insecure_port(f"{HOST}:0")
    else:
        creds = grpc.ssl_server_credentials([(Path(certs.server_key).read_bytes(),
                                              Path(certs.server_cert).read_bytes())])
        port = server.add_secure_port(f"{HOST}:0", creds)
    server.start()
    return server, f"{HOST}:{port}"


@pytest.fixture(scope="module")
def grpc_tls(certs):
    server, address = _grpc_server(certs)
    yield address
    server.stop(0)


@pytest.fixture(scope="module")
def grpc_plain():
    server, address = _grpc_server()
    yield address
    server.stop(0)


def _http_server(certs=None) -> tuple[http.server.HTTPServer, str]:
    server = http.server.ThreadingHTTPServer((HOST, 0), http.server.BaseHTTPRequestHandler)
    if certs is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs.server_cert, certs.server_key)
        context.set_alpn_protocols(["http/1.1"])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"{HOST}:{server.server_address[1]}"


@pytest.fixture(scope="module")
def https(certs):
    server, address = _http_server(certs)
    yield address
    server.shutdown()


@pytest.fixture(scope="module")
def http_plain():
    server, address = _http_server()
    yield address
    server.shutdown()


def test_a_grpc_fleet_api_with_matching_settings_passes(grpc_tls, grpc_plain, certs):
    # Execute
    tls = probe_fleet_api(grpc_tls, root_cert=certs.ca_cert)
    plain = probe_fleet_api(grpc_plain, insecure=True)

    # Assert
    assert tls.reachable and "gRPC over TLS" in tls.detail
    assert plain.reachable and "plain text" in plain.detail


def test_a_certificate_the_root_cert_does_not_trust_names_the_fix(grpc_tls, stranger_ca):
    # Execute / Assert
    with pytest.raises(FleetEndpointError, match=r"does not trust .*pass the server's own ca\.pem as --root-cert"):
        probe_fleet_api(grpc_tls, root_cert=stranger_ca)


def test_plain_text_to_a_tls_server_says_to_use_tls(grpc_tls):
    # Execute / Assert
    with pytest.raises(FleetEndpointError, match=r"expects TLS: drop --insecure"):
        probe_fleet_api(grpc_tls, insecure=True)


def test_tls_to_a_plain_text_server_says_to_match_its_insecure(grpc_plain, certs):
    # Execute / Assert
    with pytest.raises(FleetEndpointError, match=r"does not speak TLS.*--insecure"):
        probe_fleet_api(grpc_plain, root_cert=certs.ca_cert)


def test_the_control_api_port_is_named_as_the_wrong_port(https, http_plain, certs):
    # Execute
    with pytest.raises(FleetEndpointError) as tls:
        probe_fleet_api(https, root_cert=certs.ca_cert)
    with pytest.raises(FleetEndpointError) as plain:
        probe_fleet_api(http_plain, insecure=True)

    # Assert: both name the Fleet API's port as the fix.
    for err in (tls, plain):
        assert f"Fleet API port ({flower_args.FLEET_PORT} by default)" in str(err.value)
    assert "answers TLS but not gRPC" in str(tls.value)
    assert "answers, but not as gRPC" in str(plain.value)


def test_a_port_nobody_listens_on_is_left_to_the_supernodes_retries(certs):
    # Execute
    seen = probe_fleet_api(f"{HOST}:{processes.free_port(HOST)}", root_cert=certs.ca_cert, timeout=2)

    # Assert
    assert not seen.reachable and "refused" in seen.detail.lower()


@pytest.mark.parametrize("text, expected", [
    ("server.example.org", f"server.example.org:{flower_args.FLEET_PORT}"),
    ("10.0.0.5:7000", "10.0.0.5:7000"),
    ("::1", f"[::1]:{flower_args.FLEET_PORT}"),
    ("[::1]:7000", "[::1]:7000"),
])
def test_server_address_gets_the_fleet_port_when_none_is_given(text, expected):
    assert fleet_address(text) == expected


@pytest.mark.parametrize("text", ["host:", "host:port", "host:70000", ":9092"])
def test_malformed_server_addresses_are_refused(text):
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        fleet_address(text)


def test_agent_pointed_at_the_control_port_exits_at_once_with_the_fix(https, certs, tmp_path):
    # Prepare
    data = tmp_path / "data.csv"
    data.write_text("path,label,speaker\n")
    env = {**os.environ, "FEDSER_HOME": str(tmp_path / "home")}
    started = time.monotonic()

    # Execute
    done = subprocess.run([sys.executable, "-m", "fedser.client.cli", "start", "--server", https, "--data",
                           str(data), "--root-cert", str(certs.ca_cert), "--ledger", str(tmp_path / "ledger.json"),
                           "--port", str(processes.free_port(HOST))],
                          capture_output=True, text=True, timeout=120, env=env)

    # Assert: refused before any SuperNode started, saying which port to use.
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"Fleet API port ({flower_args.FLEET_PORT} by default)" in done.stderr
    assert "SuperNode" not in done.stdout
    print(f"\nrefused in {time.monotonic() - started:.1f} s: {done.stderr.strip()}")


@pytest.mark.parametrize("extra, says", [
    (["--task-poll", "0"], "--task-poll 0.0: expected seconds between 0.01 and 60"),
    (["--task-poll", "600"], "--task-poll 600.0: expected seconds between 0.01 and 60"),
    (["--root-cert", "nowhere.pem"], "--root-cert nowhere.pem: no such file"),
    (["--insecure", "--server", "host:port"], "--server 'host:port': expected HOST:PORT"),
])
def test_agent_refuses_bad_start_options_before_anything_runs(extra, says, certs, tmp_path, capsys):
    # Prepare
    from fedser.client import cli

    data = tmp_path / "data.csv"
    data.write_text("path,label,speaker\n")
    argv = ["start", "--server", f"{HOST}:1", "--data", str(data), "--ledger", str(tmp_path / "l.json")]
    if "--root-cert" not in extra and "--insecure" not in extra:
        argv += ["--root-cert", str(certs.ca_cert)]

    # Execute
    code = cli.main(argv + extra)

    # Assert
    assert code == 2
    assert says in capsys.readouterr().err


def test_many_agents_on_few_cores_poll_less_often_so_their_starts_spread():
    # Execute / Assert: a few devices keep Flower's default; a crowd is spread over the burst's length.
    assert supernode.task_poll_interval(4, 2, 4.0) is None
    assert supernode.task_poll_interval(20, 2, 4.0) == 40.0
    assert supernode.task_poll_interval(20, 16, 4.0) is None
    assert supernode.task_poll_interval(500, 2, 4.0) == supernode.TASK_POLL_RANGE[1]


def test_the_agent_extracts_its_features_into_the_cache_before_joining(tiny_corpus, tmp_path, capfd,
                                                                       monkeypatch):
    # Prepare
    from fedser.client import cli
    from fedser.client.device import DeviceSettings, load_local_data
    from fedser.common.cache import FeatureCache
    from fedser.common.features import FeatureSpec

    config = {"data": str(tiny_corpus / "commands"), "cache": str(tmp_path / "cache")}

    # Execute: as `fedser-client start` does it, in a child process
    cli._prepare_in_child(config)

    # Assert: every clip's features are cached, so a round's ClientApp computes none and does not
    # even build the front end (encoder runtimes, filter banks)
    out = capfd.readouterr().out
    assert "features ready:" in out and "(kws)" in out
    written = []
    monkeypatch.setattr(FeatureCache, "_write", lambda self, path, value: written.append(path))

    def no_front_end(*args, **kwargs):
        raise AssertionError("a front end was built for cached features")

    monkeypatch.setattr("fedser.common.data.FrontEnd", no_front_end)
    data = load_local_data(DeviceSettings.from_node_config(config), FeatureSpec())
    assert set(data.tasks) == {"kws"} and len(data.train["kws"]) > 0
    assert written == []


def test_an_agent_without_usable_data_says_so_and_still_joins(tmp_path, capsys):
    # Prepare
    from fedser.client import cli

    data = tmp_path / "data.csv"
    data.write_text("path,label,speaker\n")

    # Execute
    cli.prepare_features({"data": str(data), "cache": str(tmp_path / "cache")})

    # Assert
    assert "features not prepared:" in capsys.readouterr().err


def test_the_resident_agent_does_not_load_the_model_stack():
    # Prepare: what the resident `fedser-client start` process imports (its CLI, options of every
    # subcommand, device settings, the SuperNode command); torch and the encoders' runtimes belong
    # to the ClientApp and feature-preparation processes, which come and go.
    probe = ("import sys, fedser.client.cli as c; c.build_parser(); "
             "c.node_config_from_args(c.build_parser().parse_args(['start', '--server', 'h', '--data', 'd'])); "
             "print(sorted(m for m in ('torch', 'opacus', 'onnxruntime', 'opensmile', 'scipy') if m in sys.modules))")

    # Execute
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)

    # Assert
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
