"""run_backup (zstd, encrypted) beside the pipelines it replaces, on a >= 1 GiB Engram-shaped database.

Peers, measured in the same run on the same database, each in its own process:
- Engram's documented pipeline `pg_dump --clean --if-exists | gzip > file` (target: ours <= 0.2x its wall
  time, and our output no larger than its file),
- `pg_dump -Fc -Z0 > /dev/null`, the dump's own speed (target: ours <= 1.25x),
and our process's peak RSS (target < 200 MB), sampled with psutil every 20 ms, beside
the peak of its whole process tree from getrusage(RUSAGE_CHILDREN).

Usage: .venv/bin/python bench/bench_backup.py [--runs 3] [--notes 250000] [--attachments 1600] [--reseed]
                                              [--admin-url URL] [--database NAME]
The server: --admin-url (or ENGRAM_TEST_ADMIN_URL), e.g. the host's PostgreSQL 15 on 127.0.0.1:5432; by
default the bundled PostgreSQL 18 (the version Engram runs), a cluster kept in .bench/pg18 between runs
(stop it with `python -m engram_recovery.testbed.cluster stop .bench/pg18`). Every pg_dump here, ours
and the peers', is the client run_backup chooses for that server (core/stores/pgclient/versions.py): the 18 one for 18.
The seeded database (engram_bench_1g) and its master key (.bench/, one per server) are kept between runs.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import asyncpg
import psutil

from engram_recovery import testbed
from engram_recovery.core.engram import crypto as engram_crypto
from engram_recovery.core.stores.pgclient.versions import choose

DB = "engram_bench_1g"
STATE = Path(".bench")
PG_DUMP = "pg_dump"  # set in main(): the client run_backup chooses for the server


def server_url(given: str | None) -> str:
    """--admin-url, ENGRAM_TEST_ADMIN_URL, else the bundled PostgreSQL 18 kept in .bench/pg18."""
    if given or os.environ.get("ENGRAM_TEST_ADMIN_URL"):
        return given or os.environ["ENGRAM_TEST_ADMIN_URL"]
    from engram_recovery.testbed import cluster

    STATE.mkdir(exist_ok=True)
    STATE.chmod(0o755)  # the postgres OS user runs the bundled server from .bench/pg18
    return cluster.start(STATE / "pg18").admin_url


async def server_version(admin_url: str) -> tuple[int, str]:
    conn = await asyncpg.connect(admin_url)
    try:
        number, text = await conn.fetchval("SHOW server_version_num"), await conn.fetchval("SHOW server_version")
        return int(number) // 10000, str(text)
    finally:
        await conn.close()


async def ensure_database(
    admin_url: str, major: int, notes: int, attachments: int, reseed: bool
) -> tuple[str, bytes, int]:
    key_file = STATE / f"{DB}.pg{major}.key"  # one per server: 15's and 18's databases differ
    dsn = testbed.dsn_for(admin_url, DB)
    admin = await asyncpg.connect(admin_url)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DB)
        if not (exists and key_file.exists() and not reseed):
            await admin.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{DB}"')
            key = secrets.token_bytes(32)
            conn = await asyncpg.connect(dsn)
            try:
                started = time.perf_counter()
                await testbed.create_engram_schema(conn)
                await testbed.create_roles(conn, DB)
                # Mostly ciphertext, as in production: encrypted note bodies and attachment blobs in the database.
                await testbed.seed(conn, master_key=key, users=20, vaults_per_user=3, notes=notes,
                                   attachments=attachments, attachment_size=256 << 10, note_size=2000)
                await conn.execute("VACUUM ANALYZE")
                print(f"seeded in {time.perf_counter() - started:.0f} s", flush=True)
            finally:
                await conn.close()
            key_file.write_text(key.hex())
        size = int(await admin.fetchval("SELECT pg_database_size($1)", DB))
    finally:
        await admin.close()
    return dsn, bytes.fromhex(key_file.read_text()), size


def timed(argv: list[str], *, shell: bool = False, env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """Wall seconds, peak RSS of the top process (sampled), peak RSS of any process in its tree (rusage)."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv if not shell else " ".join(argv), shell=shell, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watched = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: {err[-2000:]}")
    tree_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return seconds, peak, tree_peak


