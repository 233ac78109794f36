"""``fedser-server start --superlink HOST:PORT``: attaching to a SuperLink started elsewhere.

The attached mode runs for real in the compose test bed (``tests/deploy/test_testbed.py``);
these are its argument checks and the key registration it does.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from fedser.server import flower_cli
from fedser.common.certs import generate_ca_and_server_cert, generate_node_keypair
from fedser.common.errors import ConfigError
from fedser.server import cli


def _start(tmp_path, *extra) -> int:
    return cli.main(["start", "--run-dir", str(tmp_path / "run"), *extra])


@pytest.mark.parametrize("extra, expected", [
    (["--superlink", "superlink"], "expected HOST:PORT"),
    (["--superlink", "superlink:99999"], "expected HOST:PORT"),
    (["--superlink", "h:8000"], "--root-cert CA.pem (TLS) or --insecure"),
    (["--superlink", "h:8000", "--insecure", "--root-cert", "ca.pem"], "one of them"),
    (["--superlink", "h:8000", "--root-cert", "nowhere.pem"], "--root-cert nowhere.pem: no such file"),
    (["--superlink", "h:8000", "--insecure", "--certs", "c", "--port", "9", "--supernode-auth"],
     "--certs, --supernode-auth, --port shape a SuperLink"),
    (["--root-cert", "ca.pem"], "--root-cert is for --superlink"),
    (["--register", "k.pub", "--no-supernode-auth"], "--register needs SuperNode authentication"),
    (["--insecure"], "with --insecure pass --no-supernode-auth"),
    (["--superlink", "h:8000", "--insecure", "--register", "missing.pub"], "--register missing.pub: no such file"),
])
def test_bad_attach_arguments_are_refused_before_anything_starts(tmp_path, capsys, extra, expected):
    # Execute
    code = _start(tmp_path, *extra)

    # Assert
    assert code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run" / "logs").exists()


def test_public_keys_reads_one_key_or_an_authorized_keys_style_list(tmp_path):
    # Prepare
    pubs = [generate_node_keypair(tmp_path, f"d{i}")[1].read_text().strip() for i in range(3)]
    many = tmp_path / "all.pub"
    many.write_text("# devices\n" + "\n".join(pubs) + "\n\n")

    # Execute / Assert
    assert cli._public_keys(tmp_path / "d0.pub") == [pubs[0]]
    assert cli._public_keys(many) == pubs
    (tmp_path / "bad.pub").write_text("ssh-rsa AAAA nope\n")
    with pytest.raises(ConfigError, match="expected OpenSSH ECDSA public key lines"):
        cli._public_keys(tmp_path / "bad.pub")
    (tmp_path / "empty.pub").write_text("\n")
    with pytest.raises(ConfigError, match="got 'nothing'"):
        cli._public_keys(tmp_path / "empty.pub")


def test_register_keys_skips_keys_the_superlink_already_has(tmp_path, monkeypatch, capsys):
    # Prepare: a SuperLink that knows the second key already (a restarted server registers again).
    pubs = [generate_node_keypair(tmp_path, f"d{i}")[1].read_text().strip() for i in range(2)]
    many = tmp_path / "all.pub"
    many.write_text("\n".join(pubs) + "\n")
    sent = []

    def register(path, env=None):
        key = Path(path).read_text().strip()
        sent.append(key)
        if key == pubs[1]:
            raise flower_cli.FlowerCommandError("registering x failed: Public key already in use while registering")
        return 7

    monkeypatch.setattr(flower_cli, "register_node", register)

    # Execute
    cli.register_keys([str(many)], tmp_path / "keys", env={})

    # Assert
    assert sent == pubs
    out = capsys.readouterr().out
    assert "as node 7" in out and "already registered" in out


def test_register_keys_raises_other_refusals(tmp_path, monkeypatch):
    # Prepare
    pub = generate_node_keypair(tmp_path, "d")[1]

    def register(path, env=None):
        raise flower_cli.FlowerCommandError("registering x failed: SuperNode authentication is disabled")

    monkeypatch.setattr(flower_cli, "register_node", register)

    # Execute / Assert
    with pytest.raises(flower_cli.FlowerCommandError, match="disabled"):
        cli.register_keys([str(pub)], tmp_path / "keys", env={})


def test_superexec_command_serves_a_remote_superlinks_runs(tmp_path):
    # Prepare
    ca = generate_ca_and_server_cert(tmp_path).ca_cert

    # Execute
    tls = flower_cli.superexec_command("superlink:8000", root_cert=ca)
    plain = flower_cli.superexec_command("superlink:8000", insecure=True)

    # Assert
    assert Path(tls[0]).name == "flower-superexec" and Path(tls[0]).is_file()
    assert tls[tls.index("--runtime-api-address") + 1] == "superlink:8000"
    assert tls[tls.index("--root-certificates") + 1] == str(ca.resolve())
    assert "--insecure" in plain and "--root-certificates" not in plain
    with pytest.raises(ConfigError):
        flower_cli.superexec_command("superlink:8000")
    with pytest.raises(ConfigError):
        flower_cli.superexec_command("superlink:8000", root_cert=ca, insecure=True)
