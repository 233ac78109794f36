"""``fedser simulate``: the same ServerApp and ClientApp on Flower's Simulation Engine (Ray).

One virtual client per device folder of a ``fedser partition`` output: client
``partition-id`` i trains on ``device-<i>/data.csv``; the held-out ``test.csv`` is the
server's evaluation set. The run is launched by ``fedser.server.simulation`` in a
subprocess (a local SuperLink in simulation mode plus ``flwr run``), so these tools never
import the server package.
"""
from __future__ import annotations

import signal
import subprocess
import sys

HELP = "run a federation of virtual clients (one per partition) on Flower's Simulation Engine"


def add_arguments(p) -> None:
    p.add_argument("--partitions", required=True, metavar="DIR", help="a folder written by `fedser partition`")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="checkpoints, metrics, plots and the model go here")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="any run setting, e.g. fraction-train=0.1, noise-mode=none, partition-tiers=1.0,0.5,0.25; "
                        "repeatable")
    p.add_argument("--ray-cpus", type=int, default=2, help="CPUs Ray may use (default 2)")
    p.add_argument("--client-cpus", type=int, default=1,
                   help="CPUs per virtual client (default 1): ray-cpus / client-cpus clients run at once")
    p.add_argument("--resume", action="store_true", help="continue after the last complete round in RUN_DIR")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="give up after this many seconds")
    p.add_argument("--quiet", action="store_true", help="no per-round progress lines")


def to_argv(args) -> list[str]:
    """The parsed arguments as a command line again (for the launcher subprocess)."""
    argv = ["--partitions", str(args.partitions), "--rounds", str(args.rounds), "--out", str(args.out),
            "--ray-cpus", str(args.ray_cpus), "--client-cpus", str(args.client_cpus), "--timeout", str(args.timeout)]
    for kv in args.config:
        argv += ["--config", kv]
    if args.resume:
        argv.append("--resume")
    if args.quiet:
        argv.append("--quiet")
    return argv


def run(args) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "fedser.server.simulation", *to_argv(args)])

    def forward(signum, _frame):   # the launcher stops the run, Ray and the SuperLink itself
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                forward(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGTERM, previous)
