"""reindex_qdrant against real PostgreSQL, a real (local-mode) Qdrant and the test-only EmbedNote stand-in."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from embed_worker import Worker
from mcp import Client
from support import EngramDB, make_engram_db

from engram_recovery import testbed
from engram_recovery.core.errors import Busy, ConfigurationError, StoreUnreachable
from engram_recovery.core.progress import silent
from engram_recovery.core.reindex import run as tool
from engram_recovery.core.reindex.plan import BatchPolicy
from engram_recovery.core.reindex.run import REINDEX
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import Settings
from engram_recovery.core.stores import qdrant
from engram_recovery.core.stores.advisory import database_lock
from engram_recovery.tools.reindex_qdrant import ReindexInput, reindex_qdrant

DIMS = 8
pytestmark = pytest.mark.anyio


@pytest.fixture
async def db(admin_dsn: str, master_key: bytes) -> AsyncIterator[EngramDB]:
    async for engram in make_engram_db(admin_dsn, master_key, users=3, vaults_per_user=2, notes=120):
        yield engram


@pytest.fixture
def settings(db: EngramDB, settings_for: Callable[..., Settings]) -> Settings:
    return settings_for(db, EMBED_DIMS=str(DIMS))


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    rt = Runtime(settings)
    try:
        yield rt
    finally:
        await rt.aclose()


def worker_for(db: EngramDB, runtime: Runtime) -> Worker:
    return Worker(db.dsn, runtime.qdrant(), runtime.settings.qdrant_collection, DIMS, db.report.deks)


async def fetch(db: EngramDB, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db.dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def scalar(db: EngramDB, sql: str, *args: Any) -> Any:
    return (await fetch(db, sql, *args))[0][0]


ELIGIBLE = (
    "SELECT n.id FROM notes n JOIN vaults v ON v.id = n.vault_id "
    "WHERE n.kind = 'note' AND n.deleted_at IS NULL AND v.deleted_at IS NULL"
)
LIVE_CHUNKS = "SELECT count(*) FROM chunks c JOIN (" + ELIGIBLE + ") e ON e.id = c.note_id"
INELIGIBLE_STATE = "SELECT id, embed_hash, embed_retry_after FROM notes WHERE id <> ALL($1::uuid[]) ORDER BY id"
PENDING = (
    "SELECT DISTINCT (args->>'note_id')::uuid FROM oban_jobs WHERE worker = 'Engram.Workers.EmbedNote' "
    "AND state IN ('available', 'scheduled', 'executing', 'retryable', 'suspended')"
)


async def embed_jobs_per_note(db: EngramDB) -> dict[uuid.UUID, int]:
    rows = await fetch(
        db, "SELECT (args->>'note_id')::uuid AS note, count(*) AS n FROM oban_jobs "
        "WHERE worker = 'Engram.Workers.EmbedNote' AND state IN ('available', 'scheduled', 'executing', "
        "'retryable', 'suspended') GROUP BY 1",
    )
    return {r["note"]: r["n"] for r in rows}


async def test_dry_run_counts_per_vault_and_changes_nothing(db: EngramDB, runtime: Runtime) -> None:
    before = await fetch(db, "SELECT id, embed_hash FROM notes ORDER BY id")
    jobs_before = await scalar(db, "SELECT count(*) FROM oban_jobs")
    result = await reindex_qdrant(runtime, ReindexInput(mode="all"), silent)
    eligible = {r[0] for r in await fetch(db, ELIGIBLE)}
    queued = {r[0] for r in await fetch(db, PENDING)} & eligible
    assert result.dry_run is True
    assert result.notes_to_enqueue == len(eligible - queued) > 0
    assert result.already_queued == len(queued) > 0
    assert sum(v.notes for v in result.per_vault) == result.notes_to_enqueue
    assert result.estimated_tokens > 0 and "estimate" in result.tokens_note
    assert {uuid.UUID(v.vault_id) for v in result.per_vault} <= {v for vs in db.report.vault_ids.values() for v in vs}
    assert not {uuid.UUID(v.vault_id) for v in result.per_vault} & set(db.report.deleted_vault_ids)
    assert result.rls_mode == "bypass" and result.enqueued == 0
    assert await fetch(db, "SELECT id, embed_hash FROM notes ORDER BY id") == before
    assert await scalar(db, "SELECT count(*) FROM oban_jobs") == jobs_before


async def test_confirmed_run_enqueues_each_eligible_note_once_in_oban_insert_all_shape(
    db: EngramDB, runtime: Runtime
) -> None:
    eligible = {r[0] for r in await fetch(db, ELIGIBLE)}
    queued_before = {r[0] for r in await fetch(db, PENDING)}
    max_id = await scalar(db, "SELECT max(id) FROM oban_jobs")
    jobs_before = await embed_jobs_per_note(db)
    ineligible_before = await fetch(db, INELIGIBLE_STATE, list(eligible))
    assert len(ineligible_before) > 10
    result = await reindex_qdrant(runtime, ReindexInput(mode="all", confirm=True), silent)
    fresh = await fetch(db, "SELECT *, timezone('UTC', now()) AS utc_now FROM oban_jobs WHERE id > $1", max_id)
    assert result.enqueued == len(fresh) == len(eligible - queued_before)
    assert {uuid.UUID(json.loads(r["args"])["note_id"]) for r in fresh} == eligible - queued_before
    for row in fresh:
        assert json.loads(row["args"]) == {"note_id": json.loads(row["args"])["note_id"]}
        assert (row["state"], row["queue"], row["worker"]) == ("available", "embed", "Engram.Workers.EmbedNote")
        assert (row["attempt"], row["max_attempts"], row["priority"]) == (0, 5, 9)
        assert json.loads(row["meta"]) == {} and row["tags"] == [] and row["errors"] == []
        assert row["attempted_at"] is None and row["attempted_by"] is None
        # Column defaults, in UTC: timestamp without time zone, like Oban's own inserts.
        assert abs((row["utc_now"] - row["inserted_at"]).total_seconds()) < 60
        assert row["scheduled_at"] == row["inserted_at"]
    reset = {r[0] for r in await fetch(db, "SELECT id FROM notes WHERE embed_hash IS NULL")}
    assert eligible - queued_before <= reset
    # Folder markers, deleted notes and notes of the deleted vault: no job, embed state untouched.
    assert await fetch(db, INELIGIBLE_STATE, list(eligible)) == ineligible_before
    # The already queued are reset too (where a stamp was set), and counted, but get no second job.
    assert result.already_queued == len(eligible & queued_before) > 0
    assert result.enqueued < result.notes_reset <= result.enqueued + result.already_queued
    jobs_after = await embed_jobs_per_note(db)
    assert jobs_after == jobs_before | dict.fromkeys(eligible - queued_before, 1)
    assert result.backlog.total == sum(jobs_after.values())

    again = await reindex_qdrant(runtime, ReindexInput(mode="all", confirm=True), silent)
    assert again.enqueued == 0 and again.notes_reset == 0 and again.already_queued == len(eligible)
    assert await embed_jobs_per_note(db) == jobs_after


async def test_rebuild_after_qdrant_loss_restores_every_live_notes_points(db: EngramDB, runtime: Runtime) -> None:
    worker = worker_for(db, runtime)
    client = runtime.qdrant()
    name = runtime.settings.qdrant_collection
    # Before the loss: everything embedded, nothing pending.
    await fetch(db, "DELETE FROM oban_jobs WHERE worker = 'Engram.Workers.EmbedNote'")
    await fetch(db, "UPDATE notes SET embed_hash = NULL")
    outcomes = await worker.embed_notes([r[0] for r in await fetch(db, ELIGIBLE)])
    assert set(outcomes) == {"embedded"}
    points_before = (await client.count(name, exact=True)).count
    assert points_before == await scalar(db, LIVE_CHUNKS)

    await client.delete_collection(name)  # the loss
    result = await reindex_qdrant(runtime, ReindexInput(mode="missing", confirm=True), silent)
    eligible = {r[0] for r in await fetch(db, ELIGIBLE)}
    assert result.enqueued == len(eligible)
    assert await worker.drain() == len(eligible)

    assert all(outcome == "embedded" for _, _, outcome in worker.executed)
    assert len({job for job, _, _ in worker.executed}) == len(worker.executed)  # no job ran twice
    assert len({note for _, note, _ in worker.executed}) == len(worker.executed)  # no note embedded twice
    chunk_points = await fetch(
        db, "SELECT c.note_id, c.qdrant_point_id::text FROM chunks c JOIN (" + ELIGIBLE + ") e ON e.id = c.note_id"
    )
    assert {r[0] for r in chunk_points} == eligible
    found = await qdrant.existing_point_ids(client, name, [r[1] for r in chunk_points])
    assert found == {r[1] for r in chunk_points}
    assert (await client.count(name, exact=True)).count == len(chunk_points)
    # Deleted notes, notes of the deleted vault and folder markers got no job and no points.
    ineligible = await fetch(db, "SELECT id FROM notes WHERE id <> ALL($1::uuid[])", list(eligible))
    assert not {r[0] for r in ineligible} & {note for _, note, _ in worker.executed}
    assert await scalar(db, "SELECT count(*) FROM oban_jobs WHERE state <> 'completed' AND queue = 'embed'") == 0
    again = await reindex_qdrant(runtime, ReindexInput(mode="missing"), silent)
    assert again.notes_to_enqueue == 0


async def test_after_a_qdrant_loss_a_note_with_a_pending_job_is_reset_so_that_job_reembeds_it(
    db: EngramDB, runtime: Runtime
) -> None:
    worker = worker_for(db, runtime)
    client = runtime.qdrant()
    name = runtime.settings.qdrant_collection
    await fetch(db, "DELETE FROM oban_jobs WHERE worker = 'Engram.Workers.EmbedNote'")
    await fetch(db, "UPDATE notes SET embed_hash = NULL")
    eligible = sorted(r[0] for r in await fetch(db, ELIGIBLE))
    await worker.embed_notes(eligible)  # everything embedded: embed_hash = content_hash everywhere
    # Jobs already pending when Qdrant is lost (an edit's job, a ReconcileEmbeddings job and its stamp, one
    # suspended): each would SKIP its note, whose embed_hash still equals its content_hash.
    pending = {eligible[0]: "available", eligible[1]: "scheduled", eligible[2]: "suspended"}
    for note, state in pending.items():
        await fetch(db, "INSERT INTO oban_jobs (state, queue, worker, args, max_attempts, priority, scheduled_at) "
                    "VALUES ($1, 'embed', 'Engram.Workers.EmbedNote', jsonb_build_object('note_id', $2::text), 5, 9, "
                    "timezone('UTC', now()) - interval '1 second')", state, str(note))  # fmt: skip
    await fetch(db, "UPDATE notes SET embed_retry_after = timezone('UTC', now()) + interval '30 minutes' "
                "WHERE id = $1", eligible[1])  # fmt: skip
    await client.delete_collection(name)  # the loss

    plan = await reindex_qdrant(runtime, ReindexInput(mode="all"), silent)
    result = await reindex_qdrant(runtime, ReindexInput(mode="all", confirm=True), silent)
    # Counted apart, the same in the dry run and the confirmed run, and never queued twice.
    assert plan.already_queued == result.already_queued == len(pending)
    assert plan.notes_to_enqueue == result.enqueued == len(eligible) - len(pending)
    assert result.notes_reset == len(eligible) and str(len(pending)) in result.summary
    assert await embed_jobs_per_note(db) == dict.fromkeys(eligible, 1)
    stamps = await fetch(db, "SELECT embed_hash, embed_retry_after FROM notes WHERE id = ANY($1::uuid[])",
                         list(pending))  # fmt: skip
    assert [(r["embed_hash"], r["embed_retry_after"]) for r in stamps] == [(None, None)] * len(pending)
    # Oban runs the scheduled job when due; the suspended one waits for its queue to resume.
    await fetch(db, "UPDATE oban_jobs SET state = 'available' WHERE state = 'scheduled' AND queue = 'embed'")
    await worker.drain()
    assert {note for _, note, outcome in worker.executed if outcome == "embedded"} == set(eligible) - {eligible[2]}
    assert not [outcome for _, _, outcome in worker.executed if outcome != "embedded"]


async def test_missing_mode_includes_notes_that_were_never_embedded(db: EngramDB, runtime: Runtime) -> None:
    worker = worker_for(db, runtime)
    await fetch(db, "DELETE FROM oban_jobs WHERE worker = 'Engram.Workers.EmbedNote'")
    await fetch(db, "UPDATE notes SET embed_hash = NULL")
    await fetch(db, "DELETE FROM chunks")
    eligible = sorted(r[0] for r in await fetch(db, ELIGIBLE))
    never = eligible[::9]
    await worker.embed_notes([n for n in eligible if n not in never])
    # Not in Qdrant either, though no chunk row names a point to find missing.
    plan = await reindex_qdrant(runtime, ReindexInput(mode="missing"), silent)
    assert plan.notes_to_enqueue == len(never)
    result = await reindex_qdrant(runtime, ReindexInput(mode="missing", confirm=True), silent)
    assert result.enqueued == len(never) and set(await embed_jobs_per_note(db)) == set(never)


async def test_missing_mode_enqueues_only_notes_whose_points_are_gone(db: EngramDB, runtime: Runtime) -> None:
    worker = worker_for(db, runtime)
    client = runtime.qdrant()
    name = runtime.settings.qdrant_collection
    await fetch(db, "DELETE FROM oban_jobs WHERE worker = 'Engram.Workers.EmbedNote'")
    await fetch(db, "UPDATE notes SET embed_hash = NULL")
    eligible = sorted(r[0] for r in await fetch(db, ELIGIBLE))
    await worker.embed_notes(eligible)
    lost = eligible[::7]
    points = await fetch(db, "SELECT qdrant_point_id::text FROM chunks WHERE note_id = ANY($1::uuid[])", lost)
    await qdrant.delete_points(client, name, [r[0] for r in points])

    plan = await reindex_qdrant(runtime, ReindexInput(mode="missing"), silent)
    assert plan.notes_to_enqueue == len(lost)
    result = await reindex_qdrant(runtime, ReindexInput(mode="missing", confirm=True), silent)
    assert set(await embed_jobs_per_note(db)) == set(lost) and result.enqueued == len(lost)
    await worker.drain()
    assert (await reindex_qdrant(runtime, ReindexInput(mode="missing"), silent)).notes_to_enqueue == 0


async def test_stale_mode_enqueues_only_notes_with_outdated_embeddings(db: EngramDB, runtime: Runtime) -> None:
    stale = {
        r[0]
        for r in await fetch(
            db, ELIGIBLE + " AND (n.embed_hash IS NULL OR n.embed_hash <> n.content_hash) "
            "AND n.id NOT IN (" + PENDING + ")",
        )
    }
    max_seed_job = await scalar(db, "SELECT max(id) FROM oban_jobs")
    result = await reindex_qdrant(runtime, ReindexInput(mode="stale", confirm=True), silent)
    assert result.enqueued == len(stale) > 0
    new = {uuid.UUID(json.loads(r[0])["note_id"]) for r in await fetch(
        db, "SELECT args FROM oban_jobs WHERE id > $1 AND queue = 'embed'", max_seed_job)}  # fmt: skip
    assert new == stale


async def test_scope_by_vault_touches_only_that_vault(db: EngramDB, runtime: Runtime) -> None:
    user = db.report.user_ids[0]
    vault = db.report.vault_ids[user][0]
    max_id = await scalar(db, "SELECT max(id) FROM oban_jobs")
    result = await reindex_qdrant(
        runtime, ReindexInput(mode="all", user_id=str(user), vault_id=str(vault), confirm=True), silent
    )
    touched = await fetch(
        db, "SELECT DISTINCT n.vault_id FROM oban_jobs j JOIN notes n ON n.id = (j.args->>'note_id')::uuid "
        "WHERE j.id > $1", max_id,
    )
    assert result.enqueued > 0 and {r[0] for r in touched} == {vault}
    assert {v.vault_id for v in result.per_vault} == {str(vault)}


async def test_per_tenant_mode_under_row_level_security(
    db: EngramDB, settings_for: Callable[..., Settings]
) -> None:
    eligible = {r[0] for r in await fetch(db, ELIGIBLE)}
    queued = {r[0] for r in await fetch(db, PENDING)}
    settings = settings_for(db, DATABASE_URL=db.role_dsn(testbed.OWNER_ROLE), EMBED_DIMS=str(DIMS))
    rt = Runtime(settings)
    try:
        plan = await reindex_qdrant(rt, ReindexInput(mode="all"), silent)
        result = await reindex_qdrant(rt, ReindexInput(mode="all", confirm=True), silent)
    finally:
        await rt.aclose()
    assert plan.rls_mode == result.rls_mode == "per_tenant"
    assert "row-level security" in result.rls_explanation
    assert plan.notes_to_enqueue == result.enqueued == len(eligible - queued)
    assert set(await embed_jobs_per_note(db)) == eligible | queued


async def test_notify_wakes_a_listener_on_obans_insert_channel(db: EngramDB, runtime: Runtime) -> None:
    listener = await asyncpg.connect(db.dsn)
    received: list[tuple[str, object]] = []
    got = anyio.Event()

    def on_notify(_conn: object, _pid: int, channel: str, payload: object) -> None:
        received.append((channel, payload))
        got.set()

    await listener.add_listener("public.oban_insert", on_notify)
    try:
        await reindex_qdrant(runtime, ReindexInput(mode="all", confirm=True), silent)
        with anyio.fail_after(5):
            await got.wait()
    finally:
        await listener.close()
    assert received[0] == ("public.oban_insert", '{"queue":"embed"}')


BAD_INPUT = [
    ({"user_id": "not-a-uuid"}, "is not a uuid"),
    ({"vault_id": "42"}, "is not a uuid"),
    ({"user_id": str(uuid.uuid4())}, "no user with id"),
    ({"vault_id": str(uuid.uuid4())}, "no vault with id"),
    ({"collection": "somebody_elses"}, "is not the configured QDRANT_COLLECTION"),
]


async def test_bad_input_is_refused_and_changes_nothing(db: EngramDB, runtime: Runtime) -> None:
    state = "SELECT (SELECT count(*) FROM oban_jobs), (SELECT count(*) FROM notes WHERE embed_hash IS NULL)"
    before = await fetch(db, state)
    other_user, mine = db.report.user_ids[1], db.report.user_ids[0]
    cases = [*BAD_INPUT, ({"user_id": str(other_user), "vault_id": str(db.report.vault_ids[mine][0])}, "another user")]
    for arguments, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            params = ReindexInput.model_validate({"mode": "all", "confirm": True, **arguments})
            await reindex_qdrant(runtime, params, silent)
    assert await fetch(db, state) == before


async def test_database_without_oban_or_with_unknown_oban_version_is_refused(db: EngramDB, runtime: Runtime) -> None:
    nulls = await scalar(db, "SELECT count(*) FROM notes WHERE embed_hash IS NULL")
    await fetch(db, "COMMENT ON TABLE oban_jobs IS '99'")
    with pytest.raises(ConfigurationError, match="Oban migration version 99"):
        await reindex_qdrant(runtime, ReindexInput(mode="all", confirm=True), silent)
    await fetch(db, "DROP TABLE oban_jobs")
    with pytest.raises(ConfigurationError, match="no oban_jobs table"):
        await reindex_qdrant(runtime, ReindexInput(mode="all", confirm=True), silent)
    assert await scalar(db, "SELECT count(*) FROM notes WHERE embed_hash IS NULL") == nulls


async def test_a_run_killed_mid_batch_leaves_whole_batches_and_a_rerun_finishes(
    db: EngramDB, runtime: Runtime, admin_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 10
    monkeypatch.setattr(tool, "POLICY", BatchPolicy(initial=size, minimum=size, maximum=size))
    await fetch(db, "DELETE FROM oban_jobs WHERE worker = 'Engram.Workers.EmbedNote'")
    all_ids = sorted(r[0] for r in await fetch(db, "SELECT id FROM notes"))
    eligible = {r[0] for r in await fetch(db, ELIGIBLE)}
    third = sorted(set(all_ids[2 * size : 3 * size]) & eligible)
    nulls_before = {r[0] for r in await fetch(db, "SELECT id FROM notes WHERE embed_hash IS NULL")}
    blocker = await asyncpg.connect(db.dsn)
    blocker_tx = blocker.transaction()
    killer = await asyncpg.connect(db.dsn)
    batches = 0

    async def kill_when_blocked() -> None:
        with anyio.fail_after(10):
            while True:
                pid = await killer.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE 'UPDATE%'"
                )
                if pid:
                    await killer.execute("SELECT pg_terminate_backend($1)", pid)
                    return
                await anyio.sleep(0.02)

    async def progress(done: float, total: float | None = None, message: str | None = None) -> None:
        nonlocal batches
        if message and message.startswith("batch"):
            batches += 1
            if batches == 2:
                # Lock a note of the third batch: its UPDATE blocks midway, and is killed there.
                await blocker_tx.start()
                await blocker.execute("SELECT 1 FROM notes WHERE id = $1 FOR UPDATE", third[-1])

    errors: list[StoreUnreachable] = []

    async def run() -> None:
        try:
            await reindex_qdrant(runtime, ReindexInput(mode="all", confirm=True), progress)
        except StoreUnreachable as exc:
            errors.append(exc)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            tg.start_soon(kill_when_blocked)
    finally:
        await blocker_tx.rollback()
        await blocker.close()
        await killer.close()
    assert errors and "run reindex_qdrant again" in str(errors[0])
    first_two = set(all_ids[: 2 * size]) & eligible
    jobs = await embed_jobs_per_note(db)
    assert set(jobs) == first_two  # the third batch left nothing behind
    nulls_after = {r[0] for r in await fetch(db, "SELECT id FROM notes WHERE embed_hash IS NULL")}
    assert nulls_after == nulls_before | first_two
    result = await reindex_qdrant(runtime, ReindexInput(mode="all", confirm=True), silent)
    assert result.enqueued == len(eligible - first_two)
    jobs = await embed_jobs_per_note(db)
    assert set(jobs) == eligible and all(n == 1 for n in jobs.values())


async def test_concurrent_runs_never_enqueue_a_note_twice(
    db: EngramDB, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tool, "POLICY", BatchPolicy(initial=7, minimum=7, maximum=7))
    eligible = {r[0] for r in await fetch(db, ELIGIBLE)}
    queued = {r[0] for r in await fetch(db, PENDING)}
    jobs_before = await embed_jobs_per_note(db)
    results = []

    refused: list[Busy] = []

    async def one() -> None:
        rt = Runtime(settings)
        try:
            results.append(await reindex_qdrant(rt, ReindexInput(mode="all", confirm=True), silent))
        except Busy as exc:  # the second of two overlapping runs is refused (see the test below)
            refused.append(exc)
        finally:
            await rt.aclose()

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        tg.start_soon(one)
    assert len(results) + len(refused) == 2 and results
    assert sum(r.enqueued for r in results) == len(eligible - queued)
    assert await embed_jobs_per_note(db) == jobs_before | dict.fromkeys(eligible - queued, 1)


async def test_a_second_confirmed_run_is_refused_as_busy_naming_the_other_and_dry_runs_stay_allowed(
    db: EngramDB, runtime: Runtime
) -> None:
    jobs_before = await embed_jobs_per_note(db)
    async with database_lock(db.dsn, REINDEX):
        with pytest.raises(Busy) as refused:
            await reindex_qdrant(runtime, ReindexInput(mode="all", confirm=True), silent)
        dry = await reindex_qdrant(runtime, ReindexInput(mode="all"), silent)
    assert "another confirmed reindex_qdrant of this database is running" in refused.value.message
    assert "engram-recovery reindex_qdrant (pid " in refused.value.message and "dry run" in refused.value.hint
    assert dry.dry_run and dry.notes_to_enqueue > 0
    assert await embed_jobs_per_note(db) == jobs_before
    # Released with its holder: the next confirmed run proceeds.
    assert (await reindex_qdrant(runtime, ReindexInput(mode="all", confirm=True), silent)).enqueued > 0


async def test_recreate_collection_and_orphan_cleanup(db: EngramDB, runtime: Runtime) -> None:
    worker = worker_for(db, runtime)
    client = runtime.qdrant()
    name = runtime.settings.qdrant_collection
    await qdrant.recreate_collection(client, name, 3)  # a wrong dimension, as after a model change
    plan = await reindex_qdrant(runtime, ReindexInput(mode="all", recreate_collection=True), silent)
    assert plan.collection_recreated is False and (await qdrant.collection_state(client, name)).dense_size == 3
    result = await reindex_qdrant(runtime, ReindexInput(mode="missing", recreate_collection=True, confirm=True), silent)
    state = await qdrant.collection_state(client, name)
    assert result.collection_recreated and state.dense_size == DIMS and state.sparse == (qdrant.SPARSE_VECTOR,)
    assert state.dense_distance == "Cosine"
    await worker.drain()
    # Points no chunk row references: the ones of a note that was then purged.
    victim = next(note for _, note, outcome in worker.executed if outcome == "embedded")
    gone = [r[0] for r in await fetch(db, "SELECT qdrant_point_id::text FROM chunks WHERE note_id = $1", victim)]
    await fetch(db, "DELETE FROM notes WHERE id = $1", victim)
    dry = await reindex_qdrant(runtime, ReindexInput(mode="stale", delete_orphans=True), silent)
    assert dry.orphan_points == len(gone) and dry.orphan_points_deleted == 0
    done = await reindex_qdrant(runtime, ReindexInput(mode="stale", delete_orphans=True, confirm=True), silent)
    assert done.orphan_points_deleted == len(gone)
    assert await qdrant.existing_point_ids(client, name, gone) == set()
    assert (await client.count(name, exact=True)).count == await scalar(db, LIVE_CHUNKS)


async def test_through_the_mcp_client_with_progress_per_batch(
    db: EngramDB, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engram_recovery.server.app import build_server

    monkeypatch.setattr(tool, "POLICY", BatchPolicy(initial=20, minimum=20, maximum=20))
    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    async with Client(build_server(settings)) as client:
        dry = await client.call_tool("reindex_qdrant", {"mode": "all"})
        assert not dry.is_error and dry.structured_content is not None
        assert dry.structured_content["dry_run"] is True
        done = await client.call_tool(
            "reindex_qdrant", {"mode": "all", "confirm": True}, progress_callback=on_progress
        )
        bad = await client.call_tool("reindex_qdrant", {"vault_id": "nope"})
    assert not done.is_error and done.structured_content is not None
    assert done.structured_content["enqueued"] == dry.structured_content["notes_to_enqueue"] > 0
    assert len([m for m in messages if m.startswith("batch")]) == done.structured_content["batches"] > 1
    assert bad.is_error and "is not a uuid" in str(bad.content)


async def test_backup_status_reports_the_embedding_backlog(db: EngramDB, runtime: Runtime, tmp_path: Path) -> None:
    from engram_recovery.tools.backup_status import BackupStatusInput, backup_status

    await reindex_qdrant(runtime, ReindexInput(mode="all", recreate_collection=True, confirm=True), silent)
    status = await backup_status(runtime, BackupStatusInput(), silent)
    oban = next(c for c in status.checks if c.component == "oban")
    pending = await scalar(
        db, "SELECT count(*) FROM oban_jobs WHERE worker = 'Engram.Workers.EmbedNote' "
        "AND state IN ('available', 'scheduled', 'executing', 'retryable', 'suspended')"
    )
    assert oban.details["embed_backlog"] == pending > 50
    assert f"EmbedNote backlog {pending}" in oban.summary and "rebuild drains here" in oban.summary
    # Qdrant is empty beside the chunks, and the notes are waiting: a rebuild is draining, not a new loss.
    vectors = next(c for c in status.checks if c.component == "qdrant")
    assert vectors.status == "warn" and "waiting for embedding" in vectors.summary
