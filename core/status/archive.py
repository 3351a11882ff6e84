"""backup_status's check of the continuous archive (point-in-time recovery through Barman, docs/pitr.md).

Present when ENGRAM_RECOVERY_BARMAN_CONFIG is set; otherwise a neutral ok (the dumps are the recovery
points and last_backup judges them). Reads Barman's own check, its catalog (the newest segment and its
age, the newest commit, gaps, the restorable window, the RPO) and, where DATABASE_URL's role can read
them, the source's view: the replication slot Barman streams from (with its receiver, from
pg_stat_replication) and pg_stat_archiver.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from ..errors import RecoveryError
from ..stores.barman import Barman
from ..stores.barman_catalog import ArchiveCatalog, RestorableWindow, WalGap
from ..verdict import Verdict
from .common import Check, StatusContext, format_age


class SourceArchiving(BaseModel):
    """The archived server's side, read through DATABASE_URL (None fields: not readable with its role)."""

    slot: str | None = Field(description="The replication slot Barman streams from (Barman's slot_name).")
    slot_found: bool = False
    slot_active: bool | None = Field(default=None, description="A receiver (pg_receivewal) holds the slot now.")
    slot_wal_status: str | None = Field(default=None, description="reserved, extended, unreserved or lost.")
    receiver_state: str | None = Field(default=None, description="pg_stat_replication's state of that receiver.")
    receiver_lag_bytes: int | None = Field(default=None, description="WAL written but not yet flushed by it.")
    archive_mode: str | None = None
    archiver_failed_count: int | None = Field(default=None, description="pg_stat_archiver (archive_command).")
    archiver_last_failed_wal: str | None = None
    archiver_failing: bool = Field(default=False, description="Its last attempt failed (after its last success).")


class ArchiveStatus(BaseModel):
    """The continuous archive's health, as backup_status reports it."""

    configured: bool = Field(description="False: ENGRAM_RECOVERY_BARMAN_CONFIG is unset, no PITR here.")
    server: str | None = None
    newest_wal: str | None = Field(default=None, description="The newest archived WAL segment.")
    newest_wal_archived_at: datetime | None = None
    newest_wal_age_seconds: float | None = None
    last_commit: datetime | None = Field(default=None, description="The newest commit in the archive.")
    rpo_seconds: float | None = Field(default=None, description="At most this many seconds of commits would be "
                                      "lost by a recovery now (since the archive's newest commit).")  # fmt: skip
    max_rpo_seconds: float | None = Field(default=None, description="ENGRAM_RECOVERY_MAX_RPO_SECONDS.")
    window: RestorableWindow | None = Field(default=None, description="The times a recovery can reach.")
    base_backups: int = Field(default=0, description="Usable base backups (DONE).")
    gaps: list[WalGap] = Field(default_factory=list)
    barman_failed: dict[str, str] = Field(default_factory=dict, description="Barman's FAILED checks: name -> hint.")
    source: SourceArchiving | None = None
    source_error: str | None = Field(default=None, description="Why the source's view could not be read.")


_SOURCE_SQL = """
SELECT s.active, s.wal_status, r.state,
       CASE WHEN pg_is_in_recovery() OR r.flush_lsn IS NULL THEN NULL
            ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), r.flush_lsn)::bigint END AS lag
FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
WHERE s.slot_name = $1
"""
_ARCHIVER_SQL = """
SELECT current_setting('archive_mode') AS archive_mode, failed_count, last_failed_wal,
       coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false) AS failing
FROM pg_stat_archiver
"""


async def _source(ctx: StatusContext, slot: str | None) -> SourceArchiving:
    source = SourceArchiving(slot=slot)
    async with ctx.runtime.pool.acquire() as conn:
        if slot:
            row = await conn.fetchrow(_SOURCE_SQL, slot)
            if row is not None:
                source.slot_found, source.slot_active, source.slot_wal_status = True, row["active"], row["wal_status"]
                source.receiver_state, source.receiver_lag_bytes = row["state"], row["lag"]
        archiver = await conn.fetchrow(_ARCHIVER_SQL)
        if archiver is not None:
            source.archive_mode, source.archiver_failed_count = archiver["archive_mode"], archiver["failed_count"]
            source.archiver_last_failed_wal = archiver["last_failed_wal"]
            source.archiver_failing = bool(archiver["failing"]) and archiver["archive_mode"] != "off"
    return source


