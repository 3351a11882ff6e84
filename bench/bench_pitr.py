"""Benchmark: point-in-time recovery's RPO under steady load, and the PITR drill's restore beside Barman's own.

    .venv/bin/python bench/bench_pitr.py [--runs 3] [--notes 20000] [--write-mib 256] [--archive-timeout 30]

Sets up what docs/pitr.md describes, on the bundled PostgreSQL 18 (a cluster of its own in a
temporary directory): Barman 3 in streaming mode (pg_basebackup + pg_receivewal), its roles and
a slot reserving WAL, an Engram-shaped database (testbed, --notes notes), a steady load of one
committed row every 100 ms for the whole run, a base backup, then --write-mib MiB of rows
written after it (WAL the recoveries replay).

(a) RPO (issue 15: at most 60 s of committed writes): commit a marker row, keep the load going
    for 60 s plus one minute's margin, then restore_drill to `now() - 60 s` and look for the
    marker in the recovered server's row counts. Also printed: the archive's lag at that moment
    (now minus the newest archived commit), the RPO a recovery right then would have.
(b) Restore time (target: ours <= 1.1x the engine's own): per run, to the same time, in
    alternating order,
    * ours: restore_drill at:<time>, its `recover` + `replay` steps (Barman's recovery, then the
      bundled server started on it until replay reached the time and it promoted); its RTO with
      the proofs is printed too;
    * peer: `barman recover --target-time` of the same backup by hand, then the same server start
      and wait for promotion (core/restore/pitr.serve, core/stores/pgserver.py: what an operator does with pg_ctl).
    Prints every figure, the medians and the ratio ours/peer.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import asyncpg

from engram_recovery import testbed
from engram_recovery.core.engram import crypto as engram_crypto
from engram_recovery.core.progress import silent
from engram_recovery.core.restore import pitr
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores.barman import Barman
from engram_recovery.testbed import barman as testbed_barman
from engram_recovery.testbed import cluster
from engram_recovery.tools.restore_drill import RestoreDrillInput, restore_drill


async def drill(env: dict[str, str], moment: datetime) -> tuple[float, float, dict[str, int]]:
    """restore_drill at `moment`: (recover + replay seconds, RTO with proofs, the recovered row counts)."""
    runtime = Runtime(load_settings(environ=env))
    try:
        result = await restore_drill(runtime, RestoreDrillInput(recovery_point=f"at:{moment.isoformat()}",
                                                                sample_notes=50), silent)  # fmt: skip
    finally:
        await runtime.aclose()
    if result.verdict != "ok" or result.rto_seconds is None:
        raise SystemExit(f"drill failed: {result.summary}")
    steps = {s.name: s for s in result.steps}
    print("  drill steps: " + ", ".join(f"{s.name} {s.seconds:.2f} s" for s in result.steps))
    return steps["recover"].seconds + steps["replay"].seconds, result.rto_seconds, \
        steps["prove_row_counts"].details["counts"]  # fmt: skip


async def barman_alone(barman: Barman, backup_id: str, moment: datetime, dsn: str) -> float:
    """The engine's own restore: `barman recover --target-time`, then the server started until it promoted."""
    root = Path(tempfile.mkdtemp(prefix="bench-pitr-peer-"))
    server = None
    try:
        started = time.perf_counter()
        await barman.run(barman.command.recover(backup_id, str(root / "pgdata"), target_time=moment), limit=3600)
        server = (await pitr.serve(root, root / "pgdata", dsn)).server  # the same start and wait as the drill's
        return time.perf_counter() - started
    finally:
        if server is not None:
            await server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def main_async(args: argparse.Namespace, root: Path) -> int:
    pg = cluster.start(root / "data", fast=True, extra=(f"archive_timeout={args.archive_timeout}",))
    try:
        return await bench(args, secrets.token_bytes(32), root, pg)
    finally:
        pg.stop()


