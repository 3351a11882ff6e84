"""The one place that runs Barman, the continuous-archiving engine behind point-in-time recovery.

Barman runs beside Engram's PostgreSQL as a sidecar in streaming mode: pg_basebackup
takes base backups and pg_receivewal streams WAL, both over the replication protocol,
so nothing needs the database's data directory (docs/pitr.md says why this engine).
We never archive WAL ourselves; we drive Barman's own commands and read its
machine-readable output (`barman -f json ...`) into typed models.

`BarmanCommand` builds each argv without running anything (tests check them);
`Barman` runs them with anyio and turns a failure into a `RecoveryError` carrying
Barman's own message and a fix.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel

from .errors import ConfigurationError, RecoveryError, StoreUnreachable, scrub
from .settings import Settings

OUTPUT_KEEP = 4000  # characters of Barman's output kept for an error message


# --- the typed view of Barman's catalog --------------------------------------------------------------


class BaseBackup(BaseModel):
    """One base backup as Barman's `show-backup` reports it."""

    backup_id: str
    status: str
    begin_time: datetime
    end_time: datetime
    begin_wal: str
    end_wal: str
    begin_lsn: str
    end_lsn: str
    timeline: int
    size_bytes: int
    server_version: int

    @property
    def usable(self) -> bool:
        return self.status == "DONE"


class ArchivedWal(BaseModel):
    """A WAL segment in Barman's archive, with the time Barman recorded for it (when the segment was complete)."""

    name: str
    archived_at: datetime
    size_bytes: int


class RestorableWindow(BaseModel):
    """From the end of the oldest usable base backup (the first consistent point) to the newest archived WAL.

    The end is when the newest segment was complete: no commit after it can be
    replayed. It is an upper bound: a target after the archive's last commit but
    before `end` makes PostgreSQL stop with "recovery ended before configured
    recovery target was reached" (docs/pitr.md); under Engram's steady writes the two
    are seconds apart.
    """

    start: datetime
    end: datetime

    def contains(self, moment: datetime) -> bool:
        return self.start <= moment <= self.end


class ArchiveCatalog(BaseModel):
    """What Barman holds for one server: its base backups (oldest first) and its newest archived WAL."""

    server: str
    backups: list[BaseBackup]
    newest_wal: ArchivedWal | None

    @property
    def window(self) -> RestorableWindow | None:
        usable = [b for b in self.backups if b.usable]
        if not usable or self.newest_wal is None:
            return None
        end = max(self.newest_wal.archived_at, usable[-1].end_time)
        return RestorableWindow(start=usable[0].end_time, end=end)

    def base_backup_for(self, target: datetime) -> BaseBackup | None:
        """The newest usable base backup that ended at or before `target` (replay runs forward from it)."""
        candidates = [b for b in self.backups if b.usable and b.end_time <= target]
        return candidates[-1] if candidates else None

    def rpo_seconds(self, now: datetime) -> float | None:
        """Seconds of writes that a recovery right now could lose: the age of the newest archived WAL."""
        return None if self.newest_wal is None else max(0.0, (now - self.newest_wal.archived_at).total_seconds())


