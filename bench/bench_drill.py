"""Benchmark: restore_drill's restore step beside `pg_restore --jobs=2` of the same dump.

    .venv/bin/python bench/bench_drill.py [--notes 200000] [--attachments 2000] [--attachment-kib 256] [--runs 3]

Seeds an Engram-shaped database (testbed) to about 1 GiB with the defaults,
backs it up with run_backup (custom format, zstd, encrypted), then in each run:

* peer: `pg_restore --jobs=2 --exit-on-error -d <fresh db> <dump>` (the bundled client
  the drill itself chooses) of the dump already decrypted to a plain file (what an
  operator runs after `decrypt`); the one-off decrypt is timed separately and not
  counted. Target (issue 13): the drill's restore step <= 1.1x it;
* ours: restore_drill, whose RTO is verify (SHA-256 of the artifact) + create
  database + the restore engine of core/restore/database.py (rows loaded while
  the artifact decrypts, post-data with --jobs=2); its total also includes the
  proofs (the engine's schema check among them) and the drop.

The server: ENGRAM_BENCH_ADMIN_URL, else a throwaway bundled PostgreSQL 18 cluster
(the version Engram runs). The order alternates between runs. Prints every figure,
the medians and the ratios ours/peer (1.0 = no overhead over the bare restore).
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import asyncpg
from _common import admin_url

from engram_recovery import testbed
from engram_recovery.core.artifact import extract as backup_extract
from engram_recovery.core.engram import crypto as engram_crypto
from engram_recovery.core.progress import silent
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores.pgclient.versions import bundled
from engram_recovery.tools.restore_drill import RestoreDrillInput, restore_drill
from engram_recovery.tools.run_backup import RunBackupInput, run_backup

ADMIN = ""
PG_RESTORE = bundled("pg_restore") or "pg_restore"


async def seed(dsn: str, name: str, key: bytes, args: argparse.Namespace) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        await testbed.create_engram_schema(conn, variant="0.18.1")
        await testbed.create_roles(conn, name)
        await testbed.seed(conn, master_key=key, users=20, vaults_per_user=3, notes=args.notes,
                           attachments=args.attachments, attachment_size=args.attachment_kib * 1024)  # fmt: skip
        await conn.execute("VACUUM ANALYZE")
        return int(await conn.fetchval("SELECT pg_database_size(current_database())"))
    finally:
        await conn.close()


async def bare_pg_restore(dump: Path) -> float:
    async with testbed.scratch_database(ADMIN, prefix="bench_peer") as target:
        started = time.perf_counter()
        done = await anyio.run_process(
            [PG_RESTORE, "--no-password", "--exit-on-error", "--jobs=2", f"--dbname={target}", str(dump)],
            check=False)  # fmt: skip
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"pg_restore failed: {done.stderr.decode()[-2000:]}")
    return elapsed


async def ours(env: dict[str, str]) -> tuple[float, float, float]:
    runtime = Runtime(load_settings(environ=env))
    try:
        result = await restore_drill(runtime, RestoreDrillInput(), silent)
    finally:
        await runtime.aclose()
    if result.verdict != "ok" or result.rto_seconds is None:
        raise SystemExit(f"drill failed: {result.summary}")
    print("  drill steps: " + ", ".join(f"{s.name} {s.seconds:.1f} s" for s in result.steps))
    restore = next(s.seconds for s in result.steps if s.name == "restore")
    return restore, result.rto_seconds, result.total_seconds


async def main_async(args: argparse.Namespace) -> int:
    key = secrets.token_bytes(32)
    backup_key = base64.b64encode(secrets.token_bytes(32)).decode()
    with tempfile.TemporaryDirectory(prefix="bench-drill-") as tmp:
        async with testbed.scratch_database(ADMIN, prefix="bench_drill_src") as dsn:
            name = dsn.rsplit("/", 1)[-1]
            t0 = time.perf_counter()
            size = await seed(dsn, name, key, args)
            print(f"seeded {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s")
            env = {"DATABASE_URL": dsn, "ENCRYPTION_MASTER_KEY": engram_crypto.encode_master_key(key),
                   "ENGRAM_RECOVERY_REPOSITORY": str(Path(tmp) / "repo"), "ENGRAM_RECOVERY_BACKUP_KEY": backup_key,
                   "ENGRAM_RECOVERY_QDRANT_PATH": ":memory:", "PATH": os.environ.get("PATH", "")}  # fmt: skip
            runtime = Runtime(load_settings(environ=env))
            try:
                backup = await run_backup(runtime, RunBackupInput(), silent)
            finally:
                await runtime.aclose()
            stored = sum(a.size for a in backup.artifacts)
            print(f"backup {backup.backup_id}: {stored / 2**20:.0f} MiB stored")
            t0 = time.perf_counter()
            dump = Path(tmp) / "db.dump"
            repo_file = next((Path(tmp) / "repo" / "backups" / str(backup.backup_id)).glob("db.dump*"))
            await backup_extract.extract(backup_extract.file_chunks(repo_file), base64.b64decode(backup_key), dump)
            print(f"one-off decrypt to a plain file (not counted for the peer): {time.perf_counter() - t0:.1f} s, "
                  f"{dump.stat().st_size / 2**20:.0f} MiB")
            peer_times: list[float] = []
            step_times: list[float] = []
            rto_times: list[float] = []
            total_times: list[float] = []
            for run in range(args.runs):
                if run % 2 == 0:
                    step, rto, total = await ours(env)
                    peer = await bare_pg_restore(dump)
                else:
                    peer = await bare_pg_restore(dump)
                    step, rto, total = await ours(env)
                peer_times.append(peer)
                step_times.append(step)
                rto_times.append(rto)
                total_times.append(total)
                print(f"run {run + 1}: drill restore step {step:.1f} s, RTO {rto:.1f} s (total with proofs and "
                      f"drop {total:.1f} s), pg_restore -j2 {peer:.1f} s, ratio step {step / peer:.3f}, "
                      f"RTO {rto / peer:.3f}  load {os.getloadavg()[0]:.1f}", flush=True)
    m_step, m_rto, m_total, m_peer = (statistics.median(x) for x in (step_times, rto_times, total_times, peer_times))
    paired = statistics.median(a / b for a, b in zip(step_times, peer_times, strict=True))
    print(f"database: {size / 2**30:.2f} GiB; dump {stored / 2**20:.0f} MiB stored")
    print(f"median drill restore step: {m_step:.1f} s (decrypt, decompress, pg_restore, schema and row-count check)")
    print(f"median drill RTO         : {m_rto:.1f} s (verify + create + restore)")
    print(f"median drill total       : {m_total:.1f} s (+ proofs and drop)")
    print(f"median pg_restore -j2    : {m_peer:.1f} s")
    print(f"ratio drill restore step / pg_restore -j2: {m_step / m_peer:.3f} of the medians, median of paired "
          f"ratios {paired:.3f}  (target <= 1.1)")
    print(f"ratio drill RTO / pg_restore -j2: {m_rto / m_peer:.3f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notes", type=int, default=200_000)
    parser.add_argument("--attachments", type=int, default=2_000)
    parser.add_argument("--attachment-kib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    global ADMIN
    args = parser.parse_args()
    with admin_url("engram-bench-drill-", "ENGRAM_BENCH_ADMIN_URL") as admin:
        ADMIN = admin
        return anyio.run(main_async, args)


if __name__ == "__main__":
    sys.exit(main())
