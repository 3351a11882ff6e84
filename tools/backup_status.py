"""backup_status: could I recover right now, and what would I lose?

Read-only. Each component gets its own check, run concurrently and each bounded
in time, so one store that is down fails its own check and the others still
report. Without `deep` it reads only catalogue statistics and indexes (numbers
from statistics are marked as estimates), so it stays fast on a large database.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import anyio
from pydantic import BaseModel, Field

from ..core import engram_crypto, oban, qdrant, s3
from ..core.errors import RecoveryError
from ..core.pgdump import client_version
from ..core.progress import Progress
from ..core.repository import read_state
from ..core.retention import Candidate, decide
from ..core.retention_apply import policy_of
from ..core.runtime import Runtime
from ..core.schema_probe import SchemaProbe, probe
from .base import ToolInput, ToolResult, ToolSpec, Verdict, read_only_annotations

CHECK_TIMEOUT = 8.0
INCOMPLETE_STATES = ("available", "scheduled", "executing", "retryable", "suspended")
EMBED_WORKER = "Engram.Workers.EmbedNote"
DRILL_MAX_AGE = timedelta(days=31)

Component = Literal["postgres", "last_backup", "master_key", "attachments", "qdrant", "oban", "restore_drill"]


class BackupStatusInput(ToolInput):
    deep: bool = Field(
        default=False,
        description="Also list the whole attachments bucket and count rows exactly, to find attachments whose "
        "blob is missing and blobs no row references. Slow on large deployments; off by default.",
    )


class Check(BaseModel):
    component: Component
    status: Verdict
    summary: str = Field(description="One line for a human.")
    details: dict[str, Any] = Field(default_factory=dict)
    estimates: list[str] = Field(default_factory=list, description="Which numbers in details are estimates.")
    elapsed_ms: float = 0.0


class BackupStatusResult(ToolResult):
    verdict: Verdict = Field(description="The worst status of all checks.")
    summary: str
    checked_at: datetime
    deep: bool
    checks: list[Check]


def _worst(statuses: list[Verdict]) -> Verdict:
    return "fail" if "fail" in statuses else "warn" if "warn" in statuses else "ok"


class _Context:
    """What several checks share: one probe of the database, taken once."""

    def __init__(self, runtime: Runtime, deep: bool) -> None:
        self.runtime = runtime
        self.deep = deep
        self._probe: SchemaProbe | None = None
        self._probe_error: RecoveryError | None = None
        self._lock = anyio.Lock()

    async def probe(self) -> SchemaProbe:
        async with self._lock:
            if self._probe is None and self._probe_error is None:
                try:
                    async with self.runtime.pool.acquire() as conn:
                        self._probe = await probe(conn)
                except RecoveryError as exc:
                    self._probe_error = exc
            if self._probe_error is not None:
                raise self._probe_error
            assert self._probe is not None
            return self._probe


CheckFn = Callable[[_Context], Awaitable[Check]]


# --- postgres -------------------------------------------------------------------------


async def check_postgres(ctx: _Context) -> Check:
    p = await ctx.probe()
    settings = ctx.runtime.settings
    details: dict[str, Any] = {
        "server_version": p.server_version,
        "database": settings.database_name,
        "role": p.role,
        "superuser": p.is_superuser,
        "bypass_rls": p.bypass_rls,
        "engram_schema_version": p.engram_schema_version,
        "row_estimates": {t: p.estimates.get(t) for t in ("users", "vaults", "notes", "chunks", "attachments")},
    }
    async with ctx.runtime.pool.acquire() as conn:
        details["database_bytes"] = await conn.fetchval("SELECT pg_database_size(current_database())")
        wal = await conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('wal_level', 'archive_mode', 'archive_command', 'archive_library', 'archive_timeout')"
        )
    wal_settings = {r["name"]: r["setting"] for r in wal}
    archiving = wal_settings.get("archive_mode") in ("on", "always") and bool(
        (wal_settings.get("archive_command") or "").strip() not in ("", "(disabled)")
        or wal_settings.get("archive_library")
    )
    details["wal"] = {
        "wal_level": wal_settings.get("wal_level"),
        "archive_mode": wal_settings.get("archive_mode"),
        "archiving": archiving,
        "meaning": "point-in-time recovery is possible between backups"
        if archiving
        else "no WAL archiving: the recovery point is the last backup",
    }
    problems: list[str] = []
    status: Verdict = "ok"
    if not p.looks_like_engram:
        status = "fail"
        problems.append("this database has no users/vaults/notes tables: is DATABASE_URL Engram's database?")
    try:
        client = await client_version(settings.pg_dump)
        details["pg_dump"] = {"path": client.path, "major": client.major}
        if client.major < p.server_major:
            status = "fail"
            problems.append(
                f"pg_dump {client.major} cannot dump a PostgreSQL {p.server_major} server: install "
                f"postgresql-client-{p.server_major} or set ENGRAM_RECOVERY_PG_DUMP"
            )
    except RecoveryError as exc:
        status = "fail"
        details["pg_dump"] = {"error": exc.message}
        problems.append(str(exc))
    details["sees_all_rows"] = p.sees_all_rows
    if not p.sees_all_rows:
        status = "fail"
        problems.append(
            f"role {p.role} is neither superuser nor BYPASSRLS, so it sees 0 rows in the RLS-protected tables "
            f"({', '.join(sorted(p.forced_rls))}): pg_dump fails on them and reindex_qdrant must work per "
            "tenant. Fix: back up as a superuser or a role with BYPASSRLS (ALTER ROLE ... BYPASSRLS)"
        )
    summary = (
        "; ".join(problems)
        if problems
        else f"PostgreSQL {p.server_version} reachable, {_size(details['database_bytes'])}, dumpable by "
        f"pg_dump {details['pg_dump']['major']}, role sees all rows"
    )
    return Check(component="postgres", status=status, summary=summary, details=details, estimates=["row_estimates"])


# --- last backup ------------------------------------------------------------------------


async def check_last_backup(ctx: _Context) -> Check:
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
    summary = f"newest backup {newest.backup_id} is {_age(age)} old, {_size(newest.size_bytes)}"
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


# --- master key --------------------------------------------------------------------------


async def check_master_key(ctx: _Context) -> Check:
    settings = ctx.runtime.settings
    details: dict[str, Any] = {
        "key_provider": settings.key_provider,
        "declared_escrow_locations": len(settings.key_escrow),
        "key_version": settings.encryption_master_key_version,
    }
    warnings: list[str] = []
    if len(settings.key_escrow) < 2:
        warnings.append(
            f"only {len(settings.key_escrow)} escrow location(s) declared for the master key: keep it in at least "
            "two separate places and list them in ENGRAM_RECOVERY_KEY_ESCROW"
        )
    if settings.encryption_master_key is None:
        return Check(
            component="master_key",
            status="fail",
            summary="ENCRYPTION_MASTER_KEY is not available to this tool, so no key check is possible; without "
            "the key a restored database is unreadable. Set ENCRYPTION_MASTER_KEY or ENCRYPTION_MASTER_KEY_FILE",
            details=details,
        )
    try:
        key = engram_crypto.decode_master_key(settings.encryption_master_key.get_secret_value())
    except ValueError as exc:
        return Check(
            component="master_key",
            status="fail",
            summary=f"ENCRYPTION_MASTER_KEY is malformed: {exc}. It must be base64 of exactly 32 bytes",
            details=details,
        )
    details["fingerprint"] = engram_crypto.key_fingerprint(key)
    previous: bytes | None = None
    if settings.encryption_master_key_previous is not None:
        try:
            previous = engram_crypto.decode_master_key(settings.encryption_master_key_previous.get_secret_value())
            details["previous_fingerprint"] = engram_crypto.key_fingerprint(previous)
        except ValueError as exc:
            warnings.append(f"ENCRYPTION_MASTER_KEY_PREVIOUS is malformed: {exc}")
    details["previous_set"] = settings.encryption_master_key_previous is not None

    p = await ctx.probe()
    if not p.has_table("system_canaries"):
        return Check(
            component="master_key", status="fail", details=details,
            summary="this database has no system_canaries table, so the key cannot be checked against it",
        )
    async with ctx.runtime.pool.acquire() as conn:
        canary = await conn.fetchrow(
            "SELECT id, wrapped_dek, dek_sha256 FROM system_canaries ORDER BY id DESC LIMIT 1"
        )
    if canary is None:
        return Check(
            component="master_key",
            status="fail",
            details=details,
            summary="system_canaries is empty: Engram would silently adopt ANY master key at its next boot and "
            "new data would be unreadable with the real one. Boot the app once with the right key (it writes a "
            "canary), and never restore a database whose canary table is empty without checking the key",
        )
    details["canary_id"] = str(canary["id"])
    verdict = engram_crypto.check_canary(key, bytes(canary["wrapped_dek"]), bytes(canary["dek_sha256"]))
    details["canary"] = verdict
    if verdict == "match":
        status: Verdict = "warn" if warnings else "ok"
        summary = f"master key {details['fingerprint']} unwraps the newest boot canary"
        if warnings:
            summary += "; " + "; ".join(warnings)
        return Check(component="master_key", status=status, summary=summary, details=details)
    if verdict == "kms":
        return Check(
            component="master_key",
            status="warn",
            details=details,
            summary="the boot canary is wrapped by AWS KMS, so it cannot be checked offline; make sure the KMS key "
            "and its permissions are recoverable" + ("; " + "; ".join(warnings) if warnings else ""),
        )
    if previous is not None and engram_crypto.check_canary(
        previous, bytes(canary["wrapped_dek"]), bytes(canary["dek_sha256"])
    ) == "match":
        return Check(
            component="master_key",
            status="fail",
            details=details | {"canary_matches": "previous"},
            summary="the boot canary is wrapped by ENCRYPTION_MASTER_KEY_PREVIOUS, not the current key: Engram "
            "checks the canary with the current key only and would refuse to boot. Finish the key rotation",
        )
    return Check(
        component="master_key",
        status="fail",
        details=details,
        summary=f"ENCRYPTION_MASTER_KEY (fingerprint {details['fingerprint']}) does not unwrap the newest boot "
        f"canary ({verdict}): this is not the key this database was written with. Find the right key before "
        "anything else: without it the backups cannot be read",
    )


# --- attachments --------------------------------------------------------------------------


async def check_attachments(ctx: _Context) -> Check:
    settings = ctx.runtime.settings
    p = await ctx.probe()
    details: dict[str, Any] = {"backend": settings.storage_backend}
    estimates: list[str] = []
    if settings.storage_backend == "database":
        async with ctx.runtime.pool.acquire() as conn:
            details["storage_objects_bytes"] = await conn.fetchval(
                "SELECT pg_total_relation_size('storage_objects')"
            ) if p.has_table("storage_objects") else None
            details["storage_objects_estimate"] = p.estimates.get("storage_objects")
            estimates.append("storage_objects_estimate")
            if ctx.deep and p.has_table("storage_objects") and p.has_table("attachments"):
                details["missing_blobs"] = await conn.fetchval(
                    "SELECT count(*) FROM attachments a WHERE a.storage_key IS NOT NULL AND a.deleted_at IS NULL "
                    "AND NOT EXISTS (SELECT 1 FROM storage_objects o WHERE o.storage_key = a.storage_key)"
                )
                details["unreferenced_blobs"] = await conn.fetchval(
                    "SELECT count(*) FROM storage_objects o "
                    "WHERE NOT EXISTS (SELECT 1 FROM attachments a WHERE a.storage_key = o.storage_key)"
                )
        if not p.has_table("storage_objects"):
            return Check(
                component="attachments", status="fail", details=details,
                summary="STORAGE_BACKEND is 'database' but this database has no storage_objects table: "
                "is DATABASE_URL Engram's database, or should STORAGE_BACKEND be 's3'?",
            )
        summary = "attachments are stored in PostgreSQL (storage_objects): every database backup includes them"
        return _drift_verdict(details, summary, estimates)

    location = ctx.runtime.attachments_location()
    assert location is not None  # settings validation requires the credentials for s3
    details |= {"bucket": location.bucket, "endpoint": location.endpoint}
    try:
        async with s3.client(location) as client:
            await client.head_bucket(Bucket=location.bucket)
            details["versioning"] = await s3.versioning_status(client, location.bucket)
            count = size = 0
            keys: set[str] = set()
            truncated = False
            if ctx.deep:
                async for obj in s3.list_objects(client, location.bucket):
                    count, size = count + 1, size + obj.size
                    keys.add(obj.key)
            else:
                page = await client.list_objects_v2(Bucket=location.bucket, MaxKeys=1000)
                for item in page.get("Contents", ()):
                    count, size = count + 1, size + int(item["Size"])
                truncated = bool(page.get("IsTruncated"))
    except s3.S3_ERRORS as exc:
        raise s3.translate(exc, "check the attachments bucket", location) from exc
    details["objects"] = count if not truncated else f"more than {count} (exact with deep=true)"
    details["bytes"] = size if not truncated else f"more than {size} (exact with deep=true)"
    if ctx.deep and p.has_table("attachments"):
        async with ctx.runtime.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT storage_key FROM attachments WHERE storage_key IS NOT NULL AND deleted_at IS NULL"
            )
        referenced = {r["storage_key"] for r in rows}
        blob_keys = {k for k in keys if "/objects/" in k}
        missing = sorted(referenced - keys)
        orphans = sorted(blob_keys - referenced)
        details["missing_blobs"] = len(missing)
        details["unreferenced_blobs"] = len(orphans)
        details["missing_examples"] = missing[:5]
        details["unreferenced_examples"] = orphans[:5]
    summary = f"bucket {location.bucket} reachable, versioning {details['versioning']}, {details['objects']} objects"
    checked = _drift_verdict(details, summary, estimates)
    if details["versioning"] != "Enabled" and checked.status == "ok":
        checked.status = "warn"
        checked.summary += (
            "; versioning is off: an overwritten or deleted attachment cannot be recovered from the bucket itself "
            "(enable it with put-bucket-versioning)"
        )
    return checked


def _drift_verdict(details: dict[str, Any], summary: str, estimates: list[str]) -> Check:
    missing = details.get("missing_blobs") or 0
    orphans = details.get("unreferenced_blobs") or 0
    status: Verdict = "ok"
    if missing:
        status = "fail"
        summary += f"; {missing} attachment row(s) point to a blob that does not exist"
    if orphans:
        status = "warn" if status == "ok" else status
        summary += f"; {orphans} blob(s) are referenced by no attachment row"
    if "missing_blobs" not in details:
        summary += " (cross-store drift not checked: pass deep=true)"
    return Check(component="attachments", status=status, summary=summary, details=details, estimates=estimates)


# --- qdrant -------------------------------------------------------------------------------


async def check_qdrant(ctx: _Context) -> Check:
    settings = ctx.runtime.settings
    if not settings.qdrant_url and not settings.qdrant_path:
        return Check(
            component="qdrant", status="warn",
            summary="Qdrant is not configured here (QDRANT_URL unset): vectors cannot be checked; they can always "
            "be rebuilt from PostgreSQL with reindex_qdrant",
        )
    p = await ctx.probe()
    details: dict[str, Any] = {"collection": settings.qdrant_collection}
    estimates = ["chunks"]
    async with ctx.runtime.pool.acquire() as conn:
        if ctx.deep:
            details["chunks"] = await conn.fetchval("SELECT count(*) FROM chunks")
            estimates = []
        else:
            details["chunks"] = p.estimates.get("chunks")
        details["notes_waiting_for_embedding"] = await _waiting_for_embedding(conn, p, ctx.deep)
        if not ctx.deep:
            estimates.append("notes_waiting_for_embedding")
    try:
        state = await qdrant.collection_state(ctx.runtime.qdrant(), settings.qdrant_collection)
    except qdrant.QDRANT_ERRORS as exc:
        raise qdrant.translate(exc, "read the collection") from exc
    if not state.exists:
        return Check(
            component="qdrant", status="warn", details=details, estimates=estimates,
            summary=f"collection {settings.qdrant_collection} does not exist: semantic search has no vectors. "
            "Rebuild it with reindex_qdrant (Engram creates the collection on the first embed)",
        )
    details |= {"points": state.points, "dense_size": state.dense_size, "status": state.status}
    status: Verdict = "ok"
    summary = f"collection {settings.qdrant_collection}: {state.points} points beside ~{details['chunks']} chunks"
    chunks = details["chunks"] or 0
    waiting = details["notes_waiting_for_embedding"] or 0
    if state.points is not None and chunks and state.points < 0.9 * chunks:
        status = "warn"
        summary += (
            f": vectors are missing; ~{waiting} note(s) are waiting for embedding, so a rebuild may be draining "
            "(see the oban check's backlog). If the backlog is 0, run reindex_qdrant(mode='missing')"
            if waiting
            else ": vectors are missing, run reindex_qdrant(mode='missing')"
        )
    return Check(component="qdrant", status=status, summary=summary, details=details, estimates=estimates)


async def _waiting_for_embedding(conn: Any, p: SchemaProbe, exact: bool) -> int | None:
    if not p.has_column("notes", "embed_hash"):
        return None
    where = "deleted_at IS NULL AND embed_hash IS DISTINCT FROM content_hash"
    if p.has_column("notes", "kind"):
        where += " AND kind = 'note'"
    if exact:
        return int(await conn.fetchval(f"SELECT count(*) FROM notes WHERE {where}"))
    # The planner's estimate costs no scan; the exact count is a deep check.
    plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) SELECT 1 FROM notes WHERE {where}")
    return int(json.loads(plan)[0]["Plan"]["Plan Rows"])


# --- oban ---------------------------------------------------------------------------------


async def check_oban(ctx: _Context) -> Check:
    p = await ctx.probe()
    if not p.has_table("oban_jobs"):
        return Check(component="oban", status="warn", summary="no oban_jobs table: is this Engram's database?")
    # The same count reindex_qdrant reports, so an operator can watch a rebuild drain here.
    target = oban.ObanTarget(schema=p.schema, version=p.oban_version or 0, note_index=None)
    async with ctx.runtime.pool.acquire() as conn:
        # Literal states, each one range of Oban's state index: never a full scan of a big oban_jobs.
        embed = await oban.embed_backlog(conn, target)
        stuck = await conn.fetchval(
            "SELECT count(*) FROM oban_jobs WHERE state = 'executing' "
            "AND attempted_at < timezone('UTC', now()) - interval '30 minutes'"
        )
        overdue = await conn.fetchval(
            "SELECT count(*) FROM oban_jobs WHERE state = 'available' "
            "AND scheduled_at < timezone('UTC', now()) - interval '15 minutes'"
        )
    by_state = dict.fromkeys((*INCOMPLETE_STATES, "discarded"), 0) | embed.by_state | {"discarded": embed.discarded}
    backlog = embed.total
    details = {
        "oban_version": p.oban_version,
        "embed_jobs_by_state": by_state,
        "embed_backlog": backlog,
        "stuck_executing": int(stuck),
        "overdue_available": int(overdue),
    }
    status: Verdict = "ok"
    summary = f"EmbedNote backlog {backlog}"
    if backlog:
        summary += " (Engram's embed queue is working through it; a reindex_qdrant rebuild drains here)"
    if stuck:
        status = "warn"
        summary += f"; {stuck} job(s) executing for over 30 minutes (Oban's Lifeline rescues them)"
    if overdue:
        status = "warn"
        summary += f"; {overdue} job(s) available for over 15 minutes: is the Engram app running?"
    if by_state["discarded"]:
        summary += f"; {by_state['discarded']} EmbedNote job(s) discarded after all retries"
    return Check(component="oban", status=status, summary=summary, details=details)


# --- restore drill ------------------------------------------------------------------------


async def check_restore_drill(ctx: _Context) -> Check:
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
    summary = f"last successful drill {_age(age)} ago (RTO {last_ok.rto_seconds or 0:.0f} s)"
    if last_any is not None and not last_any.ok:
        status = "warn"
        summary += "; the most recent drill FAILED"
    return Check(component="restore_drill", status=status, summary=summary, details=details)


# --- the tool -------------------------------------------------------------------------------

CHECKS: list[tuple[Component, CheckFn]] = [
    ("postgres", check_postgres),
    ("last_backup", check_last_backup),
    ("master_key", check_master_key),
    ("attachments", check_attachments),
    ("qdrant", check_qdrant),
    ("oban", check_oban),
    ("restore_drill", check_restore_drill),
]


async def _run_check(ctx: _Context, component: Component, fn: CheckFn, limit: float) -> Check:
    started = time.perf_counter()
    try:
        with anyio.fail_after(limit):
            check = await fn(ctx)
    except RecoveryError as exc:
        check = Check(component=component, status="fail", summary=str(exc).replace("\n", " "),
                      details={"error": exc.kind})
    except TimeoutError:
        check = Check(component=component, status="fail", summary=f"did not answer within {limit:g} s",
                      details={"error": "timeout"})
    check.elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
    return check


async def backup_status(runtime: Runtime, params: BackupStatusInput, progress: Progress) -> BackupStatusResult:
    ctx = _Context(runtime, params.deep)
    results: dict[Component, Check] = {}
    timeout = CHECK_TIMEOUT * (30 if params.deep else 1)

    async def run_one(component: Component, fn: CheckFn) -> None:
        results[component] = await _run_check(ctx, component, fn, timeout)
        await progress(len(results), len(CHECKS), f"checked {component}")

    async with anyio.create_task_group() as tg:
        for component, fn in CHECKS:
            tg.start_soon(run_one, component, fn)
    checks = [results[c] for c, _ in CHECKS]
    verdict = _worst([c.status for c in checks])
    failing = [c.component for c in checks if c.status != "ok"]
    summary = (
        "recoverable: every check passed"
        if verdict == "ok"
        else f"{verdict}: " + ", ".join(f"{c} ({results[c].status})" for c in failing)
    )
    return BackupStatusResult(
        verdict=verdict, summary=summary, checked_at=datetime.now(UTC), deep=params.deep, checks=checks
    )


def _size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _age(delta: timedelta) -> str:
    seconds = max(delta.total_seconds(), 0)
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


SPEC = ToolSpec(
    name="backup_status",
    title="Backup status",
    description=(
        "Answer 'could I recover this Engram deployment right now, and what would I lose?'. Checks PostgreSQL "
        "(reachable, pg_dump compatible, role sees all rows under row-level security, WAL archiving), the newest "
        "backup's age and verification, the master key against Engram's boot canary (never revealing it), the "
        "attachments store, Qdrant, Oban's embedding backlog and the last restore drill. Returns one verdict "
        "(ok/warn/fail) and one check per component with a one-line summary that says what to do. Read-only; "
        "fast by default. Pass deep=true to also find attachment rows whose blob is missing (lists the bucket)."
    ),
    input_model=BackupStatusInput,
    result_model=BackupStatusResult,
    run=backup_status,
    annotations=read_only_annotations("Backup status"),
    writes=False,
)
