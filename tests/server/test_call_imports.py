"""`call` imports only what its tool needs: a cron line must not pay for the MCP SDK or unused clients.

Checked without timing: the real `call backup_status` process runs under `python -X importtime`, which
names every module it imports (bench/bench_cli.py measures what this saves).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio.to_thread
import pytest
from support import EngramDB, engram_env

NEVER_FOR_STATUS = ("mcp", "mcp_types", "boto3", "aioboto3", "aiobotocore", "botocore", "qdrant_client", "uvicorn",
                    "starlette", "zstandard")


def _imported_by_call(env: dict[str, str]) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "engram_recovery.server.cli", "call", "backup_status", "--json"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return {name.split(".")[0] for name in modules}, proc


@pytest.mark.anyio
async def test_call_backup_status_on_a_database_backend_imports_no_mcp_s3_or_qdrant(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    # Attachments in PostgreSQL, a local repository, no Qdrant: nothing here needs boto, Qdrant or MCP.
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_QDRANT_PATH="")
    top, proc = await anyio.to_thread.run_sync(_imported_by_call, env)
    assert json.loads(proc.stdout)["verdict"] == "fail"  # the tool ran: no backup yet
    assert "asyncpg" in top and "engram_recovery" in top
    assert sorted(top & set(NEVER_FOR_STATUS)) == []


@pytest.mark.anyio
async def test_call_backup_status_imports_the_qdrant_client_when_qdrant_is_configured(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    # The other side of the lazy import: configured, Qdrant is still checked (and still not MCP).
    env = engram_env(engram_db, tmp_path)
    top, proc = await anyio.to_thread.run_sync(_imported_by_call, env)
    checks = {check["component"]: check for check in json.loads(proc.stdout)["checks"]}
    assert "qdrant_client" in top and "mcp" not in top
    assert "not configured" not in checks["qdrant"]["summary"]
