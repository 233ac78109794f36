"""Enrol a device: keep the server's CA beside a new SuperNode key pair.

``fedser-client enroll`` is run once per device. It checks the CA certificate it is given
(a PEM X.509 CA, not a server certificate or a key), stores a copy, and makes the ECDSA key
pair the SuperNode authenticates with (:func:`fedser.common.certs.generate_node_keypair`).
The public key line is what the operator registers on the server; the private key never
leaves the device. An existing key pair is kept unless ``force``: replacing it locks the
device out until the new key is registered.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedser.common.certs import CA_CERT_FILE, generate_node_keypair
from fedser.common.errors import ConfigError
from fedser.common.fsutil import PUBLIC, atomic_write

from .device import default_state_dir


@dataclass(frozen=True)
class DeviceIdentity:
    ca: Path
    private_key: Path
    public_key: Path

    @property
    def public_key_line(self) -> str:
        return self.public_key.read_text().strip()


def default_identity_dir() -> Path:
    return default_state_dir() / "identity"


def check_ca_certificate(path: str | Path) -> bytes:
    """The bytes of ``path`` if it is a PEM CA certificate; ``ConfigError`` naming the problem otherwise."""
    from cryptography import x509

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--server-ca {path}: no such file; copy the server's ca.pem to this device")
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"--server-ca {path} holds a private key; pass the CA certificate (ca.pem), "
                          "and keep that key off devices")
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"--server-ca {path} is not a PEM certificate (expected '-----BEGIN CERTIFICATE-----'); "
                          "pass the server's ca.pem") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"--server-ca {path} is not a CA certificate (it looks like a server certificate); "
                          "pass the ca.pem that signed the server's certificate")
    return data


def enroll_device(server_ca: str | Path, out: str | Path | None = None, *, name: str = "device",
                  force: bool = False) -> DeviceIdentity:
    """Store the CA as ``OUT/ca.pem`` and make ``OUT/NAME`` + ``OUT/NAME.pub``; returns their paths."""
    ca_bytes = check_ca_certificate(server_ca)
    out = Path(out) if out is not None else default_identity_dir()
    private, public = out / name, out / f"{name}.pub"
    if (private.exists() or public.exists()) and not force:
        raise ConfigError(f"{private} already exists: this device is enrolled (its registered key would stop "
                          "working if replaced); pass --force to make a new key pair, then register it again")
    out.mkdir(parents=True, exist_ok=True)
    ca = out / CA_CERT_FILE
    if ca.resolve() != Path(server_ca).resolve():
        atomic_write(ca, lambda f: f.write(ca_bytes), PUBLIC)
    private, public = generate_node_keypair(out, name)
    return DeviceIdentity(ca=ca, private_key=private, public_key=public)
