"""``fedser certs``: TLS certificates for a deployment and key pairs for device authentication."""
from __future__ import annotations

from pathlib import Path

from fedser.common.certs import generate_ca_and_server_cert, generate_node_keypair

HELP = "generate a CA + server certificate (TLS) or a device key pair (SuperNode authentication)"


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write into")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="DNS name or IP devices use to reach the server (repeatable; localhost is always added)")
    p.add_argument("--node", default=None, metavar="NAME",
                   help="instead of certificates, make the key pair NAME / NAME.pub for one device")


def run(args) -> int:
    out = Path(args.out)
    if args.node:
        private, public = generate_node_keypair(out, args.node)
        print(f"device key pair: {private} (keep on the device, --auth-key) and {public} "
              f"(register on the server: fedser-server start --register {public})")
        return 0
    paths = generate_ca_and_server_cert(out, hosts=args.host)
    print(f"CA certificate {paths.ca_cert} (copy to every device: --root-cert); server certificate "
          f"{paths.server_cert} and key {paths.server_key} (fedser-server start --certs {out})")
    return 0
