"""TLS certificates for the SuperLink and authentication keys for SuperNodes.

Everything is generated in-process with ``cryptography`` (already a Flower
dependency); nothing shells out to openssl.

TLS (Flower 1.41: one HTTPS port serves the Fleet, Control and Runtime APIs)::

    flower-superlink --ssl-ca-certfile ca.pem --ssl-certfile server.pem --ssl-keyfile server.key
    flower-supernode --root-certificates ca.pem ...
    flwr CLI connection: root-certificates = "ca.pem"

SuperNode authentication (``flower-superlink --enable-supernode-auth``): each
device owns an ECDSA key pair in OpenSSH format; the operator registers the
public key with ``flwr supernode register <node>.pub <connection>`` and the
device starts with ``flower-supernode --auth-supernode-private-key <node>``.

Private keys are written with mode 0600, certificates and public keys 0644,
each atomically (temporary file, fsync, rename).
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ConfigError
from .fsutil import PRIVATE, PUBLIC, atomic_write

#: Names every server certificate answers to, so local SuperExec processes
#: (which reach the SuperLink on 127.0.0.1) and local tests always verify.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"

# NIST P-256: every TLS stack in play (OpenSSL via uvicorn and httpx) supports it.
_TLS_CURVE = ec.SECP256R1
# Flower's SuperNode authentication accepts NIST curves; P-384 is what its docs use.
_NODE_CURVE = ec.SECP384R1
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class CertPaths:
    """Files written by :func:`generate_ca_and_server_cert`."""

    ca_cert: Path       # give to SuperNodes (--root-certificates) and the flwr CLI
    ca_key: Path        # stays with the operator; signs later server certificates
    server_cert: Path   # flower-superlink --ssl-certfile
    server_key: Path    # flower-superlink --ssl-keyfile


def generate_ca_and_server_cert(
    out_dir: str | Path,
    hosts: Iterable[str] = (),
    *,
    days: int = 365,
    reuse_ca: bool = True,
    common_name: str = "fedser SuperLink",
) -> CertPaths:
    """Write a CA and a server certificate signed by it into ``out_dir``.

    The server certificate's subjectAltName holds ``localhost``, ``127.0.0.1``,
    ``::1`` and every entry of ``hosts`` (IP literals become IP SANs, anything
    else a DNS SAN). With ``reuse_ca`` an existing ``ca.pem``/``ca.key`` pair in
    ``out_dir`` signs the new server certificate, so devices that already trust
    the CA keep working when the server's names change.
    """
    if days < 1:
        raise ConfigError(f"days={days}: a certificate must be valid for at least 1 day")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(
        ca_cert=out / CA_CERT_FILE, ca_key=out / CA_KEY_FILE,
        server_cert=out / SERVER_CERT_FILE, server_key=out / SERVER_KEY_FILE,
    )
    sans = _subject_alt_names([*LOCAL_HOSTS, *hosts])
    now = dt.datetime.now(dt.timezone.utc)
    # Backdate a little so a device whose clock runs slightly behind still accepts it.
    not_before = now - dt.timedelta(minutes=5)
    not_after = now + dt.timedelta(days=days)

    if reuse_ca and paths.ca_cert.is_file() and paths.ca_key.is_file():
        ca_cert, ca_key = _load_ca(paths)
    else:
        ca_key = ec.generate_private_key(_TLS_CURVE())
        ca_name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedser"),
            x509.NameAttribute(NameOID.COMMON_NAME, "fedser CA"),
        ])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            # The CA outlives server certificates so they can be re-issued under it.
            .not_valid_after(now + dt.timedelta(days=max(days, 10 * 365)))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(paths.ca_key, _private_pem(ca_key))
        _write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))

    server_key = ec.generate_private_key(_TLS_CURVE())
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedser"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(paths.server_key, _private_pem(server_key))
    _write_public(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def generate_node_keypair(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write a SuperNode authentication key pair ``<name>`` / ``<name>.pub``.

    ECDSA on NIST P-384 in OpenSSH format, the form ``flower-supernode
    --auth-supernode-private-key`` loads and ``flwr supernode register`` reads.
    Returns ``(private_path, public_path)``.
    """
    if not _NODE_NAME.match(name):
        raise ConfigError(
            f"node key name {name!r}: use letters, digits, '.', '_' or '-' "
            "(no path separators), starting with a letter or digit"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / name, out / f"{name}.pub"
    key = ec.generate_private_key(_NODE_CURVE())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public_bytes = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_private(private_path, private_bytes)
    _write_public(public_path, public_bytes + f" fedser-node-{name}\n".encode())
    return private_path, public_path


def _subject_alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """DNS/IP SAN entries for ``hosts``, de-duplicated, order kept."""
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    problems = []
    for raw in hosts:
        host = raw.strip().strip("[]")  # accept "[::1]" as written in addresses
        if not host:
            problems.append("empty host name")
            continue
        if host.lower() in seen:
            continue
        seen.add(host.lower())
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if ":" in host or "/" in host or " " in host:
                problems.append(f"{raw!r} is neither an IP address nor a host name (drop any port)")
                continue
            names.append(x509.DNSName(host))
    if problems:
        raise ConfigError("; ".join(problems))
    return names


def _load_ca(paths: CertPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    if ca_key.public_key().public_numbers() != ca_cert.public_key().public_numbers():
        raise ConfigError(
            f"{paths.ca_key} does not belong to {paths.ca_cert}: remove both to create a new CA"
        )
    return ca_cert, ca_key


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), PRIVATE)


def _write_public(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), PUBLIC)
