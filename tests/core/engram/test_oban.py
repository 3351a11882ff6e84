"""core.oban and the reindex engine against real Engram schemas of several releases."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from support import EngramDB, make_engram_db

from engram_recovery.core.engram import oban
from engram_recovery.core.engram.schema_probe import probe
from engram_recovery.core.errors import ConfigurationError
from engram_recovery.core.reindex import engine
from engram_recovery.core.reindex.plan import NIL, BatchPolicy, NoteTable, Scope, Statements

pytestmark = pytest.mark.anyio

ELIGIBLE_LATER = (
    "SELECT n.id FROM notes n JOIN vaults v ON v.id = n.vault_id "
    "WHERE n.kind = 'note' AND n.deleted_at IS NULL AND v.deleted_at IS NULL"
)
ELIGIBLE_OLDER = (
    "SELECT n.id FROM notes n JOIN vaults v ON v.id = n.vault_id WHERE n.deleted_at IS NULL AND v.deleted_at IS NULL"
)


@pytest.fixture
async def conn_factory(admin_dsn: str, master_key: bytes) -> AsyncIterator[Any]:
    dbs: list[Any] = []

    async def make(variant: str, **options: Any) -> tuple[EngramDB, asyncpg.Connection]:
        gen = make_engram_db(admin_dsn, master_key, variant=variant, users=2, vaults_per_user=2, notes=80,
                             attachments=0, **options)  # fmt: skip
        dbs.append(gen)
        db = await gen.__anext__()
        conn = await asyncpg.connect(db.dsn)
        conns.append(conn)
        return db, conn

    conns: list[asyncpg.Connection] = []
    yield make
    for conn in conns:
        await conn.close()
    for gen in dbs:
        await gen.aclose()


async def quiet(done: int, message: str) -> None:
    """The engine's progress callback, for tests that do not watch progress."""


async def build(conn: asyncpg.Connection, *, can_analyze: bool = True, mode: str = "all") -> engine.Job:
    p = await probe(conn)
    target = await oban.detect(conn, p)
    return engine.Job(
        statements=Statements.build(NoteTable.detect(p), target, Scope(), mode, False),  # type: ignore[arg-type]
        target=target, mode=mode, tenants=[None], policy=BatchPolicy(initial=25, minimum=25, maximum=25),  # type: ignore[arg-type]
        can_analyze=can_analyze,
    )  # fmt: skip


def plan_indexes(plan: Any) -> set[str]:
    found: set[str] = set()
    stack = [json.loads(plan)[0]["Plan"]]
    while stack:
        node = stack.pop()
        if "Index Name" in node:
            found.add(node["Index Name"])
        stack.extend(node.get("Plans", []))
    return found


async def test_detect_reads_version_channel_and_engrams_note_id_index(conn_factory: Any) -> None:
    _, conn = await conn_factory("0.18.1")
    target = await oban.detect(conn, await probe(conn))
    assert target.version == 14 and target.channel == "public.oban_insert"
    assert target.note_index == "oban_jobs_embed_note_note_id_index"
    assert "suspended" in target.incomplete_states


async def test_dedup_probe_stays_on_the_note_id_index_as_the_run_grows_oban_jobs(conn_factory: Any) -> None:
    db, conn = await conn_factory("0.18.1")
    # Statistics taken over a history of completed jobs say there is no incomplete one; then a
    # backlog appears that they do not know about, as after a first batch or a burst of edits.
    # Like a drained earlier rebuild: 20,000 jobs ran through the note_id index and completed.
    await conn.execute(
        "INSERT INTO oban_jobs (state, queue, worker, args, max_attempts, priority) SELECT 'available', "
        "'embed', $1, jsonb_build_object('note_id', gen_random_uuid()::text), 5, 9 FROM generate_series(1, 20000)",
        oban.EMBED_WORKER,
    )
    await conn.execute("UPDATE oban_jobs SET state = 'completed', attempt = 1 WHERE state = 'available'")
    await conn.execute("VACUUM ANALYZE oban_jobs")
    await conn.execute(
        "INSERT INTO oban_jobs (state, queue, worker, args, max_attempts, priority) SELECT 'available', 'embed', "
        "$1, jsonb_build_object('note_id', gen_random_uuid()::text), 5, 9 FROM generate_series(1, 3000)",
        oban.EMBED_WORKER,
    )
    job = await build(conn)
    stats = await engine.enqueue(conn, job, quiet)
    assert stats.analyzed >= 2 and stats.enqueued > 0
    ids = [r[0] for r in await conn.fetch("SELECT id FROM notes ORDER BY id LIMIT 2")]
    async with conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = await conn.fetchval("EXPLAIN (FORMAT JSON) " + job.statements.update, NIL, ids[1])
    assert "oban_jobs_embed_note_note_id_index" in plan_indexes(plan)


