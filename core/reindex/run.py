"""reindex_qdrant: rebuild Qdrant from PostgreSQL through Engram's own EmbedNote jobs.

Qdrant only holds vectors derived from notes, so after its loss the app must
re-embed. Enqueueing jobs is not enough: EmbedNote skips a note whose
`embed_hash` still equals its `content_hash`, so each batch also clears that
state for exactly the notes it enqueues. The Engram app does the embedding.
This module is the run (checks, lock, batches, report); plan.py holds its SQL,
engine.py its batches; tools/reindex_qdrant.py is the MCP adapter.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import asyncpg
from pydantic import BaseModel, Field
from qdrant_client import AsyncQdrantClient

from ..engram import oban
from ..engram.schema_probe import probe
from ..errors import ConfigurationError, StoreUnreachable
from ..progress import Progress
from ..runtime import Runtime
from ..stores import qdrant
from ..stores.advisory import Purpose, advisory_key, database_lock
from ..stores.postgres import describe
from . import engine
from .plan import BatchPolicy, Mode, NoteTable, Scope, Statements, estimated_tokens, parse_uuid

# Module-level so a test can make batches small enough to interrupt one deliberately.
POLICY = BatchPolicy()
PER_VAULT_LIMIT = 200
TOKENS_NOTE = "estimate: ciphertext bytes of the notes' content / 4 (AES-GCM tags excluded)"


# One confirmed reindex of a database at a time (a dry run changes nothing and needs no lock).
REINDEX = Purpose(
    advisory_key("reindex"),
    "engram-recovery reindex_qdrant",
    "another confirmed reindex_qdrant of this database is running",
    "wait for it to finish (its EmbedNote jobs then show in backup_status's oban check), then run again if "
    "needed; a dry run (confirm=false) is allowed meanwhile; the lock is released when its holder ends",
)


@dataclass(frozen=True)
class ReindexRequest:
    """What reindex_qdrant was asked (the tool's input, validated)."""

    mode: Mode = "missing"
    user_id: str | None = None
    vault_id: str | None = None
    collection: str | None = None
    recreate_collection: bool = False
    delete_orphans: bool = False
    confirm: bool = False


class VaultPlan(BaseModel):
    user_id: str
    vault_id: str
    notes: int
    already_queued: int
    estimated_tokens: int


class Backlog(BaseModel):
    total: int = Field(description="EmbedNote jobs still to run: watch it drain (backup_status reports it too).")
    by_state: dict[str, int]
    discarded: int


# (No docstring: the tool's result inherits this model, and its schema must not gain a description.)
class ReindexReport(BaseModel):
    dry_run: bool
    mode: Mode
    rls_mode: Literal["bypass", "per_tenant"]
    rls_explanation: str
    collection: str
    notes_to_enqueue: int = Field(description="Dry run: notes a confirmed run would enqueue now.")
    already_queued: int = Field(description="In-scope notes that already have a pending EmbedNote job: no second "
                                "job; their embed_hash (and retry/dense stamps) is cleared (dry run: would be) so "
                                "that job re-embeds them instead of skipping them.")
    enqueued: int = Field(description="EmbedNote jobs inserted by this run.")
    notes_reset: int = Field(description="Notes whose embed_hash (and retry/dense stamps) this run cleared: the "
                             "enqueued ones and the already queued ones that still had a stamp.")
    estimated_tokens: int
    tokens_note: str = TOKENS_NOTE
    per_vault: list[VaultPlan]
    per_vault_truncated: bool = False
    batches: int
    max_batch_seconds: float
    seconds: float
    collection_recreated: bool = False
    points_dropped: int | None = None
    orphan_points: int | None = None
    orphan_points_deleted: int = 0
    orphan_points_unchecked: int = 0
    backlog: Backlog
    oban_version: int
    dedup_index: str | None
    oban_statistics_refreshed: int = Field(
        description="ANALYZEs of oban_jobs during the run (keeps de-dup probes on the note_id index as it grows); "
        "0 with a role that does not own the table: then run ANALYZE oban_jobs as its owner if batches slow down."
    )
    summary: str


async def reindex(runtime: Runtime, params: ReindexRequest, progress: Progress) -> ReindexReport:
    """One reindex run: checks, the lock for a confirmed run, then the batches (dry run: the counts only)."""
    started = time.perf_counter()
    settings = runtime.settings
    name = settings.qdrant_collection
    if params.collection is not None and params.collection != name:
        raise ConfigurationError(
            f"collection {params.collection!r} is not the configured QDRANT_COLLECTION ({name!r}); nothing changed",
            "pass the collection Engram uses, or set QDRANT_COLLECTION to the one you mean",
        )
    scope = Scope(parse_uuid(params.user_id, "user_id"), parse_uuid(params.vault_id, "vault_id"))
    needs_qdrant = params.mode == "missing" or params.recreate_collection or params.delete_orphans
    if needs_qdrant and not settings.qdrant_configured:
        raise ConfigurationError(
            "Qdrant is not configured, but this mode reads or changes it",
            "set QDRANT_URL (and QDRANT_API_KEY), or use mode='all' / mode='stale' without recreate/delete_orphans",
        )
    dry_run = not params.confirm
    # Two confirmed runs would both proceed safely (batch by batch) but silently; the second is refused
    # and told who runs. A dry run changes nothing and needs no lock.
    lock = contextlib.nullcontext() if dry_run else database_lock(runtime.dsn, REINDEX)
    async with lock, runtime.pool.acquire() as conn:
        return await _guarded(ReindexRun(runtime, conn, params, scope, dry_run, progress, started))


@dataclass(frozen=True)
class ReindexRun:
    """One reindex run, as the steps below it share it (instead of seven parameters each)."""

    runtime: Runtime
    conn: asyncpg.Connection
    params: ReindexRequest
    scope: Scope
    dry_run: bool
    progress: Progress
    started: float  # time.perf_counter() at the start, for the report's duration


async def _guarded(ctx: ReindexRun) -> ReindexReport:
    """The store boundary: driver errors become ours, inside the pool's own translation."""
    try:
        return await _run(ctx)
    except (asyncpg.InterfaceError, asyncpg.AdminShutdownError, OSError) as exc:
        raise StoreUnreachable(
            f"the connection to PostgreSQL was lost during the reindex ({exc.__class__.__name__})",
            "every batch committed before the loss stays applied and none is half-written: run reindex_qdrant "
            "again with the same arguments to continue",
        ) from exc
    except asyncpg.PostgresError as exc:
        raise describe(exc) from exc
    except qdrant.QDRANT_ERRORS as exc:
        raise qdrant.translate(exc, "check or rebuild the collection") from exc


async def _run(ctx: ReindexRun) -> ReindexReport:
    runtime, conn, params, scope = ctx.runtime, ctx.conn, ctx.params, ctx.scope
    dry_run, progress, started = ctx.dry_run, ctx.progress, ctx.started
    settings = runtime.settings
    name = settings.qdrant_collection
    p = await probe(conn)
    notes = NoteTable.detect(p)
    target = await oban.detect(conn, p)
    per_tenant = not p.sees_all_rows
    await _check_scope(conn, scope, per_tenant)
    tenants: list[uuid.UUID | None]
    if not per_tenant:
        tenants = [None]
        rls = f"role {p.role} sees every row (superuser or BYPASSRLS): one pass over all tenants"
    else:
        users = [scope.user_id] if scope.user_id else None
        tenants = list(users or [r[0] for r in await conn.fetch("SELECT id FROM users ORDER BY id")])
        rls = (
            f"role {p.role} is subject to row-level security: worked per tenant with app.current_tenant set in "
            f"each transaction, {len(tenants)} user(s) from the users table"
        )
    uses_qdrant = params.mode == "missing" or params.recreate_collection or params.delete_orphans
    client = runtime.qdrant() if uses_qdrant else None
    recreated, dropped = False, None
    if params.recreate_collection and client is not None:
        if dry_run:
            state = await qdrant.collection_state(client, name)
            dropped = state.points if state.exists else None
        else:
            dropped = await qdrant.recreate_collection(client, name, settings.embed_dims)
            recreated = True
            await progress(0, None, f"recreated collection {name} ({dropped or 0} points dropped)")
    orphans = deleted = unchecked = 0
    orphans_checked = params.delete_orphans and client is not None and not recreated
    if orphans_checked and client is not None:
        orphans, deleted, unchecked = await _orphans(ctx, client, per_tenant)

    async def point_check(ids: Sequence[str]) -> set[str]:
        # After a recreate (or in a dry run of one) every point is gone by definition.
        if client is None or params.recreate_collection:
            return set()
        return await qdrant.existing_point_ids(client, name, ids)

    job = engine.Job(
        statements=Statements.build(notes, target, scope, params.mode, per_tenant),
        target=target,
        mode=params.mode,
        tenants=tenants,
        policy=POLICY,
        point_check=point_check,
        can_analyze=await oban.can_analyze(conn, target),
    )
    total = p.estimates.get("notes") or None

    async def report(done: int, message: str) -> None:
        await progress(done, float(total) if total and total >= done else None, message)

    stats = await (engine.count(conn, job, report) if dry_run else engine.enqueue(conn, job, report))
    backlog = await oban.embed_backlog(conn, target)
    vaults = sorted(stats.per_vault.values(), key=lambda v: (str(v.user_id), str(v.vault_id)))
    would = sum(v.notes for v in vaults)
    tokens = estimated_tokens(sum(v.content_bytes for v in vaults))
    queued = sum(v.already_queued for v in vaults)
    result = ReindexReport(
        dry_run=dry_run,
        mode=params.mode,
        rls_mode="per_tenant" if per_tenant else "bypass",
        rls_explanation=rls,
        collection=name,
        notes_to_enqueue=would,
        already_queued=queued,
        enqueued=stats.enqueued,
        notes_reset=stats.reset,
        estimated_tokens=tokens,
        per_vault=[
            VaultPlan(
                user_id=str(v.user_id), vault_id=str(v.vault_id), notes=v.notes,
                already_queued=v.already_queued, estimated_tokens=estimated_tokens(v.content_bytes),
            )
            for v in vaults[:PER_VAULT_LIMIT]
        ],
        per_vault_truncated=len(vaults) > PER_VAULT_LIMIT,
        batches=stats.batches,
        max_batch_seconds=round(stats.max_batch_seconds, 4),
        seconds=round(time.perf_counter() - started, 3),
        collection_recreated=recreated,
        points_dropped=dropped,
        orphan_points=orphans if orphans_checked else None,
        orphan_points_deleted=deleted,
        orphan_points_unchecked=unchecked,
        backlog=Backlog(total=backlog.total, by_state=backlog.by_state, discarded=backlog.discarded),
        oban_version=target.version,
        dedup_index=target.note_index,
        oban_statistics_refreshed=stats.analyzed,
        summary="",
    )
    return result.model_copy(update={"summary": _summary(result, params.recreate_collection)})


async def _check_scope(conn: asyncpg.Connection, scope: Scope, per_tenant: bool) -> None:
    exists = "SELECT EXISTS (SELECT 1 FROM users WHERE id = $1)"
    if scope.user_id is not None and not await conn.fetchval(exists, scope.user_id):
        raise ConfigurationError(f"no user with id {scope.user_id}; nothing changed", "check user_id")
    if scope.vault_id is None:
        return
    if per_tenant and scope.user_id is None:
        raise ConfigurationError(
            "this role works per tenant (row-level security), so a vault can only be found within its user",
            "pass user_id together with vault_id",
        )
    async with engine.tenant_transaction(conn, scope.user_id if per_tenant else None):
        owner = await conn.fetchval("SELECT user_id FROM vaults WHERE id = $1", scope.vault_id)
    if owner is None:
        raise ConfigurationError(f"no vault with id {scope.vault_id}; nothing changed", "check vault_id")
    if scope.user_id is not None and owner != scope.user_id:
        raise ConfigurationError(
            f"vault {scope.vault_id} belongs to another user than {scope.user_id}; nothing changed",
            "pass the vault's own user_id, or leave user_id out",
        )


async def _orphans(ctx: ReindexRun, client: AsyncQdrantClient, per_tenant: bool) -> tuple[int, int, int]:
    """Points whose id no chunks row holds: (found, deleted, left unchecked)."""
    conn, scope, name = ctx.conn, ctx.scope, ctx.runtime.settings.qdrant_collection
    found = deleted = unchecked = 0
    query = "SELECT qdrant_point_id::text FROM chunks WHERE qdrant_point_id = ANY($1::uuid[])"
    async for page in qdrant.scroll_points(client, name):
        if scope.user_id is not None:
            page = [(pid, user) for pid, user in page if user == str(scope.user_id)]
        groups: dict[str | None, list[str]] = {}
        for pid, user in page:
            groups.setdefault(user if per_tenant else None, []).append(pid)
        orphans: list[str] = []
        for user, ids in groups.items():
            tenant = _as_uuid(user) if per_tenant else None
            if per_tenant and tenant is None:
                # Without a tenant the chunks table looks empty under RLS: never call these orphans.
                unchecked += len(ids)
                continue
            uuids = [i for i in ids if _as_uuid(i) is not None]
            async with engine.tenant_transaction(conn, tenant):
                known = {r[0] for r in await conn.fetch(query, uuids)}
            orphans += [i for i in ids if i not in known]
        found += len(orphans)
        if orphans and not ctx.dry_run:
            await qdrant.delete_points(client, name, orphans)
            deleted += len(orphans)
    return found, deleted, unchecked


def _as_uuid(value: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(value) if value else None
    except ValueError:
        return None


def _summary(report: ReindexReport, recreate: bool) -> str:
    """The report in one sentence, from its own figures (`recreate`: a recreate was asked, done or not)."""
    dry_run, mode, name, queued = report.dry_run, report.mode, report.collection, report.already_queued
    pending = (f"; {queued} note(s) already have a pending EmbedNote job: no second job, their embed state "
               f"{'would be' if dry_run else 'was'} reset so that job re-embeds them") if queued else ""
    if dry_run:
        text = f"dry run ({mode}): {report.notes_to_enqueue} note(s) would be enqueued for re-embedding{pending}"
        if recreate:
            text += f"; collection {name} would be dropped and recreated"
        return text + ". Nothing changed: call again with confirm=true to do it"
    text = f"enqueued {report.enqueued} EmbedNote job(s) in {report.batches} batch(es) (mode {mode}){pending}"
    if report.collection_recreated:
        text += f"; collection {name} recreated"
    if report.orphan_points_deleted:
        text += f"; {report.orphan_points_deleted} orphan point(s) deleted"
    return text + (f". Embedding backlog now {report.backlog.total}: the Engram app's embed queue drains it; "
                   "watch backup_status")
