"""backup_status's repository checks: the newest backup and the last restore drill."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from ...core.repository import read_state
from ...core.retention import Candidate, decide
from ...core.retention_apply import policy_of
from ..base import Verdict
from .common import Check, StatusContext, format_age, format_size

DRILL_MAX_AGE = timedelta(days=31)


# --- last backup ------------------------------------------------------------------------


async def check_last_backup(ctx: StatusContext) -> Check:
    settings = ctx.runtime.settings
    state = await read_state(settings)
    newest = state.newest
    details: dict[str, Any] = {
        "repository": state.location,
        "complete_backups": len(state.backups),
        "incomplete_folders": state.incomplete,
    }
    decision = decide(
        [Candidate(b.backup_id, b.finished_at, b.verified) for b in state.backups], policy_of(settings)
    )
    details["retention"] = {
        "policy": {"keep_last": settings.keep_last, "keep_daily": settings.keep_daily,
                   "keep_weekly": settings.keep_weekly, "keep_monthly": settings.keep_monthly},
        "kept": len(decision.keep),
        "prunable": decision.delete,
        "oldest_kept": min((b.finished_at for b in state.backups if b.backup_id in decision.keep),
                           default=None),
    }
    if newest is None:
        return Check(
            component="last_backup",
            status="fail",
            summary="no backup yet: nothing could be recovered. Run run_backup (and schedule it)",
            details=details,
        )
    age = datetime.now(UTC) - newest.finished_at
    limit = timedelta(hours=settings.max_backup_age_hours)
    details |= {
        "backup_id": newest.backup_id,
        "finished_at": newest.finished_at.isoformat(),
        "age_hours": round(age.total_seconds() / 3600, 2),
        "size_bytes": newest.size_bytes,
        "verified": newest.verified,
        "verified_at": newest.verified_at.isoformat() if newest.verified_at else None,
        "max_age_hours": settings.max_backup_age_hours,
    }
    newest_verified = state.newest_verified
    if newest_verified is not None and newest_verified is not newest:
        details["newest_verified"] = {"backup_id": newest_verified.backup_id,
                                      "finished_at": newest_verified.finished_at.isoformat()}
    if isinstance(details["retention"]["oldest_kept"], datetime):
        details["retention"]["oldest_kept"] = details["retention"]["oldest_kept"].isoformat()
    status: Verdict = "ok"
    notes: list[str] = []
    if age > limit:
        status = "fail"
        notes.append(f"older than {settings.max_backup_age_hours:g} h")
    if newest.verified is False:
        status = "fail"
        notes.append("its checksums did not verify")
    elif newest.verified is None and status == "ok":
        status = "warn"
        notes.append("not verified yet")
    summary = f"newest backup {newest.backup_id} is {format_age(age)} old, {format_size(newest.size_bytes)}"
    summary += ", verified" if newest.verified else ""
    if notes:
        summary += ": " + ", ".join(notes)
    summary += f"; {len(state.backups)} kept"
    if decision.delete:
        summary += f", {len(decision.delete)} beyond the retention policy (run_backup prune=true confirm=true)"
    if state.incomplete:
        summary += (f"; {len(state.incomplete)} incomplete folder(s) from an interrupted or running backup "
                    "(the next run deletes them)")
    return Check(component="last_backup", status=status, summary=summary, details=details)


# --- restore drill ------------------------------------------------------------------------


async def check_restore_drill(ctx: StatusContext) -> Check:
    state = await read_state(ctx.runtime.settings)
    last_ok = state.last_successful_drill
    last_any = max(state.drills, key=lambda d: d.at, default=None)
    details: dict[str, Any] = {"drills_recorded": len(state.drills)}
    if last_any is not None:
        details["last_drill"] = {"at": last_any.at.isoformat(), "ok": last_any.ok, "backup_id": last_any.backup_id}
    if last_ok is None:
        return Check(
            component="restore_drill", status="warn", details=details,
            summary="no restore drill has ever succeeded: a backup that has never been restored is not yet a "
            "backup. Run restore_drill",
        )
    age = datetime.now(UTC) - last_ok.at
    details["last_successful"] = {
        "at": last_ok.at.isoformat(), "backup_id": last_ok.backup_id, "rto_seconds": last_ok.rto_seconds,
    }
    status: Verdict = "warn" if age > DRILL_MAX_AGE else "ok"
    summary = f"last successful drill {format_age(age)} ago (RTO {last_ok.rto_seconds or 0:.0f} s)"
    if last_any is not None and not last_any.ok:
        status = "warn"
        summary += "; the most recent drill FAILED"
    return Check(component="restore_drill", status=status, summary=summary, details=details)