def _time(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_backup(show_backup: dict[str, Any]) -> BaseBackup:
    """`barman -f json show-backup SERVER ID`, the inner object for the server."""
    base = show_backup["base_backup_information"]
    return BaseBackup(
        backup_id=show_backup["backup_id"], status=show_backup["status"],
        begin_time=_time(base["begin_time"]), end_time=_time(base["end_time"]),
        begin_wal=base["begin_wal"], end_wal=base["end_wal"], begin_lsn=base["begin_lsn"], end_lsn=base["end_lsn"],
        timeline=int(base["timeline"]), size_bytes=int(base.get("backup_size_bytes") or 0),
        server_version=int(show_backup["postgresql_version"]),
    )  # fmt: skip


def parse_xlogdb(text: str) -> ArchivedWal | None:
    """The newest segment in Barman's WAL catalog (`<server>-xlog.db`: name, size, time, compression per line).

    Barman's JSON output names the newest WAL (`last_available`) but not when it
    arrived; its catalog file has both, one tab-separated line per segment, and
    that layout has been stable across Barman's releases. History files (`.history`)
    and backup labels (`.backup`) are skipped: only a segment bounds the window.
    """
    newest: ArchivedWal | None = None
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or len(fields[0]) != 24 or "." in fields[0]:
            continue
        wal = ArchivedWal(name=fields[0], size_bytes=int(fields[1]),
                          archived_at=datetime.fromtimestamp(float(fields[2]), UTC))  # fmt: skip
        if newest is None or (wal.name[8:], wal.name[:8]) >= (newest.name[8:], newest.name[:8]):
            newest = wal
    return newest


# --- the command object ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BarmanCommand:
    """Barman's argv for one configured server; nothing runs here."""

    binary: str
    server: str
    config: str | None = None

    def _base(self, *, json_output: bool = False) -> list[str]:
        argv = [self.binary]
        if self.config:
            argv += ["-c", self.config]
        if json_output:
            argv += ["-f", "json"]
        return argv

    def check(self) -> list[str]:
        return [*self._base(json_output=True), "check", self.server]

    def list_backups(self) -> list[str]:
        return [*self._base(json_output=True), "list-backups", self.server]

    def show_backup(self, backup_id: str) -> list[str]:
        return [*self._base(json_output=True), "show-backup", self.server, backup_id]

    def show_server(self) -> list[str]:
        return [*self._base(json_output=True), "show-server", self.server]

    def cron(self) -> list[str]:
        """Start what should run in the background (receive-wal) and archive what it received."""
        return [*self._base(), "cron"]

    def receive_wal(self, *, stop: bool = False, create_slot: bool = False) -> list[str]:
        flags = ["--stop"] if stop else ["--create-slot"] if create_slot else []
        return [*self._base(), "receive-wal", *flags, self.server]

    def archive_wal(self) -> list[str]:
        return [*self._base(), "archive-wal", self.server]

    def switch_wal(self, *, archive_timeout: int = 60) -> list[str]:
        """Close the current WAL segment on the server (after a checkpoint) and wait until Barman archived it."""
        return [*self._base(), "switch-wal", "--force", "--archive", f"--archive-timeout={archive_timeout}",
                self.server]  # fmt: skip

    def backup(self, *, wait_timeout: int = 600) -> list[str]:
        """A base backup, returning once the WAL it needs to be consistent is archived too."""
        return [*self._base(), "backup", "--wait", f"--wait-timeout={wait_timeout}", self.server]

    def recover(self, backup_id: str, destination: str, *, target_time: datetime | None = None) -> list[str]:
        """Restore `backup_id` into the new data directory `destination`, replaying WAL up to `target_time`.

        `promote` ends recovery there and opens the server read-write; `--target-time`
        is sent as ISO 8601 with its offset, so the server does not read it in its own zone.
        """
        argv = [*self._base(), "recover"]
        if target_time is not None:
            if target_time.tzinfo is None:
                raise ValueError("a recovery target time needs a time zone")
            argv += [f"--target-time={target_time.isoformat()}", "--target-action=promote"]
        return [*argv, self.server, backup_id, destination]


def find_binary(configured: str | None) -> str:
    """The configured Barman, else PATH's, else the one installed beside this Python (a virtualenv's bin/)."""
    candidates = [configured] if configured else ["barman", str(Path(sys.executable).with_name("barman"))]
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    raise ConfigurationError(
        f"Barman was not found ({configured or 'not on PATH, nor beside ' + sys.executable})",
        f"install it with `{sys.executable} -m pip install barman`, or set ENGRAM_RECOVERY_BARMAN to its path",
    )


# --- running it ----------------------------------------------------------------------------------------


class Barman:
    """Runs Barman's commands for the configured server and reads their results."""

    def __init__(self, command: BarmanCommand, *, env: dict[str, str] | None = None) -> None:
        self.command = command
        self.env = env

    @classmethod
    def from_settings(cls, settings: Settings) -> Barman:
        if not settings.barman_config:
            raise ConfigurationError(
                "no Barman configuration is set (point-in-time recovery needs one)",
                "set ENGRAM_RECOVERY_BARMAN_CONFIG to Barman's configuration file (docs/pitr.md has one)",
            )
        return cls(BarmanCommand(find_binary(settings.barman), settings.barman_server, settings.barman_config))

    async def run(self, argv: list[str], *, limit: float = 120) -> str:
        """Run argv for at most `limit` seconds; its stdout, or a RecoveryError with Barman's message and a fix."""
        env = dict(os.environ if self.env is None else self.env)
        try:
            with anyio.fail_after(limit):
                result = await anyio.run_process(argv, check=False, env=env, stdin=None)
        except OSError as exc:
            raise ConfigurationError(f"cannot run {argv[0]}: {exc.strerror}",
                                     "check ENGRAM_RECOVERY_BARMAN (Barman's path)") from exc  # fmt: skip
        except TimeoutError as exc:
            raise StoreUnreachable(
                f"`barman {' '.join(argv[1:])}` did not finish within {limit:.0f} s",
                "run the same command by hand to see where it waits (Barman's log_file tells more)",
            ) from exc
        stdout = result.stdout.decode(errors="replace")
        if result.returncode != 0:
            raise self._failure(argv, result.returncode, stdout, result.stderr.decode(errors="replace"))
        return stdout

    def _failure(self, argv: list[str], code: int, stdout: str, stderr: str) -> RecoveryError:
        messages: list[str] = []
        try:
            messages = [str(m) for m in json.loads(stdout).get("_ERROR", [])]
        except (ValueError, AttributeError):
            pass
        text = " ".join(messages) or "\n".join(line for line in (stderr + "\n" + stdout).splitlines()
                                               if line.strip())  # fmt: skip
        text = scrub(text.strip())[-OUTPUT_KEEP:] or "no message"
        action = argv[argv.index(self.command.server) - 1] if self.command.server in argv else argv[-1]
        config = f" -c {self.command.config}" if self.command.config else ""
        if "Unknown server" in text or "Unknown server" in stderr:
            fix = (f"configure a server [{self.command.server}] in Barman's configuration, or set "
                   "ENGRAM_RECOVERY_BARMAN_SERVER to the one you configured")  # fmt: skip
        elif action in ("backup", "switch-wal", "receive-wal"):
            fix = f"run `barman{config} check {self.command.server}` and fix each FAILED line (docs/pitr.md)"
        else:
            fix = "see Barman's message above and its log_file (named in its configuration)"
        return RecoveryError(f"barman {action} failed (exit code {code}): {text}", fix)

    async def run_json(self, argv: list[str], *, limit: float = 120) -> dict[str, Any]:
        stdout = await self.run(argv, limit=limit)
        try:
            document = json.loads(stdout)
        except ValueError as exc:
            raise RecoveryError(f"`barman {' '.join(argv[1:])}` did not print JSON: {scrub(stdout[:300])}",
                                "check that ENGRAM_RECOVERY_BARMAN is Barman 3 or newer") from exc  # fmt: skip
        inner = document.get(self.command.server)
        if not isinstance(inner, dict | list):
            raise RecoveryError(f"Barman reported nothing for server {self.command.server!r}",
                                "set ENGRAM_RECOVERY_BARMAN_SERVER to the server configured in Barman")  # fmt: skip
        return {"result": inner} if isinstance(inner, list) else inner

    async def check(self) -> dict[str, tuple[bool, str]]:
        """Barman's own checks: name -> (passed, hint). A failed check is a finding, not an error."""
        argv = self.command.check()
        env = dict(os.environ if self.env is None else self.env)
        result = await anyio.run_process(argv, check=False, env=env)
        try:
            checks = json.loads(result.stdout.decode(errors="replace"))[self.command.server]
        except (ValueError, KeyError, TypeError):
            raise self._failure(argv, result.returncode, result.stdout.decode(errors="replace"),
                                result.stderr.decode(errors="replace")) from None  # fmt: skip
        return {name: (item.get("status") == "OK", str(item.get("hint", ""))) for name, item in checks.items()}

    async def catalog(self) -> ArchiveCatalog:
        """Every base backup (oldest first) and the newest archived WAL, as Barman knows them."""
        listed = (await self.run_json(self.command.list_backups()))["result"]
        backups = [parse_backup(await self.run_json(self.command.show_backup(entry["backup_id"])))
                   for entry in listed]  # fmt: skip
        backups.sort(key=lambda b: b.end_time)
        server = await self.run_json(self.command.show_server())
        directory = anyio.Path(str(server.get("xlogdb_directory") or server["wals_directory"]))
        try:
            newest = parse_xlogdb(await (directory / f"{self.command.server}-xlog.db").read_text())
        except FileNotFoundError:
            newest = None  # nothing archived yet
        return ArchiveCatalog(server=self.command.server, backups=backups, newest_wal=newest)

    async def cron(self) -> None:
        await self.run(self.command.cron())

    async def stop_receiving(self) -> None:
        await self.run(self.command.receive_wal(stop=True))

    async def switch_wal(self, *, archive_timeout: int = 60) -> None:
        await self.run(self.command.switch_wal(archive_timeout=archive_timeout), limit=archive_timeout + 30)

    async def backup(self, *, wait_timeout: int = 600) -> BaseBackup:
        """Take a base backup; the new backup as the catalog then reports it."""
        before = {b.backup_id for b in (await self.catalog()).backups}
        await self.run(self.command.backup(wait_timeout=wait_timeout), limit=wait_timeout + 600)
        new = [b for b in (await self.catalog()).backups if b.backup_id not in before]
        if not new:
            raise RecoveryError("barman backup finished but no new backup is in its catalog",
                                f"run `barman list-backups {self.command.server}` and read Barman's log")  # fmt: skip
        return new[-1]

    async def recover(self, backup_id: str, destination: Path, *, target_time: datetime | None = None,
                      limit: float = 3600) -> None:  # fmt: skip
        """Restore into `destination`, which must not exist yet: a recovery never writes over a directory."""
        if await anyio.Path(destination).exists():
            raise ConfigurationError(f"{destination} already exists",
                                     "recover into a new directory (an existing one is never overwritten)")  # fmt: skip
        await self.run(self.command.recover(backup_id, str(destination), target_time=target_time), limit=limit)
