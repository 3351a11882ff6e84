"""`call` for people and for cron: a short summary on a terminal, JSON when piped or asked, one JSON line for logs;
run_backup warns when backups go unencrypted; decrypted dumps are readable by their owner only."""

from __future__ import annotations

import base64
import json
import os
import pty
import secrets
import stat
import subprocess
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from support import EXE, EngramDB, engram_env, read_terminal

pytestmark = pytest.mark.anyio


def _on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run with stdout on a pty (as at a terminal); (exit code, what the terminal showed)."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([EXE, *args], stdout=follower, stderr=subprocess.DEVNULL, env=env)
        os.close(follower)
        seen = read_terminal(leader)
        code = proc.wait(timeout=60)
    finally:
        os.close(leader)
    return code, seen.decode().replace("\r\n", "\n")


def _piped(args: list[str], env: dict[str, str], umask: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=120, env=env,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


async def test_call_on_a_terminal_prints_a_summary_and_piped_or_with_json_prints_json(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path)
    code, shown = await anyio.to_thread.run_sync(_on_a_terminal, ["call", "backup_status"], env)
    lines = shown.strip().splitlines()
    # No backup yet: the verdict is fail, said first; then one line per check.
    assert code == 2 and lines[0] == "backup_status: FAIL", shown
    assert any(line.startswith("  [FAIL] last_backup: ") for line in lines), shown
    assert any(line.startswith("  [ok  ] postgres: ") for line in lines), shown
    assert lines[-1] == "exit 2; the whole result: add --json" and not shown.lstrip().startswith("{")

    code, shown = await anyio.to_thread.run_sync(_on_a_terminal, ["call", "backup_status", "--json"], env)
    assert code == 2 and json.loads(shown)["verdict"] == "fail"
    piped = await anyio.to_thread.run_sync(_piped, ["call", "backup_status"], env)
    assert piped.returncode == 2 and json.loads(piped.stdout)["verdict"] == "fail"


async def test_jsonl_writes_one_line_per_run_and_tells_warnings_from_failures(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path)
    backup = await anyio.to_thread.run_sync(_piped, ["call", "run_backup", "--jsonl"], env)
    assert backup.stdout.count("\n") == 1, backup.stdout
    record = json.loads(backup.stdout)
    # No backup key in this environment: a completed backup, with the warning that it is not encrypted.
    assert (backup.returncode, record["exit"], record["verdict"], record["tool"]) == (1, 1, "warn", "run_backup")
    assert record["result"]["backup_id"] and record["at"].endswith("+00:00")
    assert any("ENGRAM_RECOVERY_BACKUP_KEY is not set" in w for w in record["result"]["warnings"])

    broken = {"PATH": env["PATH"], "ENGRAM_RECOVERY_REPOSITORY": env["ENGRAM_RECOVERY_REPOSITORY"]}
    failed = await anyio.to_thread.run_sync(_piped, ["call", "run_backup", "--jsonl"], broken)
    record = json.loads(failed.stdout)
    assert failed.returncode == 2 and failed.stdout.count("\n") == 1
    assert (record["exit"], record["verdict"]) == (2, "error") and "DATABASE_URL is not set" in record["error"]
    assert "Fix:" in record["error"] and "DATABASE_URL" in failed.stderr


async def test_a_backup_with_a_key_has_no_unencrypted_warning_and_a_dry_run_without_one_warns(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=key)
    made = json.loads((await anyio.to_thread.run_sync(_piped, ["call", "run_backup"], env)).stdout)
    assert made["encrypted"] and not any("BACKUP_KEY" in w for w in made["warnings"])
    dry = await anyio.to_thread.run_sync(_piped, ["call", "run_backup", "--arg", "dry_run=true"],
                                         engram_env(engram_db, tmp_path))
    assert dry.returncode == 1 and json.loads(dry.stdout)["verdict"] == "warn"


async def test_decrypted_dumps_are_written_mode_0600_whatever_the_umask(engram_db: EngramDB, tmp_path: Path) -> None:
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=key)
    for fmt in ("custom", "directory"):
        made = await anyio.to_thread.run_sync(_piped, ["call", "run_backup", "--arg", f"format={fmt}"], env)
        backup_id = json.loads(made.stdout)["backup_id"]
        out = tmp_path / f"out-{fmt}"
        done = await anyio.to_thread.run_sync(_piped, ["decrypt", f"backup:{backup_id}", "-o", str(out)], env, 0)
        assert done.returncode == 0, done.stderr
        files = [out] if fmt == "custom" else list(out.iterdir())
        assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files if p.is_file())
        if fmt == "directory":
            assert stat.S_IMODE(out.stat().st_mode) == 0o700
