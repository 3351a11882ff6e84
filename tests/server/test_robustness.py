"""Every interface under bad input and failure: the MCP client, raw stdio and the CLI.

One error model: invalid input, configuration and unreachable stores are MCP error
results (isError, a message and a fix; CLI exit 2); a check that completed with a
bad finding is a normal result with its verdict (CLI exit 1 warn, 2 fail).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import asyncpg
import pytest
from mcp import Client
from qdrant_client import QdrantClient
from support import EXE, EngramDB, arun_cli, engram_env, fingerprints, run_cli, wait_listening

from engram_recovery.core.repository import points as restore_checks
from engram_recovery.core.settings import load_settings
from engram_recovery.server import cli
from engram_recovery.server.app import build_server

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "cron", "version": "1"}}}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def _bare_env() -> dict[str, str]:
    return {"PATH": os.environ["PATH"]}


def _text(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content)


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


async def _pending_embed_jobs(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM oban_jobs WHERE worker = 'Engram.Workers.EmbedNote'"))
    finally:
        await conn.close()


# --- strict inputs ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_mcp_arguments_are_strict_nothing_is_coerced_and_nothing_runs(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path)
    repo = tmp_path / "repo"
    jobs = await _pending_embed_jobs(engram_db.dsn)
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("run_backup", {"dry_run": "false"}, "dry_run takes true or false, got a string"),
        ("reindex_qdrant", {"mode": "stale", "confirm": "yes"}, "confirm takes true or false, got a string"),
        ("reindex_qdrant", {"mode": "stale", "confirm": 1}, "confirm takes true or false, got an integer"),
        ("reindex_qdrant", {"mode": "stale", "confirm": "1"}, "confirm takes true or false"),
        ("reindex_qdrant", {"mode": "stale", "confirm": "on"}, "confirm takes true or false"),
        ("reindex_qdrant", {"mode": "everything"}, "mode takes one of all, missing, stale"),
        ("restore_drill", {"sample_notes": 3.0}, "sample_notes takes a whole number from 1 to 10000"),
        ("restore_drill", {"sample_notes": "3"}, "sample_notes takes a whole number"),
        ("restore_drill", {"sample_notes": True}, "got a boolean"),
        ("backup_status", {"deep": None}, "deep takes true or false, got null"),
        ("plan_restore", {"recovery_point": 5}, "recovery_point takes a string, got an integer"),
        ("backup_status", {"verbose": True}, "'verbose' is not an argument of backup_status"),
    ]
    async with Client(build_server(load_settings(environ=env))) as client:
        for tool, arguments, expected in cases:
            result = await client.call_tool(tool, arguments)
            text = _text(result)
            assert result.is_error, (tool, arguments)
            assert expected in text, text
            assert "\nFix: send only these arguments" in text and "Error executing tool" not in text
    assert _listing(repo) == [] or not any(p.startswith("backups/") for p in _listing(repo))
    assert await _pending_embed_jobs(engram_db.dsn) == jobs


@pytest.mark.anyio
async def test_cli_arg_values_are_parsed_by_the_schema_and_bad_or_repeated_ones_refused(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path)
    jobs = await _pending_embed_jobs(engram_db.dsn)
    refused = [
        (["--arg", "mode=stale", "--arg", 'confirm="yes"'], "confirm takes true or false"),
        (["--arg", "mode=stale", "--arg", "confirm=1"], "confirm takes true or false"),
        (["--arg", "mode=stale", "--arg", "confirm=on"], "confirm takes true or false"),
        (["--arg", "mode=stale", "--arg", "mode=all"], "--arg mode is given more than once"),
        (["--arg", "mode=sometimes"], "mode takes one of all, missing, stale"),
        (["--arg", "colour=blue"], "'colour' is not an argument of reindex_qdrant"),
    ]
    for args, expected in refused:
        result = await arun_cli(["call", "reindex_qdrant", *args], env)
        assert result.returncode == 2, result
        assert expected in result.stderr and "Fix:" in result.stderr and "Traceback" not in result.stderr
        assert result.stdout == ""
    assert await _pending_embed_jobs(engram_db.dsn) == jobs
    # Good values of each type go through: a boolean, an enum, and text that looks like a number stays text.
    dry = await arun_cli(["call", "reindex_qdrant", "--arg", "mode=stale", "--arg", "confirm=false"], env)
    assert json.loads(dry.stdout)["dry_run"] is True, dry.stderr
    drill = await arun_cli(["call", "restore_drill", "--arg", "sample_notes=2.5"], env)
    assert drill.returncode == 2 and "sample_notes takes a whole number from 1 to 10000" in drill.stderr
    planned = await arun_cli(["call", "plan_restore", "--arg", "app_version=0.18"], env)
    assert "app_version" not in planned.stderr  # parsed as the string "0.18", not the number 0.18
    assert await _pending_embed_jobs(engram_db.dsn) == jobs


# --- stdio answers every line and ends ------------------------------------------------------------


def _lines(*messages: Any) -> str:
    return "".join((m if isinstance(m, str) else json.dumps(m)) + "\n" for m in messages)


@pytest.mark.anyio
async def test_stdio_answers_every_invalid_line_with_its_code_and_exits_after_eof(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    script = _lines(
        INIT, INITIALIZED,
        "this is not json",
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": [1]},
        {"id": 3, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": {"an": "object"}, "method": "tools/list"},
        [1, 2],
        {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": 5}},
        {"jsonrpc": "2.0", "id": 6, "method": "no/such/method"},
        {"jsonrpc": "2.0", "method": "notifications/whatever", "params": [1]},
        {"jsonrpc": "2.0", "id": "seven", "method": "tools/call",
         "params": {"name": "backup_status", "arguments": {"deep": "false"}}},
        {"jsonrpc": "2.0", "id": 8, "method": "tools/list"},
    )
    started = time.monotonic()
    result = await arun_cli(["serve"], engram_env(engram_db, tmp_path), script)
    elapsed = time.monotonic() - started
    assert result.returncode == 0 and "Traceback" not in result.stderr + result.stdout
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    codes = [(r["id"], r.get("error", {}).get("code")) for r in replies]
    assert sorted(codes, key=str) == sorted([
        (1, None), (None, -32700), (2, -32602), (3, -32600), (None, -32600), (None, -32600), (5, -32602),
        (6, -32601), ("seven", None), (8, None),
    ], key=str)
    seven = next(r for r in replies if r["id"] == "seven")["result"]
    assert seven["isError"] and "deep takes true or false" in seven["content"][0]["text"]
    assert elapsed < 30


@pytest.mark.anyio
async def test_stdio_answers_a_request_the_sdk_leaves_silent_and_still_ends(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    # The SDK answers nothing to a request its client cancelled: a script reading one answer per request
    # would wait for ever, and EOF would be held back for ever.
    script = _lines(INIT, INITIALIZED,
                    {"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "backup_status"}},
                    {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 6}})
    started = time.monotonic()
    result = await arun_cli(["serve"], engram_env(engram_db, tmp_path), script)
    assert result.returncode == 0 and time.monotonic() - started < 30
    replies = {r["id"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert set(replies) == {1, 6}
    assert replies[6]["error"] == {"code": -32603, "message": "Request cancelled by the client"}
    assert "Traceback" not in result.stderr


@pytest.mark.anyio
async def test_stdio_without_configuration_starts_lists_tools_and_each_call_names_the_variable() -> None:
    script = _lines(INIT, INITIALIZED, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                    {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "run_backup"}})
    result = await arun_cli(["serve"], _bare_env(), script)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    replies = {r["id"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert replies[1]["result"]["serverInfo"]["name"] == "engram-recovery"
    assert {t["name"] for t in replies[2]["result"]["tools"]} >= {"backup_status", "run_backup", "reindex_qdrant"}
    call = replies[3]["result"]
    assert call["isError"] and "DATABASE_URL is not set\nFix: set DATABASE_URL" in call["content"][0]["text"]


def test_version_help_and_tools_need_no_settings() -> None:
    version = run_cli(["--version"], _bare_env())
    assert version.returncode == 0 and version.stdout.startswith("engram-recovery ")
    assert run_cli(["--help"], _bare_env()).returncode == 0
    listed = run_cli(["tools"], _bare_env())
    assert listed.returncode == 0 and "backup_status" in listed.stdout and "reindex_qdrant" in listed.stdout


# --- every failure is a cause ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_connection_failures_are_each_named_with_their_own_fix(
    engram_db: EngramDB, tmp_path: Path, admin_dsn: str
) -> None:
    base = admin_dsn.rsplit("/", 1)[0]
    host = base.split("@", 1)[1]
    cases = [
        (f"{base}/no_such_database_9", "has no database of that name", "database name at the end of DATABASE_URL"),
        (f"postgresql://no_such_role_9@{host}/{engram_db.name}", "has no role 'no_such_role_9'",
         "check the user name in DATABASE_URL"),
        ("postgresql://engram@127.0.0.1:1/engram", "connection refused", "start PostgreSQL"),
        ("postgresql://engram@postgres:5432/engram", "does not resolve from this machine",
         "publish the database port"),
    ]
    for url, cause, fix in cases:
        env = engram_env(engram_db, tmp_path, DATABASE_URL=url)
        async with Client(build_server(load_settings(environ=env))) as client:
            result = await client.call_tool("run_backup", {"dry_run": True})
        text = _text(result)
        assert result.is_error and cause in text and fix in text, text
        assert "Error executing tool" not in text
        cli = await arun_cli(["call", "backup_status"], env)
        check = next(c for c in json.loads(cli.stdout)["checks"] if c["component"] == "postgres")
        assert cli.returncode == 2 and check["status"] == "fail" and cause in check["summary"]
        assert "Traceback" not in cli.stderr


@pytest.mark.anyio
async def test_unexpected_exception_is_one_line_and_a_fix_traceback_only_in_the_debug_log(
    engram_db: EngramDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*_: object) -> None:
        raise ZeroDivisionError("an internal slip")

    monkeypatch.setattr(restore_checks, "resolve", broken)
    caplog.set_level(logging.DEBUG, logger="engram_recovery")
    env = engram_env(engram_db, tmp_path)
    async with Client(build_server(load_settings(environ=env))) as client:
        result = await client.call_tool("plan_restore", {})
    text = _text(result)
    assert result.is_error
    assert text.splitlines()[0] == "plan_restore failed unexpectedly: ZeroDivisionError: an internal slip"
    assert text.splitlines()[1].startswith("Fix: run the same call with `engram-recovery --debug")
    assert "Error executing tool" not in text and "Traceback" not in text
    assert any(r.exc_info and r.levelname == "DEBUG" for r in caplog.records)


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    for handler in root.handlers[:]:
        if handler not in saved[0]:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(saved[1])


def test_cli_shows_a_traceback_only_with_debug_or_in_the_log_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], root_logging: None
) -> None:
    def broken(_: object) -> int:
        raise ZeroDivisionError("an internal slip")

    monkeypatch.setattr(cli, "_tools", broken)
    assert cli.main(["tools"]) == 2
    plain = capsys.readouterr()
    assert plain.err.startswith("engram-recovery: tools failed unexpectedly: ZeroDivisionError: an internal slip\n")
    assert "Fix: run the same call with `engram-recovery --debug" in plain.err and "Traceback" not in plain.err
    log = tmp_path / "debug.log"
    assert cli.main(["--log-file", str(log), "tools"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert "Traceback" in log.read_text() and "ZeroDivisionError: an internal slip" in log.read_text()
    assert cli.main(["--debug", "tools"]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.anyio
async def test_statement_timeout_is_named_with_its_fix(engram_db: EngramDB) -> None:
    from engram_recovery.core.stores import postgres

    conn = await asyncpg.connect(engram_db.dsn)
    try:
        await conn.execute("SET statement_timeout = 10")
        with pytest.raises(asyncpg.QueryCanceledError) as raised:
            await conn.execute("SELECT pg_sleep(1)")
    finally:
        await conn.close()
    error = postgres.describe(raised.value)
    assert "PostgreSQL cancelled a statement" in error.message and "statement_timeout" in error.hint


# --- configuration messages -----------------------------------------------------------------------


@pytest.mark.parametrize(("url", "cause", "fix"), [
    ("postgresql://u:sekrit-9@[::1/db", "DATABASE_URL is not a valid URL (Invalid IPv6 URL)", "brackets"),
    ("mysql://u:sekrit-9@h/db", "DATABASE_URL is a mysql:// URL, not a postgresql:// one",
     "point DATABASE_URL at Engram's PostgreSQL database"),
    ("postgresql://u:sekrit-9@h:99999/db", "DATABASE_URL is not a valid URL (Port out of range", "HOST:5432"),
])
@pytest.mark.parametrize("args", [["config"], ["call", "backup_status"]], ids=["config", "call"])
def test_malformed_database_url_names_the_variable_and_the_fix(args: list[str], url: str, cause: str, fix: str
                                                                ) -> None:  # fmt: skip
    result = run_cli(args, _bare_env() | {"DATABASE_URL": url})
    assert result.returncode == 2 and result.stdout == ""
    first, second = result.stderr.strip().splitlines()
    assert first == f"engram-recovery: {cause}" or first.startswith(f"engram-recovery: {cause}")
    assert second.startswith("Fix: ") and fix in second
    assert "sekrit-9" not in result.stderr and "Traceback" not in result.stderr


# --- one error model: plan_restore and restore_drill alike ----------------------------------------


@pytest.mark.anyio
async def test_a_bad_recovery_point_is_the_same_error_for_plan_restore_and_restore_drill(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path)
    assert (await arun_cli(["call", "run_backup"], env)).returncode in (0, 1)
    texts = []
    async with Client(build_server(load_settings(environ=env))) as client:
        for tool in ("plan_restore", "restore_drill"):
            result = await client.call_tool(tool, {"recovery_point": "no-such-point"})
            assert result.is_error and result.structured_content is None
            texts.append(_text(result))
    assert texts[0] == texts[1] and texts[0].startswith("no complete backup matches 'no-such-point'\nFix: ")
    for tool in ("plan_restore", "restore_drill"):
        cli = await arun_cli(["call", tool, "--arg", "recovery_point=no-such-point"], env)
        assert cli.returncode == 2 and "no complete backup matches" in json.loads(cli.stdout)["error"]
    # A completed plan whose worst finding is a warning exits 1 (here: the app version was not given).
    warn = await arun_cli(["call", "plan_restore", "--arg", "target_database=restore_target_9"], env)
    assert json.loads(warn.stdout)["verdict"] == "warn" and warn.returncode == 1


# --- optional stores degrade ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_locked_embedded_qdrant_is_only_a_warning_and_the_server_releases_it_between_calls(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    folder = tmp_path / "qdrant"
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_QDRANT_PATH=str(folder))
    server = build_server(load_settings(environ=env))
    async with Client(server) as client:
        holder = QdrantClient(path=str(folder))  # another process's server, as the demo's
        try:
            backup = await client.call_tool("run_backup", {})
            status = await client.call_tool("backup_status", {})
            plan = await client.call_tool("plan_restore", {"target_database": "restore_target_9"})
        finally:
            holder.close()
        assert not backup.is_error and backup.structured_content is not None
        assert backup.structured_content["backup_id"] and backup.structured_content["verified"]
        assert any("embedded Qdrant folder" in w and "in use by another process" in w
                   for w in backup.structured_content["warnings"])
        assert status.structured_content is not None
        qdrant = next(c for c in status.structured_content["checks"] if c["component"] == "qdrant")
        assert qdrant["status"] == "warn" and "in use by another process" in qdrant["summary"]
        assert not plan.is_error
        # The folder is free again now that no call runs: another process may open it while this server serves.
        await client.call_tool("backup_status", {})
        other = await anyio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-c", f"from qdrant_client import QdrantClient; QdrantClient(path={str(folder)!r})"],
            capture_output=True, text=True, timeout=60))
        assert other.returncode == 0, other.stderr[-500:]


@pytest.mark.anyio
async def test_nothing_changes_when_every_call_is_refused(engram_db: EngramDB, tmp_path: Path) -> None:
    env = engram_env(engram_db, tmp_path)
    before = await fingerprints(engram_db.dsn)
    async with Client(build_server(load_settings(environ=env))) as client:
        for tool in ("run_backup", "reindex_qdrant", "restore_drill"):
            assert (await client.call_tool(tool, {"confirm": "true", "dry_run": 0})).is_error
    assert await fingerprints(engram_db.dsn) == before
    assert _listing(tmp_path / "repo") == []


@pytest.mark.anyio
async def test_the_cron_line_runs_beside_a_serving_http_server_that_uses_the_embedded_qdrant(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    import socket

    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    token = "robustness-token-0123456789abcdef"
    # With a backup key, as the README's deployment has: a clean run is exit 0, so a Qdrant warning would show.
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_QDRANT_PATH=str(tmp_path / "qdrant"),
                     ENGRAM_RECOVERY_HTTP_TOKEN=token,
                     ENGRAM_RECOVERY_BACKUP_KEY=base64.b64encode(secrets.token_bytes(32)).decode())
    server = await anyio.open_process([EXE, "serve", "--http", "--port", str(port)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_listening(port, server)
        async with httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}) as http, \
                Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http)) as client:
            served = await client.call_tool("backup_status", {})  # the server has opened the Qdrant folder
            assert served.structured_content is not None
            # As the README's cron line does, while the server keeps serving.
            backup = await arun_cli(["call", "run_backup"], env)
            status = await arun_cli(["call", "backup_status"], env)
            assert (await client.call_tool("backup_status", {})).structured_content is not None
    finally:
        server.terminate()
        with anyio.fail_after(30):
            await server.wait()
    assert backup.returncode == 0, backup.stdout + backup.stderr
    assert json.loads(backup.stdout)["verified"]
    qdrant = next(c for c in json.loads(status.stdout)["checks"] if c["component"] == "qdrant")
    assert "in use by another process" not in qdrant["summary"]


@pytest.mark.anyio
@pytest.mark.skipif(shutil.which("npx") is None, reason="Node.js (npx) is not installed")
async def test_the_official_inspector_without_settings_shows_the_configuration_error() -> None:
    # The inspector passes the server only the environment given with -e: here, none.
    argv = ["npx", "-y", "@modelcontextprotocol/inspector@2.12.0", "--cli", EXE, "serve",
            "--method", "tools/call", "--tool-name", "backup_status"]
    env = os.environ | {"npm_config_update_notifier": "false"}
    called = await anyio.to_thread.run_sync(
        lambda: subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env))
    # The inspector exits 5 for a tool result with isError, and prints the result itself on stdout.
    assert called.returncode == 5, called.stderr[-2000:]
    result = json.loads(called.stdout)
    assert result["isError"] is True
    assert "DATABASE_URL is not set\nFix: set DATABASE_URL" in result["content"][0]["text"]
