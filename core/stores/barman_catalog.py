"""What Barman's archive holds, typed: base backups, archived WAL segments, and the window a recovery can reach.

Read from Barman's machine-readable output (`barman -f json show-backup`), its WAL
catalog file, and pg_waldump's listing of the newest segments (core/stores/barman.py runs
them). Everything here is pure, so the window logic is tested without Barman.

The window runs from the end of the oldest usable base backup (its first
consistent point) to the newest commit in the archive. Not to the newest segment's
arrival: PostgreSQL replays up to the first commit after the target time, and when
the archive ends before one it stops with "recovery ended before configured
recovery target was reached" rather than opening the database (docs/pitr.md).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field


class BaseBackup(BaseModel):
    """One base backup as Barman's `show-backup` reports it."""

    backup_id: str
    status: str = Field(description="DONE is usable; FAILED, STARTED, WAITING_FOR_WALS, ... are not (yet).")
    begin_time: datetime
    end_time: datetime | None = Field(description="None while running, or when it failed before its end.")
    begin_wal: str | None
    end_wal: str | None
    begin_lsn: str | None
    end_lsn: str | None
    timeline: int | None
    size_bytes: int
    server_version: int | None

    @property
    def usable(self) -> bool:
        return self.status == "DONE" and self.end_time is not None and self.begin_wal is not None


class ArchivedWal(BaseModel):
    """A WAL segment in Barman's archive, with the time Barman recorded for it (when the segment was complete)."""

    name: str
    archived_at: datetime
    size_bytes: int

    @property
    def order(self) -> tuple[str, str]:
        return wal_order(self.name)


def wal_order(name: str) -> tuple[str, str]:
    """Log and segment number first, then the timeline: a segment name alone sorts by timeline first."""
    return (name[8:], name[:8])


def find_gaps(segments: list[ArchivedWal], since: str, segment_size: int = 16 << 20) -> list[WalGap]:
    """Runs of segment numbers absent from `segments` (in WAL order) from `since` on, on any timeline.

    A segment name is timeline, log and segment, 8 hex digits each, with 4 GiB /
    segment_size segments per log. A promotion starts a new timeline within the
    sequence, so a position counts as present on whichever timeline holds it.
    """
    per_log = (1 << 32) // segment_size

    def position(name: str) -> int:
        return int(name[8:16], 16) * per_log + int(name[16:24], 16)

    gaps: list[WalGap] = []
    previous: ArchivedWal | None = None
    for segment in segments:
        if segment.order < wal_order(since):
            continue
        if previous is not None and position(segment.name) - position(previous.name) > 1:
            gaps.append(WalGap(after=previous.name, before=segment.name,
                               missing=position(segment.name) - position(previous.name) - 1))  # fmt: skip
        if previous is None or position(segment.name) >= position(previous.name):
            previous = segment
    return gaps


class WalGap(BaseModel):
    """Segments missing from the archive: replay cannot cross them, so no backup before a gap reaches past it."""

    after: str = Field(description="The last archived segment before the gap.")
    before: str = Field(description="The first archived segment after it.")
    missing: int


class RestorableWindow(BaseModel):
    start: datetime = Field(description="The end of the oldest usable base backup: its first consistent point.")
    end: datetime = Field(description="The newest commit in the archive (exact), or the newest segment's arrival.")
    end_is_exact: bool = Field(description="False when pg_waldump could not read the newest segments.")

    def contains(self, moment: datetime) -> bool:
        return self.start <= moment <= self.end


