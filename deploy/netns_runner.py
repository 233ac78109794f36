#!/usr/bin/env python3
"""Run the docker-compose test bed without a container engine: one network namespace per service.

The command line of the namespace sandbox, for people and for ``fedser testbed up --runner
netns``: ``compose.py`` reads the files, ``netns.py`` runs the services (see their docstrings
for what is and is not reproduced). ``up`` stays in the foreground until the service named by
``--wait-for`` exits, then removes every service, namespace and link it made; Ctrl-C or
SIGTERM stops it early and still cleans up.

    python deploy/netns_runner.py up -f deploy/docker-compose.yml [-f overlay.yml] --workdir DIR
    python deploy/netns_runner.py config -f deploy/docker-compose.yml     # merged, interpolated
"""
from __future__ import annotations

import argparse
import signal
import sys

import yaml

from compose import ComposeError, load_compose
from netns import NetnsBed, netns_available


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netns_runner.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("up", "config"):
        s = sub.add_parser(name)
        s.add_argument("-f", "--file", action="append", required=True, help="compose file (repeat for overlays)")
        if name == "up":
            s.add_argument("--workdir", required=True, help="logs and per-service roots go here")
            s.add_argument("--wait-for", default="serverapp",
                           help="stop everything once this service exits (default serverapp: the run is over)")
            s.add_argument("--timeout", type=float, default=3600.0,
                           help="seconds to wait for that service (default 3600)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "config":
            print(yaml.safe_dump(load_compose(args.file), sort_keys=False))
            return 0
        why = netns_available()
        if why:
            print(f"netns_runner: {why}", file=sys.stderr)
            return 2
        bed = NetnsBed(args.file, args.workdir)
    except ComposeError as exc:
        print(f"netns_runner: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        bed.up()
        print(f"{len(bed.services)} services up: "
              + ", ".join(f"{n} {bed.ip[n]}" for n in bed.order) + f"; logs in {bed.workdir / 'logs'}", flush=True)
        code = bed.wait(args.wait_for, args.timeout)
        print(f"{args.wait_for} exited with {code}", flush=True)
        if code != 0:
            print(bed.log_tail(args.wait_for), file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 130
    except (ComposeError, RuntimeError, TimeoutError) as exc:
        print(f"netns_runner: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bed.down()


if __name__ == "__main__":
    sys.exit(main())
