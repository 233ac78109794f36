"""TLS certificates and SuperNode keys from fedser.common.certs."""
from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedser.common.certs import LOCAL_HOSTS, generate_ca_and_server_cert, generate_node_keypair
from fedser.common.errors import ConfigError


# Flower's CLI imports raise this; it says nothing about fedser.
pytestmark = pytest.mark.filterwarnings("ignore:'click.utils:DeprecationWarning")


def _load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verify(ca: x509.Certificate, leaf: x509.Certificate, name: str) -> None:
    """Verify ``leaf`` for server name ``name`` (DNS or IP) against ``ca`` as a TLS client would."""
    try:
        subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
    verifier.verify(leaf, [])


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_chain_verifies_for_every_name(tmp_path):
    # Prepare
    hosts = ["fedser.example.org", "10.1.2.3", "fd00::7"]

    # Execute
    paths = generate_ca_and_server_cert(tmp_path, hosts)

    # Assert
    ca, leaf = _load(paths.ca_cert), _load(paths.server_cert)
    for name in [*LOCAL_HOSTS, *hosts]:
        _verify(ca, leaf, name)
    assert leaf.issuer == ca.subject


def test_server_certificate_names_exactly_local_and_given_hosts(tmp_path):
    # Prepare
    hosts = ["node.lan", "192.168.1.20", "[::1]", "LOCALHOST"]

    # Execute
    leaf = _load(generate_ca_and_server_cert(tmp_path, hosts).server_cert)

    # Assert
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "node.lan"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "192.168.1.20"}
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_certificate_from_another_ca_or_for_another_name_is_rejected(tmp_path):
    # Prepare
    ours = generate_ca_and_server_cert(tmp_path / "ours", ["server.lan"])
    theirs = generate_ca_and_server_cert(tmp_path / "theirs", ["server.lan"])

    # Execute / Assert
    with pytest.raises(VerificationError):
        _verify(_load(theirs.ca_cert), _load(ours.server_cert), "server.lan")
    with pytest.raises(VerificationError):
        _verify(_load(ours.ca_cert), _load(ours.server_cert), "other.lan")


def test_private_keys_are_owner_only_and_certificates_world_readable(tmp_path):
    # Execute
    paths = generate_ca_and_server_cert(tmp_path / "tls")

    # Assert
    assert _mode(paths.ca_key) == 0o600
    assert _mode(paths.server_key) == 0o600
    assert _mode(paths.ca_cert) == 0o644
    assert _mode(paths.server_cert) == 0o644
    assert not list((tmp_path / "tls").glob("*.tmp"))


def test_existing_ca_signs_a_reissued_server_certificate(tmp_path):
    # Prepare
    first = generate_ca_and_server_cert(tmp_path, ["old.lan"])
    ca_bytes = first.ca_cert.read_bytes()

    # Execute
    second = generate_ca_and_server_cert(tmp_path, ["new.lan"])
    reissued = _load(second.server_cert)
    fresh = generate_ca_and_server_cert(tmp_path, ["new.lan"], reuse_ca=False)

    # Assert
    old_ca = x509.load_pem_x509_certificate(ca_bytes)
    _verify(old_ca, reissued, "new.lan")
    assert fresh.ca_cert.read_bytes() != ca_bytes
    with pytest.raises(VerificationError):
        _verify(old_ca, _load(fresh.server_cert), "new.lan")


def test_host_with_a_port_or_an_empty_host_is_a_config_error(tmp_path):
    # Execute / Assert
    with pytest.raises(ConfigError, match="drop any port"):
        generate_ca_and_server_cert(tmp_path, ["server.lan:8000"])
    with pytest.raises(ConfigError, match="empty host"):
        generate_ca_and_server_cert(tmp_path, [" "])
    with pytest.raises(ConfigError, match="days"):
        generate_ca_and_server_cert(tmp_path, [], days=0)


def test_node_keypair_is_p384_openssh_and_flower_accepts_it(tmp_path):
    # Prepare
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    # Execute
    private_path, public_path = generate_node_keypair(tmp_path / "keys", "device-01")

    # Assert
    private = load_ssh_private_key(private_path.read_bytes(), None)
    public = load_ssh_public_key(public_path.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    assert private.public_key().public_numbers() == public.public_numbers()
    # What `flwr supernode register` sends is the key the SuperNode signs with.
    assert try_load_public_key(public_path) == public_key_to_bytes(private.public_key())
    assert public_path.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert _mode(private_path) == 0o600
    assert _mode(public_path) == 0o644


def test_node_keypairs_differ_and_bad_names_are_refused(tmp_path):
    # Execute
    _, pub_a = generate_node_keypair(tmp_path, "a")
    _, pub_b = generate_node_keypair(tmp_path, "b")

    # Assert
    assert pub_a.read_bytes().split()[1] != pub_b.read_bytes().split()[1]
    for bad in ["../escape", "", "a/b", ".hidden"]:
        with pytest.raises(ConfigError):
            generate_node_keypair(tmp_path, bad)
