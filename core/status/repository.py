"""backup_status's repository checks: the newest backup and the last restore drill."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from ..errors import RecoveryError
from ..repository import open_repository
from ..repository.prune import policy_of
from ..repository.records import RepositoryState, Verified, read_state
from ..repository.retention import Candidate, decide
from ..repository.verification import record, reverify
from ..verdict import Verdict
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
    if ctx.deep:
        state = await _reverify(ctx, state, newest.backup_id, details)
    proof = state.last_verdict(newest)
    if proof is not None:
        details["last_verified"] = _proof(proof)
    failed = state.failed_backups()
    if failed:
        details["failed_backups"] = {backup_id: _proof(p) for backup_id, p in failed.items()}
    if proof is None:
        status = "warn" if status == "ok" else status
        notes.append("not verified yet")
    elif not proof.ok:
        status = "fail"
        notes.append(f"it FAILED verification {_how(proof)} {format_age(datetime.now(UTC) - proof.at)} ago: "
                     f"{proof.problem}; do not count on it, choose another recovery point and run run_backup")
    summary = f"newest backup {newest.backup_id} is {format_age(age)} old, {format_size(newest.size_bytes)}"
    if proof is not None and proof.ok:
        summary += f", verified {_how(proof)} {format_age(datetime.now(UTC) - proof.at)} ago"
    if notes:
        summary += ": " + ", ".join(notes)
    older_failed = sorted(b for b in failed if b != newest.backup_id)
    if older_failed:
        status = "warn" if status == "ok" else status
        summary += (f"; {len(older_failed)} older backup(s) FAILED verification or a drill: "
                    f"{', '.join(older_failed[:5])}")
    summary += f"; {len(state.backups)} kept"
    if decision.delete:
        summary += f", {len(decision.delete)} beyond the retention policy (run_backup prune=true confirm=true)"
    if state.incomplete:
        summary += (f"; {len(state.incomplete)} incomplete folder(s) from an interrupted or running backup "
                    "(the next run deletes them)")
    return Check(component="last_backup", status=status, summary=summary, details=details)


def _how(proof: Verified) -> str:
    return {"at write": "at write", "drill": "by a restore drill"}.get(proof.how, f"by a {proof.how}")


def _proof(proof: Verified) -> dict[str, Any]:
    return {"at": proof.at.isoformat(), "how": proof.how, "ok": proof.ok, "problem": proof.problem}


async def _reverify(
    ctx: StatusContext, state: RepositoryState, backup_id: str, details: dict[str, Any]
) -> RepositoryState:
    """Verify the newest backup again, and those that failed before (so a repaired one is cleared); record each."""
    again = [backup_id, *sorted(b for b in state.failed_backups() if b != backup_id)]
    done = []
    async with open_repository(ctx.runtime.settings) as repo:
        for one in again:
            verification = await reverify(repo, one, "deep status")
            done.append(verification)
            report: dict[str, Any] = {"ok": verification.ok, "problems": verification.problems[:10]}
            if ctx.runtime.settings.access == "read-only":
                report |= {"recorded": None, "not_recorded": "read-only access: the result is not written"}
            else:
                try:
                    report["recorded"] = await record(repo, verification)
                except RecoveryError as exc:
                    report["not_recorded"] = exc.message
            if one == backup_id:
                details["deep_verification"] = report
            else:
                details.setdefault("reverified_failed", {})[one] = report
    return replace(state, verifications=[*state.verifications, *done])


# --- restore drill ------------------------------------------------------------------------


async def check_restore_drill(ctx: StatusContext) -> Check:
    state = await read_state(ctx.runtime.settings)
    last_ok = state.last_successful_drill
    last_any = max(state.drills, key=lambda d: d.at, default=None)
    details: dict[str, Any] = {"drills_recorded": len(state.drills)}
    if last_any is not None:
        details["last_drill"] = {"at": last_any.at.isoformat(), "ok": last_any.ok, "backup_id": last_any.backup_id}
    if last_any is not None and not last_any.ok:
        details["last_drill"]["problem"] = last_any.problem
        summary = (f"the most recent restore drill, of backup {last_any.backup_id} "
                   f"{format_age(datetime.now(UTC) - last_any.at)} ago, FAILED: {last_any.problem or 'see its record'}")
        if last_ok is not None:
            summary += (f"; the last successful one (of {last_ok.backup_id}) was "
                        f"{format_age(datetime.now(UTC) - last_ok.at)} ago")
        return Check(component="restore_drill", status="fail", details=details,
                     summary=summary + ". Fix what it names and run restore_drill again")
    if last_ok is None:
        return Check(
            component="restore_drill", status="warn", details=details,
            summary="no restore drill has ever been run: a backup that has never been restored is not yet a "
            "backup. Run restore_drill",
        )
    age = datetime.now(UTC) - last_ok.at
    details["last_successful"] = {
        "at": last_ok.at.isoformat(), "backup_id": last_ok.backup_id, "rto_seconds": last_ok.rto_seconds,
    }
    status: Verdict = "warn" if age > DRILL_MAX_AGE else "ok"
    summary = (f"last successful drill {format_age(age)} ago, of backup {last_ok.backup_id} "
               f"(RTO {last_ok.rto_seconds or 0:.0f} s)")
    return Check(component="restore_drill", status=status, summary=summary, details=details)
