"""Benchmark: the two restore engines of issue 13 beside the stock tools they must keep up with.

    .venv/bin/python bench/bench_restore.py db [--runs 3] [--admin-url URL] [--database engram_bench_1g]
                                               [--seed-notes N]
    .venv/bin/python bench/bench_restore.py attachments [--runs 3] [--objects 5000] [--size 65536]

db: the database step (core/restore/database.py: decrypt, decompress, pg_restore, then the
schema and row-count check) beside `pg_restore --jobs=2 --exit-on-error` of the SAME
dump already decrypted to a plain file, each into a fresh empty database on the same
server (target: ours <= 1.1x). The database is backed up once with run_backup (custom
format, zstd, encrypted) into a temporary repository; the one-off decrypt for the peer
is timed and printed but not counted. The server: --admin-url, else ENGRAM_TEST_ADMIN_URL,
else the bundled PostgreSQL 18 kept in .bench/pg18 (bench_backup.py seeds engram_bench_1g
there, with its master key in .bench/). The source database is only read (pg_dump); the
fresh databases are created and dropped around each run. `--seed-notes N` seeds a small
bed of its own instead (engram_bench_restore_small, dropped after), for a smoke run.

attachments: the copy-back (core/restore/copy_back.py) of `--objects` x `--size` objects from an
S3 repository's pool into a fresh bucket on the same SeaweedFS (server-side copy, each
ETag checked) beside `rclone copy --transfers 16 --checkers 16 --fast-list` of the same
objects between the same endpoints into another fresh bucket (one remote for both, so
rclone copies server-side too: the strongest form of the peer), then each re-run with
nothing to do. `--repository local` puts the pool in a local directory instead: ours
streams each blob (hashed) into the bucket, rclone copies the same directory. Starts its
own SeaweedFS (target: ours <= 1.0x). rclone copies the pool's own key layout; ours puts
each blob under its original key: the same objects and bytes, named as Engram named them.

The order of ours and the peer alternates between runs; every figure is printed, then
the medians and the median of the per-run ratios ours/peer.
"""

from __future__ import annotations

import argparse
import base64
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.to_thread
import asyncpg

from engram_recovery import testbed
from engram_recovery.core.artifact import encryption as backup_crypto
from engram_recovery.core.engram import crypto as engram_crypto
from engram_recovery.core.progress import silent
from engram_recovery.core.repository.base import Repository
from engram_recovery.core.repository.layout import BACKUPS, inventory_key
from engram_recovery.core.repository.local import LocalRepository
from engram_recovery.core.repository.manifest import Manifest
from engram_recovery.core.repository.mirror import mirror_attachments
from engram_recovery.core.repository.s3 import S3Repository
from engram_recovery.core.restore.copy_back import CopyOptions, copy_inventory
from engram_recovery.core.restore.database import DumpRestore, restore_database
from engram_recovery.core.restore.decrypt import extract_backup
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores import s3
from engram_recovery.core.stores.pgclient.commands import RestoreClients
from engram_recovery.core.stores.pgclient.versions import choose
from engram_recovery.core.stores.s3 import S3Location
from engram_recovery.testbed.seaweedfs import SeaweedFS, seaweedfs
from engram_recovery.tools.run_backup import RunBackupInput, run_backup

RCLONE = str(Path(sys.executable).with_name("rclone"))
SMALL = "engram_bench_restore_small"
DB = "engram_bench_1g"  # what bench_backup.py seeds
STATE = Path(".bench")


def server_url(given: str | None) -> str:
    """--admin-url, ENGRAM_TEST_ADMIN_URL, else the bundled PostgreSQL 18 kept in .bench/pg18 (as bench_backup.py)."""
    if given or os.environ.get("ENGRAM_TEST_ADMIN_URL"):
        return given or os.environ["ENGRAM_TEST_ADMIN_URL"]
    from engram_recovery.testbed import cluster

    STATE.mkdir(exist_ok=True)
    STATE.chmod(0o755)  # the postgres OS user runs the bundled server from .bench/pg18
    return cluster.start(STATE / "pg18").admin_url


def location(weed: SeaweedFS, bucket: str) -> S3Location:
    return S3Location(weed.endpoint, weed.access_key_id, weed.secret_access_key, weed.region, bucket)


async def create_bucket(target: S3Location) -> None:
    async with s3.client(target) as c:
        await c.create_bucket(Bucket=target.bucket)


