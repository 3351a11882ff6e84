"""Issue 12's "no behaviour change, no regression": the same CLI calls from a checkout made before core/
was regrouped (the peer) and from this one, on the same database, paired.

Peer: a checkout of the commit before the regroup (7822221, "a golden tools/list surface ... so
regrouping core/ can prove a client sees nothing change") with its own `scripts/setup` venv, given
with --before. Ours: this checkout. Each round runs, for each tree in alternating order, the whole
processes a cron line or an operator would: `call run_backup`, `call backup_status`, `call
plan_restore`, `call restore_drill`, each tree against its own repository (a newer manifest is not
for older code to read) and the same seeded database (attachments in PostgreSQL, no Qdrant). Both
trees use the same bundled PostgreSQL 18 clients. Target: every command's median of paired ratios
ours/peer within noise of 1.0 (<= 1.05); the per-round ratios are printed so the noise is visible.

Usage: .venv/bin/python bench/bench_regroup.py --before /path/to/old/checkout [--runs 5] [--notes 20000]
The server: ENGRAM_TEST_ADMIN_URL, else a throwaway bundled PostgreSQL 18 cluster.

  git worktree add --detach /tmp/pre-regroup 7822221 && (cd /tmp/pre-regroup && scripts/setup)
"""

from __future__ import annotations

import argparse
import json
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

OURS = Path(sys.executable).with_name("engram-recovery")
COMMANDS: dict[str, list[str]] = {
    "run_backup": ["call", "run_backup"],  # first: the status and the plan need a backup to judge
    "backup_status": ["call", "backup_status"],
    "plan_restore": ["call", "plan_restore", "--arg", "target_database=engram_regroup_target"],
    "restore_drill": ["call", "restore_drill"],
}


async def seeded_regroup(admin: str, key: bytes, notes: int) -> str:
    return await seeded(admin, key, "engram_bench_regroup", users=5, notes=notes, attachments=200)


def timed(exe: Path, argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run([str(exe), *argv], env=env, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - started
    # Exit 1 (warnings: e.g. no off-site escrow named) still ran the whole command; 2 or a traceback did not.
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{exe} {' '.join(argv)} exited {proc.returncode}: {proc.stdout[-400:]} {proc.stderr[-400:]}")
    json.loads(proc.stdout)  # a whole result, not a partial one
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True, type=Path, help="checkout of the pre-regroup commit, set up")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--notes", type=int, default=20_000)
    args = parser.parse_args()
    peer = args.before / ".venv" / "bin" / "engram-recovery"
    if not peer.exists():
        raise SystemExit(f"{peer} not found: run scripts/setup in {args.before} first")
    key = secrets.token_bytes(32)
    samples: dict[tuple[str, str], list[float]] = {(c, t): [] for c in COMMANDS for t in ("ours", "peer")}
    with (
        admin_url("engram-bench-regroup-") as admin,
        tempfile.TemporaryDirectory(prefix="engram-bench-regroup-") as work,
    ):
        dsn = anyio.run(seeded_regroup, admin, key, args.notes)
        base = {
            "PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"), "DATABASE_URL": dsn,
            "ENCRYPTION_MASTER_KEY": engram_crypto.encode_master_key(key), "ENGRAM_RECOVERY_KEY_ESCROW": "a,b",
            "ENGRAM_RECOVERY_BACKUP_KEY": engram_crypto.encode_master_key(secrets.token_bytes(32)),
        }  # fmt: skip
        trees = {"ours": OURS, "peer": peer}
        envs = {t: base | {"ENGRAM_RECOVERY_REPOSITORY": str(Path(work) / t)} for t in trees}
        try:
            for tree, exe in trees.items():  # warm: page cache, each repository holds a backup to plan from
                for argv in COMMANDS.values():
                    timed(exe, argv, envs[tree])
            for run in range(args.runs):
                order = list(trees.items()) if run % 2 == 0 else list(reversed(trees.items()))
                for command, argv in COMMANDS.items():
                    for tree, exe in order:
                        samples[(command, tree)].append(timed(exe, argv, envs[tree]))
                line = "  ".join(f"{c} {samples[(c, 'ours')][-1] / samples[(c, 'peer')][-1]:.3f}" for c in COMMANDS)
                print(f"round {run + 1}: ours/peer  {line}  load {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            anyio.run(drop, admin, dsn)
    print(f"\n{args.runs} paired rounds, {args.notes} notes, {os.cpu_count()} cores")
    for command in COMMANDS:
        ours, theirs = samples[(command, "ours")], samples[(command, "peer")]
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        print(f"{command:14s} ours {statistics.median(ours):6.2f} s  before the regroup "
              f"{statistics.median(theirs):6.2f} s  median paired ratio {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})  target <= 1.05")


if __name__ == "__main__":
    main()
