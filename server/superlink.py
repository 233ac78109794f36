"""``fedser-superlink``: Flower's ``flower-superlink``, its SQLite state given time to queue writers.

Same arguments and behaviour as ``flower-superlink``. With its state on disk (``--database``,
which a server needs to resume after a restart), the pinned Flower's SuperLink keeps runs,
nodes and messages in one SQLite file (WAL mode) and gives a write that finds the file locked
5 s (``PRAGMA busy_timeout``) before it fails with "database is locked". Each device's reply,
heartbeat and object push is such a write; with 20 devices replying together on a 2-core
machine, writers queued longer than that, the SuperLink answered their pushes with an error,
and replies were lost (``bench/bench_fleet.py`` shows it with ``--stock``).

Here every SQLite transaction of the process waits up to ``BUSY_TIMEOUT_MS`` for the lock
instead, set through SQLAlchemy's public event API on the engines Flower creates as usual;
nothing of Flower is modified. SQLite serialises writers anyway: a longer wait does not slow
any write, it only stops a queued one from being thrown away.
"""
from __future__ import annotations

import sys
from importlib.metadata import entry_points

from sqlalchemy import event
from sqlalchemy.engine import Engine

# Long enough for a queue of writers on a loaded small machine; a request that still cannot
# write after this long fails as before.
BUSY_TIMEOUT_MS = 60_000

_installed = False


def _on_begin(connection) -> None:
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


def install_busy_timeout() -> None:
    """Give every SQLite transaction of this process ``BUSY_TIMEOUT_MS`` to get the lock (idempotent).

    Set at each transaction's start, so it holds whatever the connection's own set-up chose.
    """
    global _installed
    if _installed:
        return
    event.listen(Engine, "begin", _on_begin)
    _installed = True


def main() -> None:
    install_busy_timeout()
    (flower_superlink,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "flower-superlink"]
    sys.argv[0] = "flower-superlink"
    sys.exit(flower_superlink.load()())


if __name__ == "__main__":
    main()