async def count(target: S3Location) -> int:
    async with s3.client(target) as c:
        return sum([1 async for _ in s3.list_objects(c, target.bucket)])


async def fill(source: S3Location, objects: int, size: int) -> None:
    await create_bucket(source)
    async with s3.client(source) as c:
        limiter = anyio.Semaphore(32)

        async def one(i: int) -> None:
            async with limiter:
                key = f"u{i % 7}/v{i % 3}/objects/{secrets.token_hex(8)}-{i}"
                await c.put_object(Bucket=source.bucket, Key=key, Body=secrets.token_bytes(size))

        async with anyio.create_task_group() as tg:
            for i in range(objects):
                tg.start_soon(one, i)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def summary(figures: dict[str, list[float]], pairs: list[tuple[str, str, str]]) -> None:
    for label, ours, peer in pairs:
        ratios = [a / b for a, b in zip(figures[ours], figures[peer], strict=True)]
        each = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"  {label}: ours {statistics.median(figures[ours]):.2f} s, peer {statistics.median(figures[peer]):.2f}"
              f" s, median ratio {statistics.median(ratios):.2f} (per run: {each})")  # fmt: skip


async def alternate(run: int, tools: list[tuple[str, Callable[[], Awaitable[float]]]]) -> dict[str, float]:
    row: dict[str, float] = {}
    for name, go in tools if run % 2 else list(reversed(tools)):
        row[name] = await go()
    return row


# --- the database step ---------------------------------------------------------------------------


