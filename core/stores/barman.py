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
from datetime import datetime
from pathlib import Path
from subprocess import CompletedProcess
from tempfile import TemporaryDirectory
from typing import Any

import anyio

from ..errors import ConfigurationError, RecoveryError, StoreUnreachable, scrub
from ..settings import Settings
from .barman_catalog import (
    ArchiveCatalog,
    ArchivedWal,
    BaseBackup,
    find_gaps,
    parse_backup,
    parse_waldump,
    parse_xlogdb,
)
from .pgclient.versions import bundled, client_version

OUTPUT_KEEP = 4000  # characters of Barman's output kept for an error message
SCAN_SEGMENTS = 16  # the newest segments read for the newest commit before the window's end is left approximate
_SUBCOMMANDS = frozenset({"check", "list-backups", "show-backup", "show-server", "cron", "receive-wal", "archive-wal",
                          "get-wal", "switch-wal", "backup", "recover"})  # fmt: skip


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
        """Move the segments pg_receivewal completed into the archive (what `cron` does each minute)."""
        return [*self._base(), "archive-wal", self.server]

    def get_wal(self, name: str) -> list[str]:
        """One archived segment, decompressed, on stdout."""
        return [*self._base(), "get-wal", self.server, name]

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


@dataclass(frozen=True)
class PgWalDump:
    """pg_waldump's transaction records of one segment: their commit and abort times bound the window.

    It reads only WAL of its own major version, hence one per server major.
    """

    binary: str

    def argv(self, directory: str, segment: str) -> list[str]:
        return [self.binary, "--rmgr=Transaction", f"--path={directory}", segment]


async def find_waldump(major: int) -> PgWalDump | None:
    """A pg_waldump of exactly `major`: the bundled one, else Debian's layout; None when there is none."""
    for path in (bundled("pg_waldump"), f"/usr/lib/postgresql/{major}/bin/pg_waldump", shutil.which("pg_waldump")):
        if path is None or not os.access(path, os.X_OK):
            continue
        try:
            if (await client_version(path, "bundled")).major == major:
                return PgWalDump(path)
        except ConfigurationError:
            continue
    return None


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

    async def _exec(self, argv: list[str], limit: float) -> CompletedProcess[bytes]:
        env = dict(os.environ if self.env is None else self.env)
        try:
            with anyio.fail_after(limit):
                return await anyio.run_process(argv, check=False, env=env, stdin=None)
        except OSError as exc:
            raise ConfigurationError(f"cannot run {argv[0]}: {exc.strerror}",
                                     "check ENGRAM_RECOVERY_BARMAN (Barman's path)") from exc  # fmt: skip
        except TimeoutError as exc:
            raise StoreUnreachable(
                f"`barman {' '.join(argv[1:])}` did not finish within {limit:.0f} s",
                "run the same command by hand to see where it waits (Barman's log_file tells more)",
            ) from exc

    async def run(self, argv: list[str], *, limit: float = 120) -> str:
        """Run argv for at most `limit` seconds; its stdout, or a RecoveryError with Barman's message and a fix."""
        result = await self._exec(argv, limit)
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
        lines = [line.strip() for line in (stderr + "\n" + stdout).splitlines() if line.strip()]
        # Barman's progress lines ("Starting local restore ...") only bury its ERROR lines.
        errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR")]
        text = " ".join(messages) or "\n".join(errors or lines)
        text = scrub(text.strip())[-OUTPUT_KEEP:] or "no message"
        action = next((arg for arg in argv[1:] if arg in _SUBCOMMANDS), "command")
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
        result = await self._exec(argv, 120)  # exit code 1 when a check failed: the JSON says which
        try:
            checks = json.loads(result.stdout.decode(errors="replace"))[self.command.server]
        except (ValueError, KeyError, TypeError):
            raise self._failure(argv, result.returncode, result.stdout.decode(errors="replace"),
                                result.stderr.decode(errors="replace")) from None  # fmt: skip
        return {name: (item.get("status") == "OK", str(item.get("hint", ""))) for name, item in checks.items()}

    async def catalog(self) -> ArchiveCatalog:
        """Every base backup (oldest first), the newest archived segment and the newest commit in the archive."""
        listed = (await self.run_json(self.command.list_backups()))["result"]
        backups = [parse_backup(await self.run_json(self.command.show_backup(entry["backup_id"])))
                   for entry in listed]  # fmt: skip
        backups.sort(key=lambda b: b.begin_time)
        server = await self.run_json(self.command.show_server())
        directory = anyio.Path(str(server.get("xlogdb_directory") or server["wals_directory"]))
        try:
            segments = parse_xlogdb(await (directory / f"{self.command.server}-xlog.db").read_text())
        except FileNotFoundError:
            segments = []  # nothing archived yet
        usable = [b for b in backups if b.usable]
        since = usable[0].begin_wal if usable else None
        size = int(server.get("xlog_segment_size") or 16 << 20)
        catalog = ArchiveCatalog(server=self.command.server, backups=backups,
                                 newest_wal=segments[-1] if segments else None, segments=segments,
                                 gaps=find_gaps(segments, since, size) if since else [],
                                 slot_name=str(server.get("slot_name") or "") or None)  # fmt: skip
        replayable = catalog.replayable
        if replayable and segments:
            catalog.last_commit, catalog.commits_read = await self._last_commit(segments, replayable[0])
        return catalog

    async def _last_commit(self, segments: list[ArchivedWal], oldest: BaseBackup) -> tuple[datetime | None, bool]:
        """The newest commit or abort time in the newest segments (none before the oldest backup counts), and
        whether the answer is sure: False without a pg_waldump of the server's version, or when the segments
        read held no commit but older ones since the backup were left unread."""
        waldump = await find_waldump(oldest.server_version // 10000) if oldest.server_version else None
        if waldump is None or oldest.begin_wal is None:
            return None, False
        floor = ArchivedWal(name=oldest.begin_wal, archived_at=oldest.begin_time, size_bytes=0).order
        env = dict(os.environ if self.env is None else self.env) | {"TZ": "UTC"}
        with TemporaryDirectory(prefix="engram-waldump-") as scratch:
            newest_first = [segment for segment in reversed(segments) if segment.order >= floor]
            for segment in newest_first[:SCAN_SEGMENTS]:
                path = Path(scratch) / segment.name
                with path.open("wb") as out:
                    got = await anyio.run_process(self.command.get_wal(segment.name), stdout=out, check=False, env=env)
                if got.returncode != 0:
                    raise self._failure(self.command.get_wal(segment.name), got.returncode, "",
                                        got.stderr.decode(errors="replace"))  # fmt: skip
                # pg_waldump exits 1 at the zeroes after a WAL switch; what it printed before that counts.
                listing = await anyio.run_process(waldump.argv(scratch, segment.name), check=False, env=env)
                path.unlink()
                newest = parse_waldump(listing.stdout.decode(errors="replace"))
                if newest is not None:
                    return newest, True
        return None, len(newest_first) <= SCAN_SEGMENTS

    async def cron(self) -> None:
        await self.run(self.command.cron())

    async def archive_wal(self) -> None:
        await self.run(self.command.archive_wal())

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
