"""`engram-recovery schedule`: run_backup every day and restore_drill every week, for a container without cron.

The image has Python and this package, nothing else: no cron daemon, no supercronic. So the
scheduler is a small loop that sleeps until the next time, then runs the job as a fresh
`engram-recovery call <tool> --jsonl` process (a failure or leak in one run cannot touch the
next) and appends its one JSON line to the log and to stdout (`docker compose logs`).
Times are UTC. A run that is still going when the next is due makes the next wait: never two
at once (run_backup refuses a concurrent run anyway). SIGTERM (docker stop) lets the current
run finish its cleanup by passing the signal on, then exits.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType

from ..core.errors import ConfigurationError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class Job:
    tool: str
    at: tuple[int, int]  # hour, minute (UTC)
    weekday: int | None = None  # 0 = Monday; None: every day

    def next_after(self, now: datetime) -> datetime:
        """The first time strictly after `now` at which this job is due."""
        candidate = now.replace(hour=self.at[0], minute=self.at[1], second=0, microsecond=0)
        while candidate <= now or (self.weekday is not None and candidate.weekday() != self.weekday):
            candidate += timedelta(days=1)
        return candidate


def parse_time(text: str, setting: str) -> tuple[int, int]:
    hour, sep, minute = text.strip().partition(":")
    if sep and hour.isdigit() and minute.isdigit() and int(hour) < 24 and int(minute) < 60 and len(minute) == 2:
        return int(hour), int(minute)
    raise ConfigurationError(f"{setting} is {text!r}, not a time of day",
                             f"write {setting} as HH:MM in UTC, e.g. 03:15")  # fmt: skip


def parse_day(text: str) -> int | None:
    """A weekday name (mon..sun), or 'never' / '' for no drill."""
    day = text.strip().lower()[:3]
    if day in ("", "nev", "off"):
        return None
    if day in DAYS:
        return DAYS.index(day)
    raise ConfigurationError(f"the drill day {text!r} is not a weekday", "write mon, tue, ... sun, or never")


def jobs(backup_at: str, drill_on: str, drill_at: str) -> list[Job]:
    out = [Job("run_backup", parse_time(backup_at, "--backup-at"))]
    day = parse_day(drill_on)
    if day is not None:
        out.append(Job("restore_drill", parse_time(drill_at, "--drill-at"), day))
    return out


class Scheduler:
    def __init__(self, plan: list[Job], log: Path | None, env_file: str | None) -> None:
        self.plan = plan
        self.log = log
        self.env_file = env_file
        self.stopping = False
        self.child: subprocess.Popen[str] | None = None

    def stop(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def run_job(self, tool: str) -> int:
        argv = [sys.executable, "-m", "engram_recovery.server.cli"]
        if self.env_file:
            argv += ["--env-file", self.env_file]
        argv += ["call", tool, "--jsonl"]
        # stderr (the one-line reason of a failure) goes to the container's log as it comes.
        self.child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        out, _ = self.child.communicate()
        code = self.child.returncode
        self.child = None
        for line in out.splitlines():
            if line.strip():
                self._write(line)
        return code

    def _write(self, line: str) -> None:
        print(line, flush=True)
        if self.log is not None:
            with self.log.open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    def loop(self, run_now: bool) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        plan = ", ".join(f"{j.tool} at {j.at[0]:02d}:{j.at[1]:02d} UTC"
                         + (f" on {DAYS[j.weekday]}" if j.weekday is not None else " daily") for j in self.plan)
        print(f"engram-recovery schedule: {plan}" + (f"; log {self.log}" if self.log else ""), file=sys.stderr,
              flush=True)
        if run_now:
            self.run_job("run_backup")
        due = {job: job.next_after(datetime.now(UTC)) for job in self.plan}
        while not self.stopping:
            now = datetime.now(UTC)
            # In the plan's order, run_backup first: a drill due at the same time drills the new backup.
            for job in [j for j in self.plan if due[j] <= now]:
                if self.stopping:
                    break
                self.run_job(job.tool)
            for job, when in list(due.items()):
                if when <= now:
                    due[job] = job.next_after(datetime.now(UTC))
            # Short sleeps: a changed clock or a stop request is noticed within a few seconds.
            wait = min(due.values()) - datetime.now(UTC)
            time.sleep(max(0.0, min(wait.total_seconds(), 5.0)))
        return 0
