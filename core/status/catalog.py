"""The catalog: what recovery points a repository holds, and what is known about each.

One object answers the questions an operator asks before choosing a recovery
point (like barman's BackupManager or `restic snapshots`): when was each taken,
how big, in what format, encrypted or not, when was it last proven good and how,
when was it last restored in a drill, and what retention will do to it.

Retention is not re-implemented here: the decision comes from the same
`retention.decide` over the same candidates as `apply_retention`, so the catalog
says exactly what run_backup would prune. A folder without a manifest is an
interrupted run's leftover (the next run_backup deletes it); a manifest that
cannot be read is shown as such, and since run_backup reads every manifest
before it writes or prunes, the catalog says that it is blocked until the file
is removed or restored.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError

from ..artifact.encryption import backup_key
from ..artifact.encryption import fingerprint as key_fingerprint
from ..errors import ConfigurationError, IntegrityError, RecoveryError, scrub
from ..repository import open_repository
from ..repository.base import Repository
from ..repository.layout import BACKUPS, DRILLS, backup_id_of, backup_prefix, check_key, manifest_key
from ..repository.manifest import Manifest
from ..repository.prune import candidates, policy_of
from ..repository.records import (
    BackupSummary,
    DrillRecord,
    RepositoryState,
    read_drills,
    read_verifications,
    summary_of,
)
from ..repository.retention import Candidate, Decision, Policy, decide
from ..settings import Settings
from .common import age_text

T = TypeVar("T")
_NEXT = "\x00next backup"  # the recovery point the next run_backup would add; never a real id


class NoSuchBackup(ConfigurationError):
    """A backup id that names no complete backup in the repository."""


class LastVerification(BaseModel):
    at: datetime
    how: Literal["at write", "deep status", "drill"] | str = Field(
        description="'at write' (read back when written), 'deep status' (backup_status deep=true) or 'drill'."
    )
    ok: bool
    problem: str | None = None


class LastDrill(BaseModel):
    at: datetime
    ok: bool
    rto_seconds: float | None = Field(default=None, description="Time to a restored database in that drill.")
    problem: str | None = Field(default=None, description="The first failed step of a failed drill.")
    drills: int = Field(description="How many drills of this backup are recorded.")


class RetentionFate(BaseModel):
    action: Literal["keep", "prune", "leftover", "unknown"] = Field(
        description="'keep', 'prune' (a prune now would delete it: run_backup prune=true confirm=true), "
        "'leftover' (no manifest: the next run_backup deletes the folder) or 'unknown' (retention is blocked)."
    )
    rules: list[str] = Field(default_factory=list, description="Why it is kept, e.g. 'last 1', 'daily 2026-11-24'.")
    after_next_backup: Literal["keep", "prune"] | None = Field(
        default=None,
        description="What a prune would do once the next backup exists (run_backup prune=true confirm=true "
        "adds one backup, then prunes).",
    )


class CatalogEntry(BaseModel):
    backup_id: str
    state: Literal["complete", "incomplete", "unreadable"] = Field(
        description="'complete' (has a manifest), 'incomplete' (no manifest: interrupted or running), "
        "'unreadable' (its manifest cannot be read)."
    )
    snapshot_at: datetime | None = Field(
        default=None, description="The database snapshot's time: what a restore of this point brings back."
    )
    finished_at: datetime | None = None
    age_hours: float | None = Field(default=None, description="Hours since the snapshot: the data a restore loses.")
    size_bytes: int = Field(description="Bytes of this backup's own artifacts in the repository.")
    dump_format: str | None = Field(default=None, description="pg_dump format: custom, directory or plain.")
    compression: str | None = None
    encrypted: bool | None = None
    backup_key_fingerprint: str | None = Field(default=None, description="Which backup key encrypted it.")
    configured_key_matches: bool | None = Field(
        default=None, description="The configured ENGRAM_RECOVERY_BACKUP_KEY is the one that encrypted it."
    )
    attachments_backend: Literal["database", "s3"] | None = None
    attachment_objects: int | None = Field(default=None, description="Attachment blobs this point holds.")
    attachment_bytes: int | None = Field(
        default=None,
        description="Bytes of mirrored attachment blobs this point references (stored once in the shared pool); "
        "with STORAGE_BACKEND=database they are inside the dump.",
    )
    server_version: str | None = None
    engram_schema_version: int | None = None
    warnings: list[str] = Field(default_factory=list, description="Warnings recorded in the manifest.")
    verified: LastVerification | None = Field(
        default=None, description="The newest of: the read-back at write, deep-status re-verifications, drills."
    )
    drilled: LastDrill | None = None
    retention: RetentionFate
    problem: str | None = Field(default=None, description="Why an incomplete or unreadable entry is so.")


class CatalogView(BaseModel):
    repository: str
    summary: str
    policy: dict[str, int] = Field(description="keep_last, keep_daily, keep_weekly, keep_monthly in force.")
    backups: list[CatalogEntry] = Field(description="Every backup folder, newest first.")
    complete: int
    incomplete: int
    unreadable: int
    total_bytes: int = Field(description="Bytes of all backups' own artifacts (the shared attachment pool aside).")
    retention_blocked: str | None = Field(
        default=None, description="Why retention (and run_backup) cannot run until a file is removed or restored."
    )
    warnings: list[str] = Field(default_factory=list)


class Catalog:
    """Answers questions about the backups of one repository."""

    def __init__(self, repo: Repository, policy: Policy, backup_key_fingerprint: str | None = None) -> None:
        self.repo = repo
        self.policy = policy
        self._key_fp = backup_key_fingerprint

    # --- the listing -----------------------------------------------------------------------------

    async def view(self, now: datetime | None = None) -> CatalogView:
        now = now or datetime.now(UTC)
        folders = await self._folders()
        entries: dict[str, CatalogEntry] = {}
        summaries: list[BackupSummary] = []
        blocked: list[str] = []
        warnings: list[str] = []
        for backup_id, (has_manifest, size, _modified) in folders.items():
            if not has_manifest:
                entries[backup_id] = CatalogEntry(
                    backup_id=backup_id, state="incomplete", size_bytes=size,
                    retention=RetentionFate(action="leftover"),
                    problem="no manifest: a run that was interrupted (or is running now); the next run_backup "
                    "deletes this folder",
                )
                continue
            try:
                raw = await self.repo.get_bytes(manifest_key(backup_id))
                summary = summary_of(json.loads(raw))
                manifest = Manifest.model_validate_json(raw)
                if summary.backup_id != backup_id:
                    raise ValueError(f"it names backup {summary.backup_id[:40]!r}, not its folder's")
            except RecoveryError:
                raise  # the repository itself failed: not this manifest's fault
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                problem = f"its manifest cannot be read ({_why(exc)})"
                entries[backup_id] = CatalogEntry(
                    backup_id=backup_id, state="unreadable", size_bytes=size,
                    retention=RetentionFate(action="unknown"), problem=problem,
                )
                blocked.append(manifest_key(backup_id))
                continue
            summaries.append(summary)
            entries[backup_id] = self._entry(manifest, summary, size, now)
        drills = await self._records(read_drills, "drill", blocked, warnings)
        verifications = await self._records(read_verifications, "verification", blocked, warnings)
        state = RepositoryState(self.repo.location, backups=summaries, drills=drills, verifications=verifications)
        for summary in summaries:
            entry = entries[summary.backup_id]
            proof = state.last_verdict(summary)
            if proof is not None:
                entry.verified = LastVerification(at=proof.at, how=proof.how, ok=proof.ok, problem=proof.problem)
            entry.drilled = _last_drill([d for d in drills if d.backup_id == summary.backup_id])
        blocked_reason = None
        if blocked:
            blocked_reason = (
                f"{', '.join(blocked[:3])} cannot be trusted: restore it from a copy or remove it. Until then what "
                "retention does is unknown, and run_backup, which reads every manifest and record first, stops at "
                "an unreadable one"
            )
            warnings.insert(0, blocked_reason)
        else:
            self._retention(summaries, entries, now)
        modified = {backup_id: folder[2] for backup_id, folder in folders.items()}
        ordered = sorted(entries.values(), key=lambda e: _newest_first(e, modified.get(e.backup_id)), reverse=True)
        counts = {s: sum(1 for e in ordered if e.state == s) for s in ("complete", "incomplete", "unreadable")}
        warnings += [f"backup {e.backup_id} FAILED its last verification ({e.verified.how}): {e.verified.problem}"
                     for e in ordered if e.verified is not None and not e.verified.ok]  # fmt: skip
        return CatalogView(
            repository=self.repo.location, summary=_summary(ordered, counts, blocked_reason),
            policy={"keep_last": self.policy.last, "keep_daily": self.policy.daily,
                    "keep_weekly": self.policy.weekly, "keep_monthly": self.policy.monthly},
            backups=ordered, complete=counts["complete"], incomplete=counts["incomplete"],
            unreadable=counts["unreadable"], total_bytes=sum(e.size_bytes for e in ordered),
            retention_blocked=blocked_reason, warnings=warnings,
        )  # fmt: skip

    async def _folders(self) -> dict[str, tuple[bool, int, float | None]]:
        """backup id -> (has a manifest, bytes of its folder, newest modification time where the store says)."""
        folders: dict[str, tuple[bool, int, float | None]] = {}
        async for key, size, modified in self.repo.list_modified(BACKUPS):
            backup_id = backup_id_of(key)
            if backup_id is None:
                continue
            has, total, newest = folders.get(backup_id, (False, 0, None))
            if modified is not None:
                newest = max(newest or modified, modified)
            folders[backup_id] = (has or key == manifest_key(backup_id), total + size, newest)
        return folders

    async def _records(
        self, read: Callable[[Repository], Awaitable[list[T]]], kind: str, blocked: list[str], warnings: list[str]
    ) -> list[T]:
        try:
            records = await read(self.repo)
        except IntegrityError as exc:
            blocked.append(exc.message.split(":")[0])
            warnings.append(f"the {kind} records could not be read: {exc.message}")
            return []
        return records

    def _entry(self, manifest: Manifest, summary: BackupSummary, size: int, now: datetime) -> CatalogEntry:
        db = manifest.database
        dump = [a for a in manifest.artifacts if a.kind == "database"]
        encrypted = any(a.encryption for a in manifest.artifacts) or manifest.backup_key_fingerprint is not None
        att = manifest.attachments
        snapshot = db.snapshot_at or manifest.started_at
        return CatalogEntry(
            backup_id=summary.backup_id, state="complete", snapshot_at=snapshot, finished_at=summary.finished_at,
            age_hours=round((now - _utc(snapshot)).total_seconds() / 3600, 2),
            size_bytes=manifest.total_bytes or size, dump_format=db.dump_format,
            compression=dump[0].compression if dump else None, encrypted=encrypted,
            backup_key_fingerprint=manifest.backup_key_fingerprint,
            configured_key_matches=(
                None if not encrypted or self._key_fp is None else manifest.backup_key_fingerprint == self._key_fp
            ),
            attachments_backend=att.backend,
            attachment_objects=att.objects if att.backend == "s3" else db.row_counts.get("storage_objects"),
            attachment_bytes=att.bytes if att.backend == "s3" else None,
            server_version=db.server_version, engram_schema_version=db.engram_schema_version,
            warnings=manifest.warnings, retention=RetentionFate(action="unknown"),
        )

    def _retention(self, summaries: list[BackupSummary], entries: dict[str, CatalogEntry], now: datetime) -> None:
        """The decision apply_retention would take now, and the one after run_backup adds its backup."""
        current = candidates(summaries)
        now_decision = decide(current, self.policy)
        next_decision: Decision = decide([*current, Candidate(_NEXT, now, True)], self.policy)
        for summary in summaries:
            backup_id = summary.backup_id
            entries[backup_id].retention = RetentionFate(
                action="keep" if backup_id in now_decision.keep else "prune",
                rules=now_decision.reasons.get(backup_id, []),
                after_next_backup="keep" if backup_id in next_decision.keep else "prune",
            )

    # --- single documents ---------------------------------------------------------------------------

    async def manifest_text(self, backup_id: str) -> str:
        """One backup's manifest as stored (it holds no secret; scrubbed all the same)."""
        key = manifest_key(_valid_id(backup_id))
        if not await self.repo.exists(key):
            folder = [k async for k, _ in self.repo.list(backup_prefix(backup_id))]
            if folder:
                raise NoSuchBackup(
                    f"backup {backup_id} is incomplete: it has no manifest (an interrupted or running run)",
                    "choose a complete backup (list_backups); the next run_backup deletes this folder",
                )
            raise NoSuchBackup(f"there is no backup {backup_id} in {self.repo.location}",
                                  "list the backups with list_backups or `engram-recovery backups`")
        return scrub((await self.repo.get_bytes(key)).decode("utf-8", errors="replace"))

    async def drill_records(self, backup_id: str | None = None) -> list[dict[str, Any]]:
        """Restore drill records as written by restore_drill, newest first (one backup's, or all)."""
        if backup_id is not None:
            _valid_id(backup_id)
        records: list[dict[str, Any]] = []
        async for key, _size in self.repo.list(DRILLS):
            if not key.endswith(".json") or (backup_id is not None and not key.endswith(f"-{backup_id}.json")):
                continue
            try:
                data = json.loads(await self.repo.get_bytes(key))
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                data = {"problem": f"this record cannot be read ({_why(exc)})"}
            if backup_id is not None and data.get("backup_id", backup_id) != backup_id:
                continue
            records.append({"record": key, **data})
        records.sort(key=lambda r: (str(r.get("at", "")), r["record"]), reverse=True)
        known = backup_id is None or records or await self.repo.exists(manifest_key(backup_id))
        if not known:
            raise NoSuchBackup(f"there is no backup {backup_id} in {self.repo.location}, nor a drill of one",
                               "list the backups with list_backups or `engram-recovery backups`")
        return records


