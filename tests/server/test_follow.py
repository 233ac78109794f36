"""How ``fedser-server start`` follows its run: the progress log every half second, the SuperLink
(a ``flwr ls`` process per question) seldom, and at once when the ServerApp logs its end."""
from __future__ import annotations

import types

import pytest

from fedser.server import flower_cli
from fedser.server.cli import _ends_run
from fedser.server.flower_cli import RunStatus


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _follow(monkeypatch, ends_at: float, logged_at: float | None):
    clock = FakeClock()
    monkeypatch.setattr(flower_cli, "time", types.SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep))
    asked = []

    def run_status(run_id, connection, env=None):
        asked.append(clock.now)
        return RunStatus(run_id, "finished" if clock.now >= ends_at else "running",
                         "completed" if clock.now >= ends_at else "", "")

    monkeypatch.setattr(flower_cli, "run_status", run_status)
    hint = None if logged_at is None else (lambda: clock.now >= logged_at)
    status = flower_cli.wait_for_run(7, env={}, timeout=600, poll=15.0, check_now=hint)
    return status, asked, clock.now


def test_the_superlink_is_asked_at_once_when_the_progress_log_says_the_run_ended(monkeypatch):
    # Execute: the ServerApp logs its end at 31 s; the SuperLink marks the run finished at 34 s
    status, asked, ended = _follow(monkeypatch, ends_at=34.0, logged_at=31.0)

    # Assert: every 15 s until the hint, then at once, then every 2 s
    assert status.succeeded
    assert asked == pytest.approx([0.0, 15.0, 30.0, 31.0, 33.0, 35.0])
    assert ended == pytest.approx(35.0)


def test_without_a_hint_the_superlink_is_asked_every_poll(monkeypatch):
    status, asked, ended = _follow(monkeypatch, ends_at=34.0, logged_at=None)

    assert status.succeeded
    assert asked == pytest.approx([0.0, 15.0, 30.0, 45.0])


@pytest.mark.parametrize(("line", "ends"), [
    ("07:17:09 run complete", True),
    ("07:17:09 run failed: ConfigError: min-clients must be >= 1", True),
    ("07:16:16 round 3/3: training", False),
    ("07:16:16 resuming after round 1", False),
    ("run complete", False),          # not a progress line (no time stamp)
])
def test_the_servers_last_progress_lines_are_recognised(line, ends):
    assert _ends_run(line) is ends


def test_a_serverapp_that_fails_logs_why_as_its_last_progress_line(tmp_path):
    # Prepare: a run directory that already holds a run, started again without --resume
    from flwr.app import Context, RecordDict

    from fedser.server.app import main

    (tmp_path / "checkpoint.pt").write_bytes(b"")
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"run-dir": str(tmp_path), "min-clients": 2})

    # Execute
    with pytest.raises(Exception, match="already holds a run"):
        main(None, context)

    # Assert
    last = (tmp_path / "progress.log").read_text().splitlines()[-1]
    assert _ends_run(last) and "run failed: ConfigError" in last and "already holds a run" in last
