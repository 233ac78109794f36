"""``fedser-superlink``: SQLite writers that wait their turn instead of failing.

The failure it removes, reproduced on a real SQLite file with the pinned Flower's settings (WAL,
a busy timeout, scaled down here from 5 s to 0.3 s to keep the test short): a write that finds
the lock held longer than the busy timeout fails with "database is locked". With
``install_busy_timeout`` the same write waits, and concurrent writers from many threads all land.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from fedser.server import superlink

STOCK_BUSY_MS = 300


def _engine(path):
    engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _flower_pragmas(dbapi_conn, _record):   # what the pinned Flower sets on each connection
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute(f"PRAGMA busy_timeout = {STOCK_BUSY_MS}")
        cur.close()

    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY, n INTEGER)"))
        conn.execute(text("INSERT OR IGNORE INTO counter VALUES (1, 0)"))
    return engine


@pytest.fixture
def patient():
    superlink._installed = False
    superlink.install_busy_timeout()
    yield
    event.remove(Engine, "begin", superlink._on_begin)
    superlink._installed = False


def _increment(engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE counter SET n = n + 1 WHERE id = 1"))


def _write_behind_a_slow_writer(engine, hold_s: float) -> None:
    """Write while another connection holds the write lock for ``hold_s`` seconds."""
    locked = threading.Event()

    def slow_writer() -> None:
        with engine.begin() as conn:
            conn.execute(text("UPDATE counter SET n = n + 1 WHERE id = 1"))
            locked.set()
            time.sleep(hold_s)

    holder = threading.Thread(target=slow_writer)
    holder.start()
    locked.wait(10)
    try:
        _increment(engine)
    finally:
        holder.join()


def test_stock_busy_timeout_throws_a_queued_write_away(tmp_path):
    # Prepare
    engine = _engine(tmp_path / "state.db")

    # Execute / Assert
    with pytest.raises(OperationalError, match="database is locked"):
        _write_behind_a_slow_writer(engine, hold_s=3 * STOCK_BUSY_MS / 1000)
    engine.dispose()


def test_with_the_longer_busy_timeout_queued_writes_all_land(tmp_path, patient):
    # Prepare
    engine = _engine(tmp_path / "state.db")
    errors: list[BaseException] = []
    threads_n, per_thread = 8, 25

    def work() -> None:
        try:
            for _ in range(per_thread):
                _increment(engine)
        except BaseException as exc:   # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    # Execute: one write behind a slow writer, then many writers at once.
    _write_behind_a_slow_writer(engine, hold_s=3 * STOCK_BUSY_MS / 1000)
    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # Assert
    with engine.connect() as conn:
        total = conn.execute(text("SELECT n FROM counter WHERE id = 1")).scalar_one()
    engine.dispose()
    assert not errors, errors[:3]
    assert total == 2 + threads_n * per_thread


def test_fedser_superlink_is_flowers_superlink():
    # Execute
    done = subprocess.run([sys.executable, "-m", "fedser.server.superlink", "--help"], capture_output=True,
                          text=True, timeout=120)

    # Assert
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: flower-superlink") and "--fleet-api-address" in done.stdout