def judge(status: ArchiveStatus, catalog: ArchiveCatalog, config: str) -> tuple[Verdict, list[str]]:
    """The verdict and its reasons, each with its fix: fail when a recovery now is impossible or loses too much."""
    fails: list[str] = []
    warns: list[str] = []
    check = f"barman -c {config} check {status.server}"
    for name, hint in status.barman_failed.items():
        fix = {"receive_wal_running": f"start the receiver: `barman -c {config} cron` (and keep cron running)"}.get(
            name, f"see `{check}`")
        fails.append(f"Barman's check {name} FAILED{f' ({hint})' if hint else ''}; fix: {fix}")
    if not status.base_backups:
        fails.append(f"no usable base backup; fix: `barman -c {config} backup --wait {status.server}`")
    elif status.window is None and status.gaps:
        fails.append("no restorable window (a gap in the WAL after every base backup); fix: take a new base backup "
                     f"(`barman -c {config} backup --wait {status.server}`)")  # fmt: skip
    elif status.window is None:  # e.g. just after the first base backup on a quiet server: it restores to its end
        warns.append("no commit archived since the oldest base backup ended, so no time can be targeted yet; "
                     "the next write opens the window")
    if status.rpo_seconds is not None and status.max_rpo_seconds is not None \
            and status.rpo_seconds > status.max_rpo_seconds:  # fmt: skip
        fails.append(f"RPO {status.rpo_seconds:.0f} s exceeds ENGRAM_RECOVERY_MAX_RPO_SECONDS="
                     f"{status.max_rpo_seconds:g} (the archive's newest commit is old); fix: check that Barman "
                     f"receives WAL (`{check}`) and "
                     "that archive_timeout is set (check_archiving); an idle server shows this until its next write")
    source = status.source
    if source is not None:
        if source.slot_found and source.slot_wal_status == "lost":
            fails.append(f"the slot {source.slot} lost WAL the archive never got (a gap); fix: take a new base backup")
        elif source.slot and not source.slot_found:
            warns.append(f"the slot {source.slot} Barman streams from is not on DATABASE_URL's server; fix: "
                         f"`barman -c {config} receive-wal --create-slot {status.server}` (or is Barman's conninfo "
                         "another server?)")  # fmt: skip
        if source.archiver_failing:
            warns.append(f"pg_stat_archiver: archive_command is failing ({source.archiver_last_failed_wal}); WAL piles "
                         "up on the server; fix: repair archive_command or set archive_mode=off (Barman streams)")
    if status.gaps and status.window is not None:
        missing = sum(g.missing for g in status.gaps)
        warns.append(f"{missing} WAL segment(s) missing (after {status.gaps[0].after}): older base backups cannot "
                     "replay past the gap; the window starts after it")  # fmt: skip
    if status.window is not None and not status.window.end_is_exact:
        warns.append("the window's end is the newest segment's arrival, not its newest commit (no pg_waldump of the "
                     "server's version); fix: install PostgreSQL's client of that version")
    verdict: Verdict = "fail" if fails else "warn" if warns else "ok"
    return verdict, fails + warns


async def check_archive(ctx: StatusContext) -> Check:
    settings = ctx.runtime.settings
    if not settings.barman_config:
        ctx.reports["archive"] = ArchiveStatus(configured=False)
        return Check(component="archive", status="ok", details={"configured": False},
                     summary="point-in-time recovery is not configured (ENGRAM_RECOVERY_BARMAN_CONFIG unset): the "
                     "dumps are the recovery points (docs/pitr.md sets up Barman)")  # fmt: skip
    barman = Barman.from_settings(settings)
    checks = await barman.check()
    catalog = await barman.catalog()
    now = datetime.now(UTC)
    newest = catalog.newest_wal
    status = ArchiveStatus(
        configured=True, server=settings.barman_server, newest_wal=newest.name if newest else None,
        newest_wal_archived_at=newest.archived_at if newest else None,
        newest_wal_age_seconds=round((now - newest.archived_at).total_seconds(), 1) if newest else None,
        last_commit=catalog.last_commit, max_rpo_seconds=settings.max_rpo_seconds,
        rpo_seconds=None if (rpo := catalog.rpo_seconds(now)) is None else round(rpo, 1), window=catalog.window,
        base_backups=sum(b.usable for b in catalog.backups), gaps=catalog.gaps,
        barman_failed={name: hint for name, (passed, hint) in checks.items() if not passed},
    )  # fmt: skip
    try:  # the slot comes from the catalog's show-server: Barman's costliest command, asked once
        status.source = await _source(ctx, catalog.slot_name)
    except RecoveryError as exc:
        status.source_error = str(exc).replace("\n", " ")
    ctx.reports["archive"] = status
    verdict, reasons = judge(status, catalog, settings.barman_config)
    details: dict[str, Any] = status.model_dump(mode="json", exclude={"configured"})
    if verdict == "ok":
        assert status.window is not None and status.rpo_seconds is not None
        summary = (f"archive healthy: newest WAL {status.newest_wal} "
                   f"{format_age(now - newest.archived_at) if newest else '?'} old, RPO {status.rpo_seconds:.0f} s, "
                   f"restorable {status.window.start.isoformat(timespec='seconds')} to "
                   f"{status.window.end.isoformat(timespec='seconds')}")  # fmt: skip
    else:
        summary = f"archive {'broken' if verdict == 'fail' else 'degraded'}: " + "; ".join(reasons)
    return Check(component="archive", status=verdict, summary=summary, details=details)
