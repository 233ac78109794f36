"""Check, before a SuperNode starts, that ``--server`` is a SuperLink's Fleet API speaking gRPC.

A SuperNode pointed at the wrong port, or speaking plain text to a TLS SuperLink (or TLS
to a plain-text one), retries forever and logs only a generic connection error. One
short look at the port tells these cases apart, so the agent can stop with a message
that names the port and the fix instead of hanging:

* TLS: the handshake must verify against ``--root-cert`` and settle on ALPN ``h2``
  (gRPC runs over HTTP/2; the SuperLink's Control API on port 8000 speaks HTTP/1.1).
* Plain text (``--insecure``): the HTTP/2 connection preface must be answered with an
  HTTP/2 SETTINGS frame, as a gRPC server does.

A port that refuses connections or does not answer is not an error here: the server may
simply not be up yet, and the SuperNode keeps trying.
"""
from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from fedser.common.errors import ConfigError
from fedser.common.flower_args import FLEET_PORT, SUPERLINK_PORT, split_host_port

# RFC 9113 section 3.4: the client's connection preface, then an empty SETTINGS frame.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS_FRAME = 0x04


class FleetEndpointError(ConfigError):
    """``--server`` answers, but not as a SuperLink's gRPC Fleet API with these settings."""


@dataclass(frozen=True)
class ProbeResult:
    reachable: bool
    detail: str   # what was seen, for the agent's log


def probe_fleet_api(address: str, *, root_cert: str | Path | None = None, insecure: bool = False,
                    timeout: float = 5.0) -> ProbeResult:
    """Look at ``address`` once; raise :class:`FleetEndpointError` where the settings cannot work.

    Returns ``ProbeResult(reachable=False, ...)`` when nothing answers (yet).
    """
    host, port = split_host_port(address, "--server")
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        return ProbeResult(False, f"{address}: {err.strerror or err}")
    with sock:
        sock.settimeout(timeout)
        if insecure:
            return _probe_plain(sock, address)
        return _probe_tls(sock, host, address, root_cert)


def _probe_tls(sock: socket.socket, host: str, address: str, root_cert: str | Path | None) -> ProbeResult:
    context = ssl.create_default_context(cafile=str(root_cert) if root_cert else None)
    context.set_alpn_protocols(["h2"])
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            alpn = tls.selected_alpn_protocol()
    except ssl.SSLCertVerificationError as err:
        where = f"--root-cert {root_cert}" if root_cert else "the system's trust store"
        raise FleetEndpointError(
            f"{address} presented a certificate that {where} does not trust ({err.verify_message}): pass the "
            "server's own ca.pem as --root-cert (and check the certificate names this host)") from None
    except ssl.SSLError as err:
        if "WRONG_VERSION_NUMBER" in str(err) or "RECORD_LAYER_FAILURE" in str(err) or "PACKET_LENGTH" in str(err):
            raise FleetEndpointError(
                f"{address} does not speak TLS: if the server runs with --insecure (development only), pass "
                "--insecure here too; otherwise check the port") from None
        raise FleetEndpointError(f"{address}: the TLS handshake failed ({err.reason or err})") from None
    except (ConnectionError, socket.timeout) as err:
        raise FleetEndpointError(
            f"{address} closed the connection during the TLS handshake ({err.__class__.__name__}): it does not "
            "speak TLS; if the server runs with --insecure (development only), pass --insecure here too") from None
    if alpn != "h2":
        raise FleetEndpointError(
            f"{address} answers TLS but not gRPC (no HTTP/2): it is not the SuperLink's Fleet API. Devices "
            f"connect to the Fleet API port ({FLEET_PORT} by default); port {SUPERLINK_PORT} is the server's "
            "Control API")
    return ProbeResult(True, f"{address}: gRPC over TLS")


def _probe_plain(sock: socket.socket, address: str) -> ProbeResult:
    try:
        sock.sendall(_H2_PREFACE)
        head = _read(sock, 9)
    except socket.timeout:
        return ProbeResult(False, f"{address}: no answer to an HTTP/2 preface")
    except OSError as err:
        head = b""
        if not isinstance(err, ConnectionError):
            return ProbeResult(False, f"{address}: {err}")
    if len(head) == 9 and head[3] == _SETTINGS_FRAME:
        return ProbeResult(True, f"{address}: gRPC in plain text")
    if head[:1] == b"\x15" or head[:1] == b"\x16" or not head:
        raise FleetEndpointError(
            f"{address} expects TLS: drop --insecure and pass the server's ca.pem as --root-cert")
    # Anything else answered, but not with HTTP/2: most likely the Control API's HTTP/1.1.
    raise FleetEndpointError(
        f"{address} answers, but not as gRPC (first bytes {head[:9]!r}): it is not the SuperLink's Fleet API. "
        f"Devices connect to the Fleet API port ({FLEET_PORT} by default); port {SUPERLINK_PORT} is the server's "
        "Control API")


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data
