"""reindex_qdrant (mode=all) on a 1,000,000-note Engram database, beside its floor and the per-note loop.

Measured in the same run, on the same database, from the same state:
- floor: the two bare set-based statements (one UPDATE of every eligible note, one
  INSERT ... SELECT of their jobs), in one transaction, nothing else;
- ours: the full tool run (probe, batches sized by time, dedup, notify, backlog), in a
  child process so its peak RSS is its own;
- per-note: one transaction per note in Oban.insert's unique style (advisory lock,
  unique look-up, update, insert), on a sample, extrapolated as jobs/s.
Between runs the inserted jobs are deleted, embed state restored and both tables vacuumed.
oban_jobs first gets 1,000,000 completed EmbedNote jobs (history) and is ANALYZEd then,
with autovacuum off, so every run works with statistics that no longer describe the table:
later batches run with oban_jobs at ~2M rows and must stay as fast as the first ones.

Usage: .venv/bin/python bench/bench_reindex.py [--rounds 2] [--sample 5000] [--db engram_bench_1m]
The database is reused if it exists (seeding 1M notes takes minutes); it is cloned from
engram_bench_status when that exists, else seeded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import secrets
import statistics
import subprocess
import sys
import time

import anyio
import asyncpg

from engram_recovery import testbed

ADMIN = os.environ.get("ENGRAM_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
WORKER = "Engram.Workers.EmbedNote"
ELIGIBLE = (
    "n.deleted_at IS NULL AND n.kind = 'note' AND EXISTS (SELECT 1 FROM vaults v "
    "WHERE v.id = n.vault_id AND v.deleted_at IS NULL)"
)
JOB_COLUMNS = "(state, queue, worker, args, meta, tags, errors, attempt, max_attempts, priority)"
JOB_VALUES = "'available', 'embed', '" + WORKER + "', jsonb_build_object('note_id', {id}::text), '{{}}'::jsonb, " \
    "'{{}}'::text[], '{{}}'::jsonb[], 0, 5, 9"


async def ensure_database(name: str, notes: int) -> str:
    admin = await asyncpg.connect(ADMIN)
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            clone = notes == 1_000_000
            if clone and await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = 'engram_bench_status'"):
                await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE engram_bench_status')
            else:
                await admin.execute(f'CREATE DATABASE "{name}"')
                conn = await asyncpg.connect(testbed.dsn_for(ADMIN, name))
                try:
                    await testbed.create_engram_schema(conn)
                    await testbed.create_roles(conn, name)
                    await testbed.seed(conn, master_key=secrets.token_bytes(32), users=50, vaults_per_user=2,
                                       notes=notes, attachments=0, note_size=300)  # fmt: skip
                finally:
                    await conn.close()
    finally:
        await admin.close()
    return testbed.dsn_for(ADMIN, name)


async def prepare(conn: asyncpg.Connection, history: int) -> int:
    """Save the embed state once, add job history, make statistics stale; returns the last history job id."""
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS bench_reindex_saved AS "
        "SELECT id, embed_hash, embed_retry_after, dense_indexed_hash FROM notes"
    )
    keyed = "SELECT 1 FROM pg_constraint WHERE conrelid = 'bench_reindex_saved'::regclass AND contype = 'p'"
    if not await conn.fetchval(keyed):
        await conn.execute("ALTER TABLE bench_reindex_saved ADD PRIMARY KEY (id)")
    have = await conn.fetchval("SELECT count(*) FROM oban_jobs WHERE state = 'completed' AND queue = 'embed'")
    if have < history:
        await conn.execute(
            "INSERT INTO oban_jobs (state, queue, worker, args, attempt, max_attempts, priority, attempted_at, "
            "completed_at) SELECT 'completed', 'embed', $1, jsonb_build_object('note_id', gen_random_uuid()::text), "
            "1, 5, 9, timezone('UTC', now()), timezone('UTC', now()) FROM generate_series(1, $2)",
            WORKER, history - have,
        )
    for table in ("notes", "oban_jobs"):
        await conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
    await conn.execute("VACUUM ANALYZE oban_jobs")
    # Runs only ever add 'available' jobs after the history, so this boundary survives a crashed run.
    return int(await conn.fetchval("SELECT max(id) FROM oban_jobs WHERE state = 'completed' AND queue = 'embed'"))


async def reset(conn: asyncpg.Connection, last_history_id: int, *, restore: bool = False) -> None:
    """Delete the jobs the previous run inserted; restore the embed state only when asked.

    Every run rewrites every eligible note's embed columns whatever they hold, so the
    work of a run does not depend on the restore; restoring 900k rows costs as much as a
    run, so it is done once at the end. The jobs must go (the tool would skip their notes)
    and oban_jobs is vacuumed so its note_id index holds no dead entries. notes is left
    unvacuumed between runs (as long as a run); the order alternates per round, so each
    side meets the bloat of the other once.
    """
    await conn.execute("DELETE FROM oban_jobs WHERE id > $1", last_history_id)
    if restore:
        await conn.execute(
            "UPDATE notes n SET embed_hash = s.embed_hash, embed_retry_after = s.embed_retry_after, "
            "dense_indexed_hash = s.dense_indexed_hash FROM bench_reindex_saved s WHERE s.id = n.id "
            "AND (n.embed_hash IS DISTINCT FROM s.embed_hash OR n.embed_retry_after IS DISTINCT FROM "
            "s.embed_retry_after OR n.dense_indexed_hash IS DISTINCT FROM s.dense_indexed_hash)"
        )
        await conn.execute("VACUUM notes")
    # Vacuum without ANALYZE: the stale oban_jobs statistics are part of the setting.
    await conn.execute("VACUUM oban_jobs")
    await conn.execute("CHECKPOINT")


async def floor(conn: asyncpg.Connection) -> tuple[float, int]:
    started = time.perf_counter()
    async with conn.transaction():
        await conn.execute(
            "UPDATE notes n SET embed_hash = NULL, embed_retry_after = NULL, dense_indexed_hash = NULL "
            f"WHERE {ELIGIBLE}"
        )
        status = await conn.execute(
            f"INSERT INTO oban_jobs {JOB_COLUMNS} SELECT {JOB_VALUES.format(id='n.id')} FROM notes n WHERE {ELIGIBLE}"
        )
    return time.perf_counter() - started, int(status.split()[-1])


def ours(dsn: str) -> dict[str, object]:
    """The full tool run in a child process; its peak RSS is measured from here."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", dsn], check=True, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall"] = elapsed
    # The largest peak of any child so far: every child is this same run.
    result["rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


async def child(dsn: str) -> None:
    from engram_recovery.core.runtime import Runtime
    from engram_recovery.core.settings import load_settings
    from engram_recovery.tools.reindex_qdrant import ReindexInput, reindex_qdrant

    settings = load_settings(environ={"PATH": os.environ.get("PATH", ""), "DATABASE_URL": dsn,
                                      "ENGRAM_RECOVERY_REPOSITORY": "/tmp/bench-reindex-repo"})  # fmt: skip
    runtime = Runtime(settings)
    # What the imports alone cost (mcp, qdrant-client, pydantic...): a running server has paid it already.
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    batches: list[tuple[int, float]] = []
    pattern = re.compile(r"batch \d+: (\d+) EmbedNote job\(s\) enqueued in ([0-9.]+) s")

    async def progress(done: float, total: float | None = None, message: str | None = None) -> None:
        if message and (m := pattern.match(message)):
            batches.append((int(m[1]), float(m[2])))

    try:
        result = await reindex_qdrant(runtime, ReindexInput(mode="all", confirm=True), progress)
    finally:
        await runtime.aclose()
    print(json.dumps({"enqueued": result.enqueued, "seconds": result.seconds, "batches": batches,
                      "max_batch": result.max_batch_seconds, "rls": result.rls_mode, "rss_before": rss_before,
                      "analyzed": result.oban_statistics_refreshed}))  # fmt: skip


async def per_note(conn: asyncpg.Connection, sample: int) -> tuple[float, int]:
    """What the documented loop costs: Oban.insert with unique, one transaction per note."""
    ids = [r[0] for r in await conn.fetch(f"SELECT n.id FROM notes n WHERE {ELIGIBLE} LIMIT $1", sample)]
    # Oban runs its unique look-up as an unnamed statement (always a custom plan); a cached
    # generic plan for `args @> $2` walks the whole table and would make this peer unfairly slow.
    await conn.execute("SET plan_cache_mode = force_custom_plan")
    started = time.perf_counter()
    for note_id in ids:
        async with conn.transaction():
            await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", hash(("embed", str(note_id))) % 2**62)
            await conn.fetchval(
                "SELECT id FROM oban_jobs WHERE state IN ('available', 'scheduled', 'executing', 'retryable', "
                "'suspended') AND queue = 'embed' AND worker = $1 AND args @> $2::jsonb LIMIT 1",
                WORKER, json.dumps({"note_id": str(note_id)}),
            )
            await conn.execute(
                "UPDATE notes SET embed_hash = NULL, embed_retry_after = NULL, dense_indexed_hash = NULL "
                "WHERE id = $1", note_id,
            )
            await conn.execute(f"INSERT INTO oban_jobs {JOB_COLUMNS} VALUES ({JOB_VALUES.format(id='$1::uuid')})",
                               note_id)  # fmt: skip
    elapsed = time.perf_counter() - started
    await conn.execute("RESET plan_cache_mode")
    return elapsed, len(ids)


async def dry_run_seconds(dsn: str) -> float:
    from engram_recovery.core.progress import silent
    from engram_recovery.core.runtime import Runtime
    from engram_recovery.core.settings import load_settings
    from engram_recovery.tools.reindex_qdrant import ReindexInput, reindex_qdrant

    runtime = Runtime(load_settings(environ={"PATH": os.environ.get("PATH", ""), "DATABASE_URL": dsn,
                                             "ENGRAM_RECOVERY_REPOSITORY": "/tmp/bench-reindex-repo"}))  # fmt: skip
    try:
        started = time.perf_counter()
        result = await reindex_qdrant(runtime, ReindexInput(mode="all"), silent)
        elapsed = time.perf_counter() - started
    finally:
        await runtime.aclose()
    assert result.notes_to_enqueue > 0
    return elapsed


def early_late(batches: list[list[float]]) -> tuple[float, float]:
    """Median batch throughput over the first and the last 20% of a run's jobs."""
    early: list[float] = []
    late: list[float] = []
    total, done = sum(b[0] for b in batches), 0.0
    for jobs, secs in batches:
        if done < total * 0.2:
            early.append(jobs / secs)
        elif done >= total * 0.8:
            late.append(jobs / secs)
        done += jobs
    return statistics.median(early), statistics.median(late)


def report_run(round_no: int, run: dict[str, object], last: int) -> None:
    batches: list[list[float]] = run["batches"]  # type: ignore[assignment]
    early, late = early_late(batches)
    print(f"round {round_no}: ours {run['seconds']} s in the tool ({float(run['wall']):.1f} s child wall), "  # type: ignore[arg-type]
          f"{len(batches)} batches, max batch {run['max_batch']} s, {run['analyzed']} ANALYZEs, "
          f"jobs/s per batch first 20% {early:.0f} / last 20% {late:.0f}, peak RSS {float(run['rss_mib']):.0f} MiB "  # type: ignore[arg-type]
          f"({float(run['rss_before']):.0f} before the run)", flush=True)  # type: ignore[arg-type]  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", default="engram_bench_1m")
    parser.add_argument("--notes", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sample", type=int, default=5000)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        await child(args.child)
        return
    dsn = await ensure_database(args.db, args.notes)
    conn = await asyncpg.connect(dsn, command_timeout=None)
    try:
        last = await prepare(conn, args.history)
        notes = await conn.fetchval("SELECT count(*) FROM notes")
        eligible = await conn.fetchval(f"SELECT count(*) FROM notes n WHERE {ELIGIBLE}")
        # Seeded incomplete EmbedNote jobs (kept across runs): the tool skips their notes, the floor does not.
        queued = await conn.fetchval(
            f"SELECT count(*) FROM notes n WHERE {ELIGIBLE} AND EXISTS (SELECT 1 FROM oban_jobs j WHERE "
            "j.id <= $1 AND j.worker = $2 AND j.state IN ('available', 'scheduled', 'executing', 'retryable') "
            "AND j.args->>'note_id' = n.id::text)", last, WORKER,
        )
        print(f"notes {notes}, eligible {eligible}, oban_jobs history {last} (statistics taken before any run)")
        floors: list[float] = []
        runs: list[dict[str, object]] = []
        dry: list[float] = []
        await reset(conn, last)
        dry.append(await dry_run_seconds(dsn))
        for round_no in range(args.rounds):
            # Alternate the order: the second of a pair runs on a notes table the first one bloated.
            for side in ("floor", "ours") if round_no % 2 == 0 else ("ours", "floor"):
                if side == "floor":
                    seconds, inserted = await floor(conn)
                    assert inserted == eligible, (inserted, eligible)
                    floors.append(seconds)
                    print(f"round {round_no + 1}: floor {seconds:.1f} s for {inserted} jobs", flush=True)
                else:
                    run = ours(dsn)
                    assert run["enqueued"] == eligible - queued, (run["enqueued"], eligible, queued)
                    runs.append(run)
                    report_run(round_no + 1, run, last)
                await reset(conn, last)
            dry.append(await dry_run_seconds(dsn))
        loop_seconds, loop_jobs = await per_note(conn, args.sample)
        print(f"per-note loop: {loop_jobs} notes in {loop_seconds:.1f} s", flush=True)
        await conn.execute("DELETE FROM oban_jobs WHERE id > $1", last)
    finally:
        await conn.close()

    # The tool's own time, as a running server spends it; the child's wall adds interpreter start and imports.
    ours_wall = statistics.median(float(r["seconds"]) for r in runs)  # type: ignore[arg-type]
    wall = statistics.median(float(r["wall"]) for r in runs)  # type: ignore[arg-type]
    rss_imports = max(float(r["rss_before"]) for r in runs)  # type: ignore[arg-type]
    floor_s = statistics.median(floors)
    loop_rate = loop_jobs / loop_seconds
    ours_rate = eligible / ours_wall
    max_batch = max(float(r["max_batch"]) for r in runs)  # type: ignore[arg-type]
    rss = max(float(r["rss_mib"]) for r in runs)  # type: ignore[arg-type]
    pairs = [early_late(r["batches"]) for r in runs]  # type: ignore[arg-type]
    early = [p[0] for p in pairs]
    late = [p[1] for p in pairs]
    print(f"\nmachine: {os.cpu_count()} cores, python {sys.version.split()[0]}, {os.uname().machine}")
    print(f"eligible notes / jobs per run:         {eligible}")
    print(f"floor (2 bare statements), median:     {floor_s:.1f} s   (runs: {', '.join(f'{f:.1f}' for f in floors)})")
    walls = ", ".join(f"{float(r['seconds']):.1f}" for r in runs)  # type: ignore[arg-type]
    print(f"ours (full run, mode=all), median:     {ours_wall:.1f} s   (runs: {walls})   "
          f"ratio ours/floor = {ours_wall / floor_s:.2f}  (target <= 1.25)")  # fmt: skip
    print(f"  same, child process wall incl. start: {wall:.1f} s   ratio = {wall / floor_s:.2f}")
    print(f"  ANALYZEs of oban_jobs per run:        {', '.join(str(r['analyzed']) for r in runs)}")
    print(f"ours jobs/s:                           {ours_rate:.0f}")
    print(f"per-note Oban.insert loop jobs/s:      {loop_rate:.0f}  ({loop_jobs} notes in {loop_seconds:.1f} s)"
          f"   ratio ours/loop = {ours_rate / loop_rate:.1f}x  (target >= 20x)")  # fmt: skip
    print(f"max transaction (batch) seconds:       {max_batch:.2f}  (target <= ~1 s)")
    print(f"batch jobs/s, first 20% of jobs:       {statistics.median(early):.0f}  (oban_jobs ~{last // 1000}k rows)")
    print(f"batch jobs/s, last 20% of jobs:        {statistics.median(late):.0f}  (oban_jobs >= "
          f"{(last + int(eligible * 0.8)) // 1000}k rows, statistics from before the run)  "
          f"ratio late/early = {statistics.median(late) / statistics.median(early):.2f}")  # fmt: skip
    print(f"peak RSS of the run (child process):   {rss:.0f} MiB  (target < 150; {rss_imports:.0f} MiB of it "
          "before the first query: interpreter and imports)")  # fmt: skip
    print(f"dry-run count (mode=all), median:      {statistics.median(dry):.2f} s  (target < 3 s)")

    conn = await asyncpg.connect(dsn, command_timeout=None)
    try:
        await reset(conn, last, restore=True)  # leave the database as it was seeded
    finally:
        await conn.close()


if __name__ == "__main__":
    anyio.run(main)