async def bench(args: argparse.Namespace, key: bytes, root: Path, pg: cluster.Cluster) -> int:
    await testbed_barman.create_replication_role(pg.admin_url)
    config = testbed_barman.barman_config(pg.port, root / "barman", description="bench")
    barman = testbed_barman.barman_for(config)
    async with testbed.scratch_database(pg.admin_url, prefix="bench_pitr") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await testbed.create_engram_schema(conn, variant="0.18.1")
            await testbed.create_roles(conn, dsn.rsplit("/", 1)[-1])
            await testbed.seed(conn, master_key=key, users=10, vaults_per_user=2, notes=args.notes, attachments=50)
            await conn.execute("CREATE TABLE bench_marker (n int PRIMARY KEY, at timestamptz)")
            await conn.execute("CREATE TABLE bench_bulk (n bigint, pad text)")
            await conn.execute("CREATE TABLE bench_load (at timestamptz DEFAULT clock_timestamp())")
        finally:
            await conn.close()
        env = {"DATABASE_URL": dsn, "ENCRYPTION_MASTER_KEY": engram_crypto.encode_master_key(key),
               "ENGRAM_RECOVERY_REPOSITORY": str(root / "repo"), "ENGRAM_RECOVERY_QDRANT_PATH": ":memory:",
               "ENGRAM_RECOVERY_BARMAN_CONFIG": str(config), "ENGRAM_RECOVERY_BARMAN_SERVER": testbed_barman.SERVER,
               "PATH": os.environ.get("PATH", "")}  # fmt: skip
        await barman.cron()
        try:
            async with testbed_barman.steady_writes(dsn, statement="INSERT INTO bench_load DEFAULT VALUES"):
                await barman.switch_wal(archive_timeout=60)
                t0 = time.perf_counter()
                backup = await barman.backup(wait_timeout=600)
                print(
                    f"base backup {backup.backup_id}: {backup.size_bytes / 2**20:.0f} MiB in "
                    f"{time.perf_counter() - t0:.1f} s"
                )
                conn = await asyncpg.connect(dsn)
                try:
                    rows = args.write_mib * 1024 // 2  # ~2 KiB a row with its overhead
                    t0 = time.perf_counter()
                    await conn.execute("INSERT INTO bench_bulk SELECT g, repeat(md5(g::text), 60) "
                                       "FROM generate_series(1, $1) g", rows)  # fmt: skip
                    print(f"wrote {args.write_mib} MiB of rows after the backup in {time.perf_counter() - t0:.1f} s")
                    # (a) RPO: a marker, then 60 s + one minute's margin of steady load.
                    marked: datetime = await conn.fetchval(
                        "INSERT INTO bench_marker VALUES (1, clock_timestamp()) RETURNING at"
                    )
                finally:
                    await conn.close()
                await anyio.sleep(120)
                target = datetime.now(UTC) - timedelta(seconds=60)
                await barman.archive_wal()
                catalog = await barman.catalog()
                lag = catalog.rpo_seconds(datetime.now(UTC))
                lag_text = "unknown" if lag is None else f"{lag:.1f} s"
                window = catalog.window
                print(
                    f"(a) marker committed {marked.isoformat()}; target now()-60 s = {target.isoformat()}; "
                    f"archive lag (RPO right now) {lag_text}; window "
                    f"{pitr.window_text(window) if window else 'none'}"
                )
                if window is None or not window.contains(target):
                    print(f"(a) RPO FAILED: now()-60 s is outside the window (the archive lags {lag_text})")
                    found = False
                else:
                    _restore, _rto, counts = await drill(env, target)
                    found = counts.get("bench_marker") == 1
                    met = found and lag is not None and lag <= 60
                    print(
                        f"(a) marker {'FOUND' if found else 'NOT FOUND'} in the recovery to now()-60 s: RPO "
                        f"{lag_text} vs the 60 s target: {'ok' if met else 'FAIL'}"
                    )
                # (b) the same time for both, inside the window: replay covers the bulk write.
                if window is None:
                    raise SystemExit("no restorable window: nothing to compare")
                moment = target if window.contains(target) else window.end
                ours_times: list[float] = []
                rto_times: list[float] = []
                peer_times: list[float] = []
                for run in range(args.runs):
                    if run % 2 == 0:
                        ours, rto, _ = await drill(env, moment)
                        peer = await barman_alone(barman, backup.backup_id, moment, dsn)
                    else:
                        peer = await barman_alone(barman, backup.backup_id, moment, dsn)
                        ours, rto, _ = await drill(env, moment)
                    ours_times.append(ours)
                    rto_times.append(rto)
                    peer_times.append(peer)
                    print(
                        f"(b) run {run + 1}: ours recover+replay {ours:.2f} s (RTO with proofs {rto:.2f} s), "
                        f"barman recover + start + replay {peer:.2f} s, ratio {ours / peer:.2f}"
                    )
        finally:
            await barman.stop_receiving()
    m_ours, m_rto, m_peer = (statistics.median(x) for x in (ours_times, rto_times, peer_times))
    print(f"median ours recover+replay: {m_ours:.2f} s; median PITR RTO with proofs: {m_rto:.2f} s")
    print(f"median barman recover + start + replay: {m_peer:.2f} s")
    print(f"ratio ours / barman's own: {m_ours / m_peer:.2f} (target <= 1.1)")
    return 0 if found else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--notes", type=int, default=20_000)
    parser.add_argument("--write-mib", type=int, default=256, help="rows written after the base backup (replayed)")
    parser.add_argument("--archive-timeout", type=int, default=30, help="the source's archive_timeout, seconds")
    root = Path(tempfile.mkdtemp(prefix="bench-pitr-"))
    root.chmod(0o711)  # the postgres OS user runs the cluster below it
    try:
        return anyio.run(main_async, parser.parse_args(), root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