async def test_older_schema_without_kind_or_note_index_enqueues_exactly_the_eligible_notes(conn_factory: Any) -> None:
    db, conn = await conn_factory("older")
    job = await build(conn)
    assert job.target.note_index is None
    eligible = {r[0] for r in await conn.fetch(ELIGIBLE_OLDER)}
    queued = {uuid.UUID(r[0]) for r in await conn.fetch(
        "SELECT args->>'note_id' FROM oban_jobs WHERE state IN ('available', 'scheduled', 'executing', 'retryable') "
        "AND worker = $1", oban.EMBED_WORKER)}  # fmt: skip
    stats = await engine.enqueue(conn, job, quiet)
    assert stats.enqueued == len(eligible - queued)
    assert (await engine.enqueue(conn, job, quiet)).enqueued == 0


async def test_a_schema_with_dense_indexed_hash_gets_it_cleared_with_the_poison_cooldown(
    conn_factory: Any,
) -> None:
    # dense_indexed_hash is in no Engram release: the synthetic variant proves it is detected, not assumed.
    _, conn = await conn_factory("synthetic-next")
    await conn.execute("UPDATE notes SET dense_indexed_hash = content_hash, embed_retry_after = now() + interval '6h'")
    job = await build(conn)
    before = await conn.fetchval("SELECT max(id) FROM oban_jobs")
    await engine.enqueue(conn, job, quiet)
    rows = await conn.fetch(
        "SELECT n.embed_hash, n.dense_indexed_hash, n.embed_retry_after FROM notes n "
        "WHERE n.id IN (SELECT (args->>'note_id')::uuid FROM oban_jobs WHERE id > $1)", before
    )
    assert len(rows) > 40
    assert all(tuple(r) == (None, None, None) for r in rows)


async def test_a_suspended_embed_job_counts_as_queued(conn_factory: Any) -> None:
    _, conn = await conn_factory("0.18.1")
    note = await conn.fetchval(ELIGIBLE_LATER + " AND n.id NOT IN (SELECT (args->>'note_id')::uuid FROM oban_jobs "
                               "WHERE queue = 'embed') LIMIT 1")  # fmt: skip
    await conn.execute(
        "INSERT INTO oban_jobs (state, queue, worker, args, max_attempts, priority) "
        "VALUES ('suspended', 'embed', $1, jsonb_build_object('note_id', $2::text), 5, 9)",
        oban.EMBED_WORKER, str(note),
    )
    await engine.enqueue(conn, await build(conn), quiet)
    assert await conn.fetchval(
        "SELECT count(*) FROM oban_jobs WHERE args->>'note_id' = $1", str(note)
    ) == 1


async def test_an_oban_table_missing_a_standard_column_is_refused(conn_factory: Any) -> None:
    _, conn = await conn_factory("0.18.1")
    await conn.execute("ALTER TABLE oban_jobs DROP COLUMN meta")
    with pytest.raises(ConfigurationError, match="lacks the column"):
        await oban.detect(conn, await probe(conn))


def test_batches_are_sized_by_time_within_bounds() -> None:
    policy = BatchPolicy(target_seconds=0.5, initial=1000, minimum=100, maximum=8000)
    assert policy.next_size(1000, 0.1) == 2000  # fast: at most doubles
    assert policy.next_size(1000, 0.5) == 1000
    assert policy.next_size(1000, 4.0) == 500  # slow: at most halves
    assert policy.next_size(150, 10.0) == 100
    assert policy.next_size(6000, 0.01) == 8000