async def small_bed(admin_url: str, notes: int) -> tuple[str, bytes]:
    dsn = testbed.dsn_for(admin_url, SMALL)
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{SMALL}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{SMALL}"')
    finally:
        await admin.close()
    key = secrets.token_bytes(32)
    conn = await asyncpg.connect(dsn)
    try:
        await testbed.create_engram_schema(conn)
        await testbed.create_roles(conn, SMALL)
        # The 1 GiB bed's proportions (bench_backup.py): note bodies and attachment rows about equally large.
        await testbed.seed(conn, master_key=key, users=20, vaults_per_user=3, notes=notes,
                           attachments=max(1, notes * 1600 // 250_000), attachment_size=256 << 10,
                           note_size=2000)  # fmt: skip
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return dsn, key


async def drop(admin_url: str, name: str) -> None:
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def bench_db(args: argparse.Namespace) -> None:
    admin_url = server_url(args.admin_url)
    conn = await asyncpg.connect(admin_url)
    try:
        major = int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()
    if args.seed_notes:
        dsn, master = await small_bed(admin_url, args.seed_notes)
    else:
        key_file = STATE / f"{args.database}.pg{major}.key"
        if not key_file.exists():
            raise SystemExit(f"{key_file} is missing: seed the bed with bench/bench_backup.py --seed-only first")
        dsn, master = testbed.dsn_for(admin_url, args.database), bytes.fromhex(key_file.read_text())
    pg_restore = (await choose("pg_restore", None, major, f"restore into PostgreSQL {major}")).require().path
    backup_key = base64.b64encode(secrets.token_bytes(32)).decode()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-restore-", dir=args.scratch) as work:
            env = {"DATABASE_URL": dsn, "ENCRYPTION_MASTER_KEY": engram_crypto.encode_master_key(master),
                   "ENGRAM_RECOVERY_REPOSITORY": f"{work}/repo", "ENGRAM_RECOVERY_BACKUP_KEY": backup_key,
                   "ENGRAM_RECOVERY_KEY_ESCROW": "bench", "PATH": os.environ.get("PATH", "")}  # fmt: skip
            runtime = Runtime(load_settings(environ=env))
            started = time.perf_counter()
            try:
                result = await run_backup(runtime, RunBackupInput(format="custom"), silent)
            finally:
                await runtime.aclose()
            assert result.backup_id
            print(f"backup {result.backup_id} of {dsn.rsplit('/', 1)[-1]}: {time.perf_counter() - started:.1f} s")
            async with LocalRepository(Path(work) / "repo") as repo:
                manifest = Manifest.model_validate_json(
                    await repo.get_bytes(f"{BACKUPS}{result.backup_id}/manifest.json"))  # fmt: skip
                plain = Path(work) / "plain.dump"
                started = time.perf_counter()
                await extract_backup(repo, result.backup_id, backup_crypto.parse_key(backup_key), plain)
                print(f"one-off decrypt for the peer ({plain.stat().st_size} bytes): "
                      f"{time.perf_counter() - started:.1f} s (not counted)")  # fmt: skip

                async def peer() -> float:
                    async with testbed.scratch_database(admin_url, prefix="bench_restore_peer") as target:
                        url = target
                        began = time.perf_counter()
                        await anyio.run_process([pg_restore, "--no-password", "--exit-on-error", "--jobs=2",
                                                 f"--dbname={url}", str(plain)])  # fmt: skip
                        return time.perf_counter() - began

                async def ours() -> float:
                    async with testbed.scratch_database(admin_url, prefix="bench_restore_ours") as target:
                        began, cpu = time.perf_counter(), _cpu()
                        done = await restore_database(DumpRestore(
                            repo, manifest, backup_crypto.parse_key(backup_key), target, RestoreClients(pg_restore),
                            jobs=2, scratch=Path(work), loaders=args.loaders))  # fmt: skip
                        seconds, cpu = time.perf_counter() - began, _cpu() - cpu
                    if not done.check.ok:
                        raise SystemExit(f"our restore failed its check: {done.check.summary}")
                    # Our process's own CPU (all its threads), less sensitive to a loaded machine than the wall time.
                    print(f"    ours: {done.mode} ({done.why}); phases {done.timings}; our CPU {cpu:.1f} s")
                    return seconds

                figures: dict[str, list[float]] = {}
                for run in range(1, args.runs + 1):
                    row = await alternate(run, [("ours", ours), ("peer", peer)])
                    for k, v in row.items():
                        figures.setdefault(k, []).append(v)
                    print(f"run {run}: ours {row['ours']:.2f} s | pg_restore -j2 of the decrypted dump "
                          f"{row['peer']:.2f} s | ratio {ratio(row['ours'], row['peer'])}", flush=True)  # fmt: skip
    finally:
        if args.seed_notes:
            await drop(admin_url, SMALL)
    print(f"median of {args.runs} runs (target <= 1.1):")
    summary(figures, [("database step", "ours", "peer")])


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- the attachments step ------------------------------------------------------------------------


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rclone_copy(weed: SeaweedFS, source: str, target: str) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    env |= {"RCLONE_CONFIG_WEED_TYPE": "s3", "RCLONE_CONFIG_WEED_PROVIDER": "Other",
            "RCLONE_CONFIG_WEED_ENDPOINT": weed.endpoint, "RCLONE_CONFIG_WEED_ACCESS_KEY_ID": weed.access_key_id,
            "RCLONE_CONFIG_WEED_SECRET_ACCESS_KEY": weed.secret_access_key,
            "RCLONE_CONFIG_WEED_REGION": weed.region}  # fmt: skip
    argv = [RCLONE, "copy", "--transfers", "16", "--checkers", "16", "--fast-list", "--stats", "0", "-v",
            source if source.startswith("/") else f"weed:{source}", f"weed:{target}"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"rclone failed: {done.stderr[-2000:]}")
    return seconds, sum(1 for line in done.stderr.splitlines() if ": Copied (" in line)


async def bench_attachments(args: argparse.Namespace) -> None:
    with seaweedfs() as weed:
        source = location(weed, "bench-source")
        started = time.perf_counter()
        await fill(source, args.objects, args.size)
        repo_bucket = location(weed, "bench-repo")
        await create_bucket(repo_bucket)
        local = Path(tempfile.mkdtemp(prefix="bench-restore-repo-", dir=args.scratch))

        def repository() -> Repository:
            return LocalRepository(local) if args.repository == "local" else S3Repository(repo_bucket, "engram")

        async with repository() as repo:
            mirrored = await mirror_attachments(source, repo, "b1", silent)
        pool = str(local / "attachments/pool") if args.repository == "local" else (
            f"{repo_bucket.bucket}/engram/attachments/pool")  # fmt: skip
        print(f"{args.objects} objects of {args.size} bytes filled and mirrored into the pool in "
              f"{time.perf_counter() - started:.1f} s ({mirrored.copied_objects} copied)")  # fmt: skip
        server_side = args.repository == "s3"
        figures: dict[str, list[float]] = {}
        for run in range(1, args.runs + 1):
            tag = secrets.token_hex(3)
            ours_bucket, peer_bucket = location(weed, f"ours-{tag}"), location(weed, f"rclone-{tag}")
            await create_bucket(ours_bucket)
            await create_bucket(peer_bucket)

            def ours_phase(phase: str, ours_bucket: S3Location) -> Callable[[], Awaitable[float]]:
                async def go() -> float:
                    began, cpu = time.perf_counter(), _cpu()
                    async with repository() as repo:
                        report = await copy_inventory(repo, inventory_key("b1"), ours_bucket,
                                                      options=CopyOptions(concurrency=16))  # fmt: skip
                    seconds, cpu = time.perf_counter() - began, _cpu() - cpu
                    expected = args.objects if phase == "first" else 0
                    if not report.ok or report.copied_objects != expected or report.server_side_copy != server_side:
                        raise SystemExit(f"ours {phase}: {report}")
                    # Our process's own CPU (all its threads): what a loaded machine disturbs least.
                    print(f"    ours {phase}: our CPU {cpu:.2f} s ({cpu / args.objects * 1e6:.0f} us an object)")
                    return seconds

                return go

            def peer_phase(phase: str, peer_bucket: S3Location) -> Callable[[], Awaitable[float]]:
                async def go() -> float:
                    cpu = _children_cpu()
                    seconds, copied = await anyio.to_thread.run_sync(rclone_copy, weed, pool, peer_bucket.bucket)
                    cpu = _children_cpu() - cpu
                    print(f"    rclone {phase}: its CPU {cpu:.2f} s ({cpu / args.objects * 1e6:.0f} us an object)")
                    if copied != (args.objects if phase == "first" else 0):
                        raise SystemExit(f"rclone {phase}: copied {copied}")
                    return seconds

                return go

            row: dict[str, float] = {}
            for phase in ("first", "rerun"):
                got = await alternate(run, [("ours", ours_phase(phase, ours_bucket)),
                                            ("rclone", peer_phase(phase, peer_bucket))])
                row |= {f"{k}_{phase}": v for k, v in got.items()}
            assert await count(ours_bucket) == await count(peer_bucket) == args.objects
            for k, v in row.items():
                figures.setdefault(k, []).append(v)
            print(f"run {run}: copy ours {row['ours_first']:.2f} s | rclone copy {row['rclone_first']:.2f} s "
                  f"(ratio {ratio(row['ours_first'], row['rclone_first'])}); re-run ours {row['ours_rerun']:.2f} s | "
                  f"rclone {row['rclone_rerun']:.2f} s (ratio {ratio(row['ours_rerun'], row['rclone_rerun'])})",
                  flush=True)  # fmt: skip
    shutil.rmtree(local, ignore_errors=True)
    how = "server-side, both" if args.repository == "s3" else "streamed from a local repository, both"
    print(f"median of {args.runs} runs ({args.objects} x {args.size} B, {how}; target <= 1.0):")
    summary(figures, [("copy  ", "ours_first", "rclone_first"), ("re-run", "ours_rerun", "rclone_rerun")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    db = sub.add_parser("db", help="the database step beside pg_restore --jobs=2")
    db.add_argument("--runs", type=int, default=3)
    db.add_argument("--admin-url", help="the server (default: ENGRAM_TEST_ADMIN_URL, else the bundled 18)")
    db.add_argument("--database", default=DB, help=f"the seeded bed to back up (default {DB})")
    db.add_argument("--seed-notes", type=int, default=0, help="seed a small bed of this many notes instead")
    db.add_argument("--loaders", type=int, default=1, help="loaders side by side (fallback path only)")
    db.add_argument("--scratch", default=None, help="where the repository and scratch files go (default TMPDIR)")
    att = sub.add_parser("attachments", help="the attachments step beside rclone copy")
    att.add_argument("--runs", type=int, default=3)
    att.add_argument("--objects", type=int, default=5000)
    att.add_argument("--size", type=int, default=64 * 1024)
    att.add_argument("--repository", choices=["s3", "local"], default="s3",
                     help="where the pool is: an S3 repository on the same endpoint (server-side copies), or a "
                          "local directory (streamed uploads; rclone copies the same directory)")  # fmt: skip
    att.add_argument("--scratch", default=None, help="where a local repository goes (default TMPDIR)")
    args = parser.parse_args()
    anyio.run(bench_db if args.step == "db" else bench_attachments, args)


if __name__ == "__main__":
    main()