def run_once(dsn: str, key: bytes, work: Path, dump_peer_only: bool = False) -> dict[str, float]:
    out: dict[str, float] = {}
    if not dump_peer_only:
        gz = work / "seed.sql.gz"
        seconds, _, _ = timed([PG_DUMP, "--clean", "--if-exists", f"--dbname={dsn}", "|", "gzip", ">", str(gz)],
                              shell=True)  # fmt: skip
        out["gzip_s"], out["gzip_bytes"] = seconds, gz.stat().st_size
        gz.unlink()
    seconds, _, _ = timed([PG_DUMP, "-Fc", "-Z0", f"--dbname={dsn}", ">", "/dev/null"], shell=True)
    out["raw_s"] = seconds
    if not dump_peer_only:
        # A reference, not a target: the same dump through the zstd command-line tool (C, no encryption,
        # no hashing, no verification), i.e. the floor for any compressing pipeline on this machine.
        zst = work / "ref.dump.zst"
        seconds, _, _ = timed([PG_DUMP, "-Fc", "-Z0", f"--dbname={dsn}", "|", "zstd", "-1", "-q", "-o", str(zst)],
                              shell=True)  # fmt: skip
        out["zstd_cli_s"] = seconds
        zst.unlink()
    repo = work / "repo"
    env = {
        "PATH": os.environ.get("PATH", ""), "DATABASE_URL": dsn,
        "ENCRYPTION_MASTER_KEY": engram_crypto.encode_master_key(key),
        "ENGRAM_RECOVERY_REPOSITORY": str(repo),
        "ENGRAM_RECOVERY_BACKUP_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
    }
    # The tool as an already-running server (or an assistant) sees it: timed inside the process, after imports.
    result_file = work / "result.json"
    _, peak, tree_peak = timed([sys.executable, __file__, "--tool-only", str(result_file)], env=env)
    result = json.loads(result_file.read_text())
    stored = sum(p.stat().st_size for p in repo.rglob("*.enc"))
    out["ours_s"], out["ours_bytes"], out["ours_rss"], out["tree_rss"] = result["seconds"], stored, peak, tree_peak
    out["ours_dump_s"] = result["durations"]["dump"]
    out["ours_verify_s"] = result["durations"]["verify"]
    shutil.rmtree(repo)
    # And as cron runs it: the CLI, interpreter start-up included.
    cli = Path(sys.executable).with_name("engram-recovery")
    out["cli_s"], _, _ = timed([str(cli), "call", "run_backup"], env=env)
    shutil.rmtree(repo)
    return out


def tool_only(result_file: str) -> None:
    from engram_recovery.core.progress import silent
    from engram_recovery.core.runtime import Runtime
    from engram_recovery.core.settings import load_settings
    from engram_recovery.tools.run_backup import RunBackupInput, run_backup

    async def go() -> dict[str, object]:
        runtime = Runtime(load_settings())
        started = time.perf_counter()
        result = await run_backup(runtime, RunBackupInput(), silent)
        seconds = time.perf_counter() - started
        await runtime.aclose()
        return {"seconds": seconds, "durations": result.durations}

    Path(result_file).write_text(json.dumps(anyio.run(go)))


