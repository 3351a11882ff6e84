"""scripts/mcp-json writes an mcp.json whose absolute paths start the server from any directory."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import anyio.to_thread
import pytest
from support import EngramDB, engram_env

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "mcp-json"
CLEAN = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/bin:/bin"}  # a fresh shell's environment


def _session() -> str:
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "desktop", "version": "1"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "backup_status", "arguments": {}}},
    ]
    return "".join(json.dumps(m) + "\n" for m in messages)


def _script(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, env=CLEAN, timeout=60)


def _start_from(config: dict[str, object], cwd: Path) -> subprocess.CompletedProcess[str]:
    server = config["mcpServers"]["engram-recovery"]  # type: ignore[index]
    return subprocess.run([server["command"], *server["args"]], input=_session(), capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=CLEAN)  # fmt: skip


@pytest.mark.anyio
async def test_the_generated_mcp_json_is_absolute_and_serves_from_another_directory(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path)
    env_file = tmp_path / "engram.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items() if k != "PATH"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    made = await anyio.to_thread.run_sync(_script, ["../engram.env"], elsewhere)
    assert made.returncode == 0, made.stderr
    config = json.loads(made.stdout)
    server = config["mcpServers"]["engram-recovery"]
    assert Path(server["command"]).is_absolute() and server["args"] == ["--env-file", str(env_file), "serve"]
    answered = await anyio.to_thread.run_sync(_start_from, config, Path("/"))
    assert answered.returncode == 0, answered.stderr
    reply = json.loads(answered.stdout.splitlines()[-1])
    assert reply["id"] == 2 and reply["result"]["structuredContent"]["verdict"] in ("ok", "warn", "fail")

    missing = await anyio.to_thread.run_sync(_script, [str(tmp_path / "nope.env")])
    assert missing.returncode == 2 and "no env file" in missing.stderr and missing.stdout == ""
