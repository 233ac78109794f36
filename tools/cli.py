"""``fedser``: the tools command (synth, train, evaluate, demo, ...).

Subcommands form a registry: built-in ones are modules of ``fedser.tools`` that expose
``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; other installed packages may
add theirs through the ``fedser.commands`` entry-point group. Each command is imported only
when the parser is built, so ``fedser --help`` does not start Flower or load a model.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

from fedser.common.errors import FedserError

BUILTIN_COMMANDS = {
    "synth": "fedser.tools.commands.synth",
    "train": "fedser.tools.commands.train",
    "evaluate": "fedser.tools.commands.evaluate",
    "demo": "fedser.tools.commands.demo",
    "partition": "fedser.tools.commands.partition",
    "simulate": "fedser.tools.commands.simulate",
    "certs": "fedser.tools.commands.certs",
    "export": "fedser.tools.commands.export",
    "testbed": "fedser.tools.commands.testbed",
    "audit": "fedser.tools.commands.audit",
}


def _command_modules() -> dict[str, object]:
    modules = {name: importlib.import_module(path) for name, path in BUILTIN_COMMANDS.items()}
    for ep in entry_points(group="fedser.commands"):
        if ep.name not in modules:
            modules[ep.name] = ep.load()
    return modules


def build_parser(modules: dict[str, object]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedser", description="fedser tools: federated speech emotion "
                                     "recognition and keyword spotting with differential privacy")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in modules.items():
        p = sub.add_parser(name, help=getattr(module, "HELP", ""), description=getattr(module, "HELP", ""))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(_command_modules())
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except FedserError as exc:
        print(f"fedser {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedser {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