class ArchiveCatalog(BaseModel):
    """What Barman holds for one server: its base backups (oldest first), newest segment and newest commit."""

    server: str
    backups: list[BaseBackup]
    newest_wal: ArchivedWal | None
    last_commit: datetime | None = Field(default=None, description="The newest commit or abort in the archive.")
    commits_read: bool = Field(default=False, description="The WAL since the oldest backup was read for commits "
                               "(False: no pg_waldump of the server's version, or too many segments to read).")
    gaps: list[WalGap] = Field(default_factory=list, description="Missing segments since the oldest usable backup.")
    slot_name: str | None = Field(default=None, description="The replication slot Barman streams through.")
    # Every archived segment, oldest first: what a recovery replays (not reported: there can be thousands).
    segments: list[ArchivedWal] = Field(default_factory=list, exclude=True)

    @property
    def replayable(self) -> list[BaseBackup]:
        """The usable backups from which the WAL runs without a gap to the newest segment, oldest first."""
        usable = [b for b in self.backups if b.usable]
        if not self.gaps:
            return usable
        last_gap = max(wal_order(gap.before) for gap in self.gaps)
        return [b for b in usable if b.begin_wal is not None and wal_order(b.begin_wal) >= last_gap]

    @property
    def window(self) -> RestorableWindow | None:
        """None when there is no replayable base backup, no WAL, or no commit since the oldest one ended."""
        usable = self.replayable
        if not usable or self.newest_wal is None:
            return None
        start = usable[0].end_time
        assert start is not None  # usable backups have ended
        if self.last_commit is not None:
            return RestorableWindow(start=start, end=self.last_commit, end_is_exact=True) \
                if self.last_commit >= start else None  # fmt: skip
        if self.commits_read:
            return None  # no commit since the oldest backup: a time target would replay past the WAL's end
        return RestorableWindow(start=start, end=max(start, self.newest_wal.archived_at), end_is_exact=False)

    def base_backup_for(self, target: datetime) -> BaseBackup | None:
        """The newest usable base backup that ended at or before `target` (replay runs forward from it)."""
        candidates = [b for b in self.replayable if b.end_time is not None and b.end_time <= target]
        return candidates[-1] if candidates else None

    def wal_to_replay(self, backup: BaseBackup, target: datetime) -> list[ArchivedWal]:
        """The segments a recovery of `backup` to `target` reads: from the backup's first one to the first
        segment completed at or after `target` (the one holding the first commit after it), else to the newest."""
        if backup.begin_wal is None:
            return []
        needed: list[ArchivedWal] = []
        for segment in self.segments:
            if segment.order < wal_order(backup.begin_wal):
                continue
            needed.append(segment)
            if segment.archived_at >= target:
                break
        return needed

    def rpo_seconds(self, now: datetime) -> float | None:
        """Seconds of writes a recovery right now would lose, at most: since the newest commit in the archive."""
        newest = self.last_commit or (self.newest_wal.archived_at if self.newest_wal else None)
        return None if newest is None else max(0.0, (now - newest).total_seconds())


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    moment = datetime.fromisoformat(str(value))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _backup_id_time(backup_id: str) -> datetime:
    """Barman names a backup after its start, 20261125T094619, in its host's local time (taken as UTC, as
    containers run): only a fallback, for a backup that failed before recording its begin time."""
    return datetime.strptime(backup_id[:15], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)


def parse_backup(show_backup: dict[str, Any]) -> BaseBackup:
    """`barman -f json show-backup SERVER ID`, the inner object for the server.

    A backup that failed or is still running lacks its end (and may lack more): those
    fields are None and the backup is not usable, rather than the whole catalog failing.
    """
    base = show_backup.get("base_backup_information") or {}
    backup_id = str(show_backup["backup_id"])
    timeline, version = base.get("timeline"), show_backup.get("postgresql_version")
    return BaseBackup(
        backup_id=backup_id, status=str(show_backup.get("status") or "UNKNOWN"),
        begin_time=_time(base.get("begin_time")) or _backup_id_time(backup_id), end_time=_time(base.get("end_time")),
        begin_wal=base.get("begin_wal"), end_wal=base.get("end_wal"), begin_lsn=base.get("begin_lsn"),
        end_lsn=base.get("end_lsn"), timeline=int(timeline) if timeline else None,
        size_bytes=int(base.get("backup_size_bytes") or 0), server_version=int(version) if version else None,
    )  # fmt: skip


def parse_xlogdb(text: str) -> list[ArchivedWal]:
    """The segments in Barman's WAL catalog (`<server>-xlog.db`: name, size, time, compression per line), oldest first.

    Barman's JSON output names the newest WAL (`last_available`) but not when it
    arrived; its catalog file has both, one tab-separated line per segment, and
    that layout has been stable across Barman's releases. History files (`.history`)
    and backup labels (`.backup`) are skipped: only segments hold commits.
    """
    segments: list[ArchivedWal] = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or len(fields[0]) != 24 or "." in fields[0]:
            continue
        segments.append(ArchivedWal(name=fields[0], size_bytes=int(fields[1]),
                                    archived_at=datetime.fromtimestamp(float(fields[2]), UTC)))  # fmt: skip
    return sorted(segments, key=lambda wal: wal.order)


# pg_waldump --rmgr=Transaction, run with TZ=UTC: "desc: COMMIT 2026-11-25 09:46:23.745550 UTC; ..."
_END_OF_TRANSACTION = re.compile(r"desc: (?:COMMIT|ABORT) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


def parse_waldump(text: str) -> datetime | None:
    """The newest commit or abort time in pg_waldump's listing (both can end a recovery at a target time)."""
    found = _END_OF_TRANSACTION.findall(text)
    return max(datetime.fromisoformat(f"{stamp}+00:00") for stamp in found) if found else None
