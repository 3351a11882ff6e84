"""backup_status latency on a 1,000,000-note Engram database, server already running.

Peers, measured in the same run on the same database:
- the naive way to answer the same questions: exact counts (`deep=true`, which
  also counts every row and stale note exactly),
- a bare `SELECT count(*) FROM notes` (what a status query without estimates pays
  before it has answered anything else).

Usage: .venv/bin/python bench/bench_status.py [--notes 1000000] [--calls 30]
The seeded database (engram_bench_status) is kept between runs; --reseed rebuilds it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import time
from pathlib import Path

import anyio
import asyncpg
from mcp import Client

from engram_recovery import testbed
from engram_recovery.core.engram import crypto as engram_crypto
from engram_recovery.core.settings import load_settings
from engram_recovery.server.app import build_server

ADMIN = os.environ.get("ENGRAM_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DB = "engram_bench_status"
STATE = Path(".bench")


async def ensure_database(notes: int, reseed: bool) -> tuple[str, bytes]:
    key_file = STATE / f"{DB}.key"
    dsn = testbed.dsn_for(ADMIN, DB)
    admin = await asyncpg.connect(ADMIN)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DB)
        if exists and key_file.exists() and not reseed:
            return dsn, bytes.fromhex(key_file.read_text())
        await admin.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{DB}"')
    finally:
        await admin.close()
    key = secrets.token_bytes(32)
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        await testbed.create_engram_schema(conn)
        await testbed.create_roles(conn, DB)
        await testbed.seed(conn, master_key=key, users=50, vaults_per_user=2, notes=notes, attachments=2000,
                           note_size=300, attachment_size=2048)
        await conn.execute("VACUUM ANALYZE")
        print(f"seeded {notes} notes in {time.perf_counter() - started:.0f} s")
    finally:
        await conn.close()
    key_file.write_text(key.hex())
    return dsn, key


async def timed_calls(client: Client, calls: int, deep: bool) -> list[float]:
    samples: list[float] = []
    for _ in range(calls):
        started = time.perf_counter()
        result = await client.call_tool("backup_status", {"deep": deep})
        samples.append(time.perf_counter() - started)
        assert not result.is_error, result.content
    return samples


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--notes", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--reseed", action="store_true")
    args = parser.parse_args()
    dsn, key = await ensure_database(args.notes, args.reseed)
    conn = await asyncpg.connect(dsn)
    try:
        notes = await conn.fetchval("SELECT count(*) FROM notes")
        count_samples: list[float] = []
        for _ in range(5):
            started = time.perf_counter()
            await conn.fetchval("SELECT count(*) FROM notes")
            count_samples.append(time.perf_counter() - started)
    finally:
        await conn.close()
    settings = load_settings(environ={
        "PATH": os.environ.get("PATH", ""), "DATABASE_URL": dsn,
        "ENCRYPTION_MASTER_KEY": engram_crypto.encode_master_key(key),
        "ENGRAM_RECOVERY_REPOSITORY": str(STATE / "status-repo"), "ENGRAM_RECOVERY_QDRANT_PATH": ":memory:",
        "ENGRAM_RECOVERY_KEY_ESCROW": "a,b",
    })
    async with Client(build_server(settings)) as client:
        await timed_calls(client, 2, deep=False)  # warm the pool and pg_dump --version cache: "already running"
        fast = await timed_calls(client, args.calls, deep=False)
        deep = await timed_calls(client, 3, deep=True)
    p50, p95 = statistics.median(fast), pct(fast, 0.95)
    deep50 = statistics.median(deep)
    count50 = statistics.median(count_samples)
    print(f"notes in database:                 {notes}")
    print(f"backup_status p50 / p95:           {p50 * 1000:.0f} ms / {p95 * 1000:.0f} ms  (target p50 < 1000 ms)")
    print(f"peer: backup_status deep=true p50: {deep50 * 1000:.0f} ms   ratio ours/peer = {p50 / deep50:.3f}")
    print(f"peer: SELECT count(*) FROM notes:  {count50 * 1000:.0f} ms   ratio ours/peer = {p50 / count50:.3f}")


if __name__ == "__main__":
    STATE.mkdir(exist_ok=True)
    anyio.run(main)
