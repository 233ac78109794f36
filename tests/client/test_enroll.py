"""``fedser-client enroll``: the device's CA copy and key pair, and every bad input it refuses."""
from __future__ import annotations

import os
import stat

import pytest

from fedser.client import cli
from fedser.client.enroll import enroll_device
from fedser.common.certs import generate_ca_and_server_cert
from fedser.common.errors import ConfigError


@pytest.fixture(scope="module")
def server_certs(tmp_path_factory):
    return generate_ca_and_server_cert(tmp_path_factory.mktemp("server certs"))


def test_enroll_stores_the_ca_and_a_key_pair_and_prints_what_to_do_next(server_certs, tmp_path, capsys):
    # Prepare
    out = tmp_path / "identity"

    # Execute
    code = cli.main(["enroll", "--server-ca", str(server_certs.ca_cert), "--out", str(out)])

    # Assert
    printed = capsys.readouterr().out
    assert code == 0
    assert (out / "ca.pem").read_bytes() == server_certs.ca_cert.read_bytes()
    public = (out / "device.pub").read_text().strip()
    assert public.startswith("ecdsa-sha2-nistp384 ") and public in printed
    assert stat.S_IMODE(os.stat(out / "device").st_mode) == 0o600
    assert f"--root-cert {out / 'ca.pem'} --auth-key {out / 'device'}" in printed
    # The key is what flower-supernode loads.
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    load_ssh_private_key((out / "device").read_bytes(), password=None)


def test_enroll_defaults_to_the_agents_state_folder(server_certs, tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setenv("FEDSER_HOME", str(tmp_path / "home"))

    # Execute
    identity = enroll_device(server_certs.ca_cert)

    # Assert
    assert identity.private_key == tmp_path / "home" / "identity" / "device"
    assert identity.ca.is_file()


def test_enroll_keeps_an_existing_key_unless_forced(server_certs, tmp_path, capsys):
    # Prepare
    first = enroll_device(server_certs.ca_cert, tmp_path)
    before = first.public_key.read_text()

    # Execute
    code = cli.main(["enroll", "--server-ca", str(server_certs.ca_cert), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    forced = enroll_device(server_certs.ca_cert, tmp_path, force=True)

    # Assert
    assert code == 2 and "already exists" in err and "--force" in err
    assert forced.public_key.read_text() != before


@pytest.mark.parametrize("make, expected", [
    (lambda d, certs: d / "missing.pem", "no such file"),
    (lambda d, certs: _write(d / "junk.pem", b"not a certificate"), "not a PEM certificate"),
    (lambda d, certs: certs.server_cert, "not a CA certificate"),
    (lambda d, certs: certs.ca_key, "holds a private key"),
], ids=["missing", "not-pem", "server-cert", "private-key"])
def test_enroll_refuses_what_is_not_the_servers_ca(server_certs, tmp_path, make, expected):
    # Prepare
    ca = make(tmp_path, server_certs)

    # Execute / Assert
    with pytest.raises(ConfigError, match=expected):
        enroll_device(ca, tmp_path / "identity")
    assert not (tmp_path / "identity" / "device").exists()


def test_enroll_refuses_a_bad_key_name(server_certs, tmp_path):
    with pytest.raises(ConfigError, match="node key name"):
        enroll_device(server_certs.ca_cert, tmp_path, name="../escape")


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_start_reads_its_settings_from_the_environment(monkeypatch, tmp_path):
    # Prepare
    monkeypatch.setenv("FEDSER_SERVER", "server.lan:8000")
    monkeypatch.setenv("FEDSER_DATA", str(tmp_path))
    monkeypatch.setenv("FEDSER_TIER", "0.5")
    monkeypatch.setenv("FEDSER_MAX_EPSILON", "3")
    monkeypatch.setenv("FEDSER_AUTH_KEY", "")   # empty means unset, as systemd and compose pass it

    # Execute
    args = cli.build_parser().parse_args(["start", "--tier", "0.25"])

    # Assert: the command line wins over the environment.
    assert (args.server, args.data, args.tier, args.max_epsilon, args.auth_key) == (
        "server.lan:8000", str(tmp_path), "0.25", 3.0, None)


def test_start_without_server_or_data_says_which_is_missing(monkeypatch, capsys):
    # Prepare
    for var in ("FEDSER_SERVER", "FEDSER_DATA"):
        monkeypatch.delenv(var, raising=False)

    # Execute
    code = cli.main(["start", "--insecure"])

    # Assert
    err = capsys.readouterr().err
    assert code == 2 and "--server (or FEDSER_SERVER)" in err and "--data (or FEDSER_DATA)" in err
