"""`engram-recovery call backup_status` as a whole process (what a cron line pays), beside its peer.

Peer, measured in the same run, paired (one of each per round, alternating which goes first):
`python -c "import asyncpg, pydantic, anyio"`, the floor of any Python program that talks to
PostgreSQL with these libraries. Target (issue 14): ours / peer <= 5 on the medians.

The deployment is the cron case the lean call path is for: attachments in PostgreSQL
(STORAGE_BACKEND=database), a local repository, no Qdrant; the database is a small seeded
Engram on a throwaway bundled PostgreSQL 18 cluster (or ENGRAM_TEST_ADMIN_URL).

Usage: .venv/bin/python bench/bench_cli.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from _common import admin_url, drop, seeded

from engram_recovery.core.engram import crypto as engram_crypto

EXE = str(Path(sys.executable).with_name("engram-recovery"))
PEER = [sys.executable, "-c", "import asyncpg, pydantic, anyio"]


async def seeded_cli(admin: str, key: bytes) -> str:
    return await seeded(admin, key, "engram_bench_cli", users=3, notes=500, attachments=20)


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    # backup_status exits 2 here (no backup yet: verdict fail); anything on stderr would be a real failure.
    if proc.stderr:
        raise SystemExit(f"{argv[1:]} failed: {proc.stderr.strip()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    key = secrets.token_bytes(32)
    with admin_url("engram-bench-cli-") as admin, tempfile.TemporaryDirectory(prefix="engram-bench-cli-") as work:
        dsn = anyio.run(seeded_cli, admin, key)
        env = {
            "PATH": os.environ.get("PATH", ""), "DATABASE_URL": dsn,
            "ENCRYPTION_MASTER_KEY": engram_crypto.encode_master_key(key),
            "ENGRAM_RECOVERY_REPOSITORY": str(Path(work) / "repo"), "ENGRAM_RECOVERY_KEY_ESCROW": "a,b",
        }
        ours_argv = [EXE, "call", "backup_status", "--json"]
        ours: list[float] = []
        peer: list[float] = []
        try:
            for argv in (ours_argv, PEER):  # warm the page cache before measuring
                timed(argv, env)
            for run in range(args.runs):
                order = [(ours_argv, ours), (PEER, peer)]
                for argv, samples in order if run % 2 == 0 else reversed(order):
                    samples.append(timed(argv, env))
        finally:
            anyio.run(drop, admin, dsn)
    ratios = [a / b for a, b in zip(ours, peer, strict=True)]
    o50, p50 = statistics.median(ours), statistics.median(peer)
    print(f"runs (paired):                          {args.runs}")
    print(f"ours: engram-recovery call backup_status  median {o50 * 1000:.0f} ms  (min {min(ours) * 1000:.0f}, "
          f"max {max(ours) * 1000:.0f})")
    print(f"peer: python -c 'import asyncpg, pydantic, anyio'  median {p50 * 1000:.0f} ms  (min "
          f"{min(peer) * 1000:.0f}, max {max(peer) * 1000:.0f})")
    print(f"ratio ours/peer: {o50 / p50:.2f} of the medians, median of paired ratios {statistics.median(ratios):.2f}"
          f"  (target <= 5)")


if __name__ == "__main__":
    main()
