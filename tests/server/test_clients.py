"""Real clients over stdio: a scripted JSON-RPC session (cron) and the official MCP inspector CLI."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from support import EXE, EngramDB, engram_env

INSPECTOR = "@modelcontextprotocol/inspector@2.12.0"


async def _in_thread(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(functools.partial(subprocess.run, argv, **kwargs))


def _session(*calls: dict[str, object]) -> str:
    messages: list[dict[str, object]] = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "cron", "version": "1"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
    ]
    for number, call in enumerate(calls, start=3):
        messages.append({"jsonrpc": "2.0", "id": number, "method": "tools/call", "params": call})
    return "".join(json.dumps(m) + "\n" for m in messages)


@pytest.mark.anyio
async def test_scripted_jsonrpc_session_over_stdio_answers_everything_then_exits_cleanly(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    script = _session({"name": "backup_status", "arguments": {}}, {"name": "backup_status", "arguments": {"x": 1}})
    result = await _in_thread(
        [EXE, "serve"], input=script, capture_output=True, text=True, timeout=60,
        env=engram_env(engram_db, tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    replies = {m["id"]: m for m in map(json.loads, result.stdout.splitlines())}
    assert set(replies) == {1, 2, 3, 4}
    assert {t["name"] for t in replies[2]["result"]["tools"]} >= {"backup_status", "run_backup"}
    status = replies[3]["result"]
    assert status["isError"] is False
    assert status["structuredContent"]["verdict"] in ("ok", "warn", "fail")
    assert {c["component"] for c in status["structuredContent"]["checks"]} >= {"postgres", "master_key"}
    # An unknown argument is the caller's mistake: a tool error naming it, not a crash.
    assert replies[4]["result"]["isError"] is True
    assert "x" in replies[4]["result"]["content"][0]["text"]


@pytest.mark.anyio
@pytest.mark.skipif(shutil.which("npx") is None, reason="Node.js (npx) is not installed")
async def test_official_inspector_cli_lists_the_tools_and_gets_a_verdict(engram_db: EngramDB, tmp_path: Path) -> None:
    env_args: list[str] = []
    for key, value in engram_env(engram_db, tmp_path).items():
        if key != "PATH":
            env_args += ["-e", f"{key}={value}"]
    base = ["npx", "-y", INSPECTOR, "--cli", *env_args, EXE, "serve"]
    env = os.environ | {"npm_config_update_notifier": "false"}
    listed = await _in_thread([*base, "--method", "tools/list"], capture_output=True, text=True, timeout=300, env=env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    tools = {t["name"]: t for t in json.loads(listed.stdout)["tools"]}
    assert {"backup_status", "run_backup", "plan_restore", "reindex_qdrant"} <= set(tools)
    for tool in tools.values():
        assert tool["title"] and tool["description"] and tool["outputSchema"]
        assert set(tool["annotations"]) >= {"readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint"}
    called = await _in_thread(
        [*base, "--method", "tools/call", "--tool-name", "backup_status"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert called.returncode == 0, called.stderr[-2000:]
    result = json.loads(called.stdout)
    assert result["structuredContent"]["verdict"] in ("ok", "warn", "fail")
    master = next(c for c in result["structuredContent"]["checks"] if c["component"] == "master_key")
    assert master["details"]["canary"] == "match"
