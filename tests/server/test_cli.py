"""The CLI: `config` redacts, `call` prints JSON with exit codes cron can act on, bad settings never trace back."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from support import EXE, EngramDB, arun_cli, engram_env, read_terminal, run_cli


def test_config_prints_effective_settings_with_every_secret_redacted(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "DATABASE_URL": "postgresql://engram:db-password-123@127.0.0.1/engram",
        "ENCRYPTION_MASTER_KEY": "bWFzdGVyLWtleS1zZWNyZXQtdmFsdWUtMTIzNDU2Nzg=",
        "ENGRAM_RECOVERY_HTTP_TOKEN": "http-token-abcdefghijkl",
    }
    result = run_cli(["config"], env)
    assert result.returncode == 0
    shown = json.loads(result.stdout)
    assert shown["ENCRYPTION_MASTER_KEY"] == "***"
    assert shown["DATABASE_URL"] == "postgresql://engram:***@127.0.0.1/engram"
    for secret in ("db-password-123", env["ENCRYPTION_MASTER_KEY"], env["ENGRAM_RECOVERY_HTTP_TOKEN"]):
        assert secret not in result.stdout + result.stderr


def test_malformed_setting_gives_one_message_and_exit_2_without_traceback() -> None:
    result = run_cli(["call", "backup_status"], {"PATH": os.environ["PATH"], "DATABASE_URL": "mysql://nope/x"})
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr and "Fix:" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.anyio
async def test_call_prints_json_and_exit_code_follows_the_verdict(engram_db: EngramDB, tmp_path: Path) -> None:
    # No backup exists yet, so the verdict is 'fail' and cron must see exit code 2.
    result = await arun_cli(["call", "backup_status"], engram_env(engram_db, tmp_path))
    body = json.loads(result.stdout)
    assert body["verdict"] == "fail"
    assert result.returncode == 2
    # stderr is not a terminal here: no progress line, so cron mail stays clean.
    assert result.stderr == ""


@pytest.mark.anyio
async def test_call_with_bad_argument_is_a_failure_with_a_message(engram_db: EngramDB, tmp_path: Path) -> None:
    result = await arun_cli(["call", "backup_status", "--arg", "deep=maybe"], engram_env(engram_db, tmp_path))
    assert result.returncode == 2
    assert "deep takes true or false" in result.stderr and result.stdout == ""
    bad = await arun_cli(["call", "backup_status", "--arg", "novalue"], engram_env(engram_db, tmp_path))
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


@pytest.mark.anyio
async def test_call_shows_live_progress_when_stderr_is_a_terminal(engram_db: EngramDB, tmp_path: Path) -> None:
    proc, seen = await anyio.to_thread.run_sync(_call_on_a_terminal, engram_env(engram_db, tmp_path))
    assert b"backup_status: " in seen and b"checked" in seen
    assert json.loads(proc.stdout)["verdict"] in ("ok", "warn", "fail")


def _call_on_a_terminal(env: dict[str, str]) -> tuple[subprocess.CompletedProcess[bytes], bytes]:
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [EXE, "call", "backup_status"], stdout=subprocess.PIPE, stderr=follower, timeout=60, env=env,
        )
        os.close(follower)
        seen = read_terminal(leader)
    finally:
        os.close(leader)
    return proc, seen


def test_read_only_mode_registers_no_tool_that_writes(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "DATABASE_URL": "postgresql://x@127.0.0.1/x",
           "ENGRAM_RECOVERY_ACCESS": "read-only"}
    listed = run_cli(["tools"], env)
    assert "backup_status" in listed.stdout and "plan_restore" in listed.stdout
    assert "run_backup" not in listed.stdout and "reindex_qdrant" not in listed.stdout
    refused = run_cli(["call", "run_backup"], env)
    assert refused.returncode == 2 and "read-only" in refused.stderr
