"""`engram-recovery schedule`: the container's cron. When each job is due, and a real run logged as one JSON line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from support import EXE, EngramDB, engram_env

from engram_recovery.core.errors import ConfigurationError
from engram_recovery.server.schedule import Job, jobs


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_a_daily_job_is_due_at_its_next_time_of_day_and_a_weekly_one_on_its_weekday() -> None:
    backup = Job("run_backup", (3, 15))
    assert backup.next_after(at("2026-11-25T02:00:00")) == at("2026-11-25T03:15:00")
    assert backup.next_after(at("2026-11-25T03:15:00")) == at("2026-11-26T03:15:00")  # just ran: tomorrow
    assert backup.next_after(at("2026-12-31T23:59:59")) == at("2027-01-01T03:15:00")
    drill = Job("restore_drill", (4, 30), weekday=6)  # Sunday
    assert drill.next_after(at("2026-11-25T10:00:00")) == at("2026-11-29T04:30:00")  # a Wednesday
    assert drill.next_after(at("2026-11-29T04:29:00")) == at("2026-11-29T04:30:00")
    assert drill.next_after(at("2026-11-29T04:30:00")) == at("2026-12-06T04:30:00")


def test_the_plan_is_read_from_times_and_a_weekday_and_refuses_nonsense() -> None:
    plan = jobs("03:15", "Sunday", "04:30")
    assert [(j.tool, j.at, j.weekday) for j in plan] == [("run_backup", (3, 15), None), ("restore_drill", (4, 30), 6)]
    assert [j.tool for j in jobs("03:15", "never", "04:30")] == ["run_backup"]
    for bad in (("25:00", "sun", "04:30"), ("3.15", "sun", "04:30"), ("03:15", "someday", "04:30")):
        with pytest.raises(ConfigurationError):
            jobs(*bad)


def test_bad_schedule_settings_exit_2_with_the_fix(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "DATABASE_URL": "postgresql://u@127.0.0.1/x"}
    done = subprocess.run([EXE, "schedule", "--backup-at", "3am"], capture_output=True, text=True, timeout=60,
                          env=env)  # fmt: skip
    assert done.returncode == 2 and "not a time of day" in done.stderr and "HH:MM" in done.stderr


@pytest.mark.anyio
async def test_the_scheduler_runs_a_backup_and_logs_one_json_line_then_stops_on_sigterm(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    log = tmp_path / "engram-recovery.jsonl"
    first, rest, err, code = await anyio.to_thread.run_sync(_schedule_once, engram_env(engram_db, tmp_path), log)
    assert code == 0, err
    lines = log.read_text().splitlines()
    record = json.loads(lines[0])
    assert len(lines) == 1 and record["tool"] == "run_backup" and record["result"]["backup_id"]
    assert record["exit"] == 1 and record["verdict"] == "warn"  # no backup key here: told apart from a failure
    assert [first.rstrip("\n"), *rest.splitlines()] == lines  # the same line on stdout, for `docker compose logs`
    assert "run_backup at 03:15 UTC daily" in err


def _schedule_once(env: dict[str, str], log: Path) -> tuple[str, str, str, int]:
    """Start the scheduler with --run-now, wait for its first line on stdout, then stop it as `docker stop` does."""
    proc = subprocess.Popen([EXE, "schedule", "--run-now", "--drill-on", "never", "--log", str(log)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    watchdog = threading.Timer(120, proc.kill)  # bounds the wait for the first line
    watchdog.start()
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    return first, rest, err, proc.returncode
