"""The reindex engine: walks notes in time-sized batches and enqueues EmbedNote jobs.

Each batch is one transaction that takes the run's advisory lock, resets the
embed state of exactly the notes it is about to enqueue and inserts their jobs,
then wakes Oban: a batch is applied entirely or not at all, so an interrupted
run is continued by running again (the de-duplication skips what is queued).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import asyncpg

from ..engram import oban
from .plan import NIL, BatchPolicy, Mode, Statements

# Every run and batch of this tool serialises on this key (a fixed 64-bit number derived
# from the tool's name), so two runs cannot both see a note as not queued.
LOCK_KEY = int.from_bytes(
    uuid.uuid5(uuid.NAMESPACE_URL, "engram-recovery/reindex_qdrant").bytes[:8], "big", signed=True
)

ProgressFn = Callable[[int, str], Awaitable[None]]
"""Called after each batch with the number of notes scanned so far and a one-line message."""
PointCheck = Callable[[Sequence[str]], Awaitable[set[str]]]
"""Given Qdrant point ids, returns those that exist."""


@dataclass
class VaultCount:
    user_id: uuid.UUID
    vault_id: uuid.UUID
    notes: int = 0
    already_queued: int = 0
    content_bytes: int = 0


@dataclass
class RunStats:
    batches: int = 0
    analyzed: int = 0
    scanned: int = 0
    reset: int = 0
    enqueued: int = 0
    max_batch_seconds: float = 0.0
    batch_seconds: list[float] = field(default_factory=list)
    per_vault: dict[tuple[uuid.UUID, uuid.UUID], VaultCount] = field(default_factory=dict)

    def add_enqueued(self, rows: Sequence[asyncpg.Record], untouched: Sequence[asyncpg.Record]) -> None:
        """A batch's reset rows (each enqueued unless already queued) and its already-queued rows left alone."""
        for row in rows:
            entry = self._vault(row)
            if row["queued"]:
                entry.already_queued += 1
            else:
                entry.notes += 1
                entry.content_bytes += int(row["bytes"])
        for row in untouched:
            self._vault(row).already_queued += int(row["n"])

    def _vault(self, row: asyncpg.Record) -> VaultCount:
        key = (row["user_id"], row["vault_id"])
        return self.per_vault.setdefault(key, VaultCount(row["user_id"], row["vault_id"]))

    def count(self, row: asyncpg.Record) -> None:
        entry = self._vault(row)
        entry.notes += int(row["would"])
        entry.already_queued += int(row["queued"])
        entry.content_bytes += int(row["bytes"])


@dataclass(frozen=True)
class Job:
    """One reindex run over one or more tenants (None = a role that sees every row)."""

    statements: Statements
    target: oban.ObanTarget
    mode: Mode
    tenants: Sequence[uuid.UUID | None]
    policy: BatchPolicy
    point_check: PointCheck | None = None
    can_analyze: bool = False
    """The role may ANALYZE oban_jobs (its owner or a superuser)."""


@asynccontextmanager
async def tenant_transaction(conn: asyncpg.Connection, tenant: uuid.UUID | None) -> AsyncIterator[None]:
    async with conn.transaction():
        if tenant is not None:
            # Transaction-local, like Engram's Repo: it cannot leak into the next use of the connection.
            await conn.execute("SELECT set_config('app.current_tenant', $1, true)", str(tenant))
        yield


async def enqueue(conn: asyncpg.Connection, job: Job, progress: ProgressFn) -> RunStats:
    stats = RunStats()
    insert_sql = oban.insert_jobs_sql(job.target)
    fresh = _Statistics(job)
    await fresh.refresh(conn, stats, first=True)
    for tenant in job.tenants:
        async for lo, hi, extra in _ranges(conn, job, tenant, stats):
            started = time.perf_counter()
            async with tenant_transaction(conn, tenant):
                await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
                # Index probes whatever the statistics say: a plan chosen while oban_jobs looked
                # empty must not turn into a scan per note once it holds a million jobs.
                await conn.execute("SET LOCAL enable_seqscan = off")
                # Before the update, which would make the notes it resets look untouched.
                untouched = await conn.fetch(job.statements.queued_untouched, lo, hi, *extra)
                # Queued ones come back reset but are not queued again: the pending job re-embeds them.
                rows = await conn.fetch(job.statements.update, lo, hi, *extra)
                ids = [r["id"] for r in rows if not r["queued"]]
                inserted = int(await conn.fetchval(insert_sql, ids)) if ids else 0
                if inserted:
                    await oban.notify_insert(conn, job.target)
            elapsed = time.perf_counter() - started
            stats.add_enqueued(rows, untouched)
            stats.batches += 1
            stats.reset += len(rows)
            stats.enqueued += inserted
            stats.batch_seconds.append(round(elapsed, 4))
            stats.max_batch_seconds = max(stats.max_batch_seconds, elapsed)
            await fresh.after_insert(conn, stats, inserted)
            await progress(
                stats.scanned,
                f"batch {stats.batches}: {inserted} EmbedNote job(s) enqueued in {elapsed:.2f} s "
                f"({stats.enqueued} so far)",
            )
    return stats