@asynccontextmanager
async def open_catalog(settings: Settings) -> AsyncIterator[Catalog]:
    """The catalog of the configured repository; an absent local directory is an empty repository."""
    repo = open_repository(settings)
    problem = repo.unusable()
    if problem is not None:
        raise ConfigurationError(problem, "point ENGRAM_RECOVERY_REPOSITORY at a directory")
    key = backup_key(settings)
    fingerprint = key_fingerprint(key) if key is not None else None
    async with repo:
        yield Catalog(repo, policy_of(settings), fingerprint)


def _valid_id(backup_id: str) -> str:
    if "/" in backup_id or not backup_id:
        raise NoSuchBackup(f"{backup_id!r} is not a backup id", "use an id from list_backups")
    check_key(manifest_key(backup_id))
    return backup_id


def _why(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    if isinstance(exc, KeyError):
        return f"no {exc.args[0]!r} field"
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _last_drill(drills: list[DrillRecord]) -> LastDrill | None:
    last = max(drills, key=lambda d: d.at, default=None)
    if last is None:
        return None
    return LastDrill(at=last.at, ok=last.ok, rto_seconds=last.rto_seconds, problem=last.problem, drills=len(drills))


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def _newest_first(entry: CatalogEntry, modified: float | None) -> tuple[datetime, datetime, str]:
    # Ids start with their run's start time (e.g. 20261125T021500Z-1a2b) and runs take turns, so the id orders
    # every folder, even one without a readable manifest; within one second, the finish time (or, without a
    # readable manifest, the folder's newest write) decides.
    never = datetime.min.replace(tzinfo=UTC)
    finished = _utc(entry.finished_at) if entry.finished_at else never
    if entry.finished_at is None and modified is not None:
        finished = datetime.fromtimestamp(modified, UTC)
    try:
        started = datetime.strptime(entry.backup_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        started = finished
    return started, finished, entry.backup_id


def _summary(entries: list[CatalogEntry], counts: dict[str, int], blocked: str | None) -> str:
    if not entries:
        return "no backups yet: nothing could be recovered. Run run_backup (and schedule it)"
    complete = [e for e in entries if e.state == "complete"]
    parts = [f"{counts['complete']} complete backup(s)"]
    if complete:
        newest = complete[0]
        parts[0] += f", newest {newest.backup_id} ({age_text(newest.age_hours)} old)"
        verified = next((e for e in complete if e.verified is not None and e.verified.ok), None)
        if verified is not None and verified is not newest:
            parts.append(f"newest proven good: {verified.backup_id}")
        elif verified is None:
            parts.append("none proven good yet")
    if counts["incomplete"]:
        parts.append(f"{counts['incomplete']} incomplete (the next run_backup deletes them)")
    if counts["unreadable"]:
        parts.append(f"{counts['unreadable']} with an unreadable manifest")
    prune = [e.backup_id for e in complete if e.retention.action == "prune"]
    if blocked:
        parts.append("retention blocked")
    elif prune:
        parts.append(f"{len(prune)} beyond the retention policy (run_backup prune=true confirm=true)")
    return "; ".join(parts)