def main() -> None:
    global DB, PG_DUMP
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--notes", type=int, default=250_000)
    parser.add_argument("--attachments", type=int, default=1600)
    parser.add_argument("--reseed", action="store_true")
    parser.add_argument("--dump-peer-only", action="store_true",
                        help="only ours and pg_dump -Fc -Z0 (the <= 1.25 target): no gzip pipeline (80 s a run) "
                        "and no zstd reference")  # fmt: skip
    parser.add_argument("--seed-only", action="store_true")
    parser.add_argument("--tool-only", metavar="RESULT_FILE", help=argparse.SUPPRESS)
    parser.add_argument("--admin-url", help="the server (default: ENGRAM_TEST_ADMIN_URL, else the bundled 18)")
    parser.add_argument("--database", default=DB, help=f"the seeded database (default {DB})")
    args = parser.parse_args()
    if args.tool_only:
        tool_only(args.tool_only)
        return
    DB = args.database
    STATE.mkdir(exist_ok=True)
    admin_url = server_url(args.admin_url)
    major, version = anyio.run(server_version, admin_url)
    client = anyio.run(choose, "pg_dump", None, major, f"dump a PostgreSQL {major} server").require()
    PG_DUMP = client.path
    print(f"server PostgreSQL {version}; every pg_dump is {client.text} ({client.origin}: {client.path})", flush=True)
    dsn, key, size = anyio.run(ensure_database, admin_url, major, args.notes, args.attachments, args.reseed)
    print(f"database {DB}: {size / 2**30:.2f} GiB on disk", flush=True)
    if args.seed_only:
        return
    with tempfile.TemporaryDirectory(prefix="bench-backup-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        timed([PG_DUMP, "-Fc", "-Z0", f"--dbname={dsn}", ">", "/dev/null"], shell=True)  # warm the cache
        runs = []
        for number in range(1, args.runs + 1):
            r = run_once(dsn, key, work, args.dump_peer_only)
            runs.append(r)
            peers = (f"gzip pipeline {r['gzip_s']:.1f} s {r['gzip_bytes'] / 2**20:.0f} MiB | "
                     f"pg_dump -Z0 | zstd -1 {r['zstd_cli_s']:.1f} s | " if "gzip_s" in r else "")  # fmt: skip
            print(f"run {number}: ours {r['ours_s']:.1f} s = {r['ours_s'] / r['raw_s']:.3f}x pg_dump -Z0 "
                  f"(dump step {r['ours_dump_s']:.1f} s, verify {r['ours_verify_s']:.2f} s, "
                  f"CLI {r['cli_s']:.1f} s) "
                  f"{r['ours_bytes'] / 2**20:.0f} MiB rss {r['ours_rss'] / 2**20:.0f} MiB | {peers}"
                  f"pg_dump -Fc -Z0 {r['raw_s']:.1f} s | load {os.getloadavg()[0]:.1f}", flush=True)

    def med(k: str) -> float:
        return statistics.median(r[k] for r in runs)

    print(f"\nmedians of {len(runs)} runs, database {size / 2**30:.2f} GiB, load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"ours (zstd, encrypted), tool call: {med('ours_s'):7.1f} s  {med('ours_bytes') / 2**20:7.0f} MiB")
    print(f"ours through the CLI (cron):       {med('cli_s'):7.1f} s")
    print(f"peer pg_dump -Fc -Z0 > /dev/null:  {med('raw_s'):7.1f} s")
    print(f"wall ratio ours / pg_dump -Z0:     {med('ours_s') / med('raw_s'):.3f}  (target <= 1.25); median of "
          f"per-run ratios {statistics.median(r['ours_s'] / r['raw_s'] for r in runs):.3f}")
    print(f"wall ratio CLI / pg_dump -Z0:      {med('cli_s') / med('raw_s'):.3f}")
    if not args.dump_peer_only:
        print(f"peer pg_dump --clean | gzip:       {med('gzip_s'):7.1f} s  {med('gzip_bytes') / 2**20:7.0f} MiB")
        print(f"wall ratio ours / gzip pipeline:   {med('ours_s') / med('gzip_s'):.3f}  (target <= 0.2)")
        print(f"size ratio ours / gzip pipeline:   {med('ours_bytes') / med('gzip_bytes'):.3f}  (target <= 1.0)")
        print(f"reference pg_dump -Z0 | zstd -1:   {med('zstd_cli_s'):7.1f} s  ratio to pg_dump -Z0 = "
              f"{med('zstd_cli_s') / med('raw_s'):.3f}; ours / it = {med('ours_s') / med('zstd_cli_s'):.3f}")
        print(f"wall ratio CLI / gzip pipeline:    {med('cli_s') / med('gzip_s'):.3f}")
    print(f"peak RSS of our process:           {med('ours_rss') / 2**20:.0f} MiB  "
          f"ratio to 200 MB target = {med('ours_rss') / 200e6:.3f}")
    print(f"peak RSS of any process in the tree (getrusage children, pg_dump included): "
          f"{max(r['tree_rss'] for r in runs) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