class _Statistics:
    """Keeps oban_jobs' planner statistics current while this run grows the table.

    Statistics taken while oban_jobs held no incomplete jobs make the planner probe
    for a note's job through a state index (it expects no rows there) instead of
    Engram's note_id index, and every probe then walks all the jobs this run has
    inserted so far: a batch of seconds becomes minutes. Re-analysing after every
    10% of growth keeps the estimates, and so the index choice, right.
    """

    MIN_GROWTH = 5_000

    def __init__(self, job: Job) -> None:
        self.job = job
        self.pending = 0
        # The first batch that inserts anything is followed by an ANALYZE: from then on the
        # statistics know that incomplete EmbedNote jobs exist, and the plan stays right.
        self.threshold = 1
        self.rows = 0

    async def refresh(self, conn: asyncpg.Connection, stats: RunStats, *, first: bool = False) -> None:
        if not self.job.can_analyze:
            return
        await conn.execute(f"ANALYZE {self.job.target.table}")
        stats.analyzed += 1
        self.rows = int(
            await conn.fetchval("SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = $1::regclass",
                                self.job.target.table)  # fmt: skip
        )
        self.pending = 0
        self.threshold = 1 if first else max(self.MIN_GROWTH, self.rows // 10)

    async def after_insert(self, conn: asyncpg.Connection, stats: RunStats, inserted: int) -> None:
        self.pending += inserted
        if self.pending >= self.threshold:
            await self.refresh(conn, stats)


async def count(conn: asyncpg.Connection, job: Job, progress: ProgressFn) -> RunStats:
    """What `enqueue` would do, per user and vault, changing nothing."""
    stats = RunStats()
    for tenant in job.tenants:
        if job.mode != "missing":
            async with tenant_transaction(conn, tenant):
                for row in await conn.fetch(job.statements.count):
                    stats.count(row)
            continue
        async for _lo, _hi, extra in _ranges(conn, job, tenant, stats):
            async with tenant_transaction(conn, tenant):
                for row in await conn.fetch(job.statements.count_missing, *extra):
                    stats.count(row)
            await progress(stats.scanned, f"checked {stats.scanned} notes against Qdrant")
    return stats


async def _ranges(
    conn: asyncpg.Connection, job: Job, tenant: uuid.UUID | None, stats: RunStats
) -> AsyncIterator[tuple[uuid.UUID, uuid.UUID, list[list[uuid.UUID]]]]:
    """Key ranges (lo, hi] of notes, sized from the previous batch's duration.

    In `missing` mode each range comes with the notes in it that have a chunk
    whose point is absent from Qdrant (looked up in bulk, outside any transaction);
    ranges without such notes are skipped.
    """
    lo, size = NIL, job.policy.initial
    while True:
        async with tenant_transaction(conn, tenant):
            hi = await conn.fetchval(job.statements.bound, lo, size)
        if hi is None:
            return
        scanned_before = stats.batches
        stats.scanned += size
        extra: list[list[uuid.UUID]] = []
        if job.mode == "missing":
            assert job.point_check is not None
            missing = await _missing_notes(conn, job, tenant, lo, hi)
            if not missing:
                lo, size = hi, job.policy.next_size(size, 0.0)
                continue
            extra = [missing]
        yield lo, hi, extra
        last = stats.batch_seconds[-1] if stats.batches > scanned_before and stats.batch_seconds else 0.0
        lo, size = hi, job.policy.next_size(size, last)


async def _missing_notes(
    conn: asyncpg.Connection, job: Job, tenant: uuid.UUID | None, lo: uuid.UUID, hi: uuid.UUID
) -> list[uuid.UUID]:
    assert job.point_check is not None
    async with tenant_transaction(conn, tenant):
        rows = await conn.fetch(job.statements.chunks, lo, hi)
        never = {r["id"] for r in await conn.fetch(job.statements.unembedded, lo, hi)}
    found = await job.point_check([str(r["qdrant_point_id"]) for r in rows]) if rows else set()
    return sorted(never | {r["note_id"] for r in rows if str(r["qdrant_point_id"]) not in found})
