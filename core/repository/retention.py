"""Which backups to keep: keep-last / daily / weekly / monthly, as a pure function.

The rules are the familiar ones (restic, borg): keep the newest `last`
backups; for each of the newest `daily` days that have a backup keep that day's
newest, likewise per ISO week and per calendar month (UTC). A backup any rule
keeps is kept. Two safety rules come first: the newest verified backup is never
deleted, and unverified backups never count towards a rule's quota (so a run
of failed verifications cannot push the good backups out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import BaseModel, Field


@dataclass(frozen=True)
class Policy:
    last: int = 7
    daily: int = 7
    weekly: int = 4
    monthly: int = 6


@dataclass(frozen=True)
class Candidate:
    backup_id: str
    finished_at: datetime
    verified: bool | None


class Decision(BaseModel):
    keep: list[str] = Field(description="Backup ids kept, newest first.")
    delete: list[str] = Field(description="Backup ids that the policy lets go, newest first.")
    reasons: dict[str, list[str]] = Field(
        default_factory=dict, description="Why each kept backup is kept (e.g. 'last 1', 'daily 2026-11-24')."
    )


@dataclass
class _Keeper:
    name: str
    quota: int
    bucket: Callable[[datetime], str]
    seen: set[str] = field(default_factory=set)


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def decide(backups: Sequence[Candidate], policy: Policy) -> Decision:
    ordered = sorted(backups, key=lambda b: (_utc(b.finished_at), b.backup_id), reverse=True)
    reasons: dict[str, list[str]] = {}
    newest_verified = next((b for b in ordered if b.verified), None)
    if newest_verified is not None:
        reasons.setdefault(newest_verified.backup_id, []).append("newest verified")
    keepers = [
        _Keeper("daily", policy.daily, lambda t: t.strftime("%Y-%m-%d")),
        _Keeper("weekly", policy.weekly, lambda t: "{}-W{:02d}".format(*t.isocalendar()[:2])),
        _Keeper("monthly", policy.monthly, lambda t: t.strftime("%Y-%m")),
    ]
    last_seen = 0
    for backup in ordered:
        if not backup.verified:
            continue
        moment = _utc(backup.finished_at)
        if last_seen < policy.last:
            last_seen += 1
            reasons.setdefault(backup.backup_id, []).append(f"last {last_seen}")
        for keeper in keepers:
            bucket = keeper.bucket(moment)
            if bucket not in keeper.seen and len(keeper.seen) < keeper.quota:
                keeper.seen.add(bucket)
                reasons.setdefault(backup.backup_id, []).append(f"{keeper.name} {bucket}")
    # An unverified backup newer than the newest verified one is kept: it may be verified by a later run.
    for backup in ordered:
        if newest_verified is not None and _utc(backup.finished_at) <= _utc(newest_verified.finished_at):
            break
        if not backup.verified:
            reasons.setdefault(backup.backup_id, []).append("newer than the newest verified")
    keep = [b.backup_id for b in ordered if b.backup_id in reasons]
    delete = [b.backup_id for b in ordered if b.backup_id not in reasons]
    return Decision(keep=keep, delete=delete, reasons=reasons)
