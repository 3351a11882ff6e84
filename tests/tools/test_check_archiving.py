"""check_archiving against real PostgreSQL 18 clusters: archiving off fails with the exact fixes, which work when
applied; archiving on with Barman's receiver streaming is ok; through the MCP client and the CLI's `call`."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio.to_thread
import asyncpg
import pytest
from archiving_support import (
    ROLE,
    SLOT,
    archive_cluster,
    barman_config,
    barman_for,
    create_replication_role,
    restart,
)
from mcp import Client
from support import arun_cli

from engram_recovery.core.archive.prerequisites import ServerFacts, judge
from engram_recovery.core.settings import load_settings
from engram_recovery.server.app import build_server

# What Docker's postgres image writes: nothing for the replication pseudo-database over TCP.
DOCKER_HBA = "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all all scram-sha-256\n"
ARCHIVING_OFF = ("wal_level = minimal", "max_wal_senders = 0", "max_replication_slots = 0")


def env_for(url: str) -> dict[str, str]:
    return {"DATABASE_URL": url, "PATH": os.environ.get("PATH", "")}


async def check(url: str) -> dict[str, Any]:
    async with Client(build_server(load_settings(environ=env_for(url)))) as client:
        result = await client.call_tool("check_archiving", {})
    assert not result.is_error and result.structured_content is not None
    body: dict[str, Any] = result.structured_content
    return body


def by_name(result: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["status"] for c in result["checks"]}


@pytest.mark.anyio
async def test_archiving_off_fails_with_a_compose_override_and_host_sql_that_make_it_work() -> None:
    with archive_cluster(conf=ARCHIVING_OFF, hba=DOCKER_HBA) as archive:
        result = await check(archive.url)
        assert result["verdict"] == "fail" and result["server_version"].startswith("18.")
        assert by_name(result) == {
            "wal_level": "fail", "max_wal_senders": "fail", "max_replication_slots": "fail", "archive_mode": "ok",
            "archive_timeout": "warn", "replication_role": "fail", "replication_slot": "warn", "pg_hba": "fail",
            "summarize_wal": "ok",
        }  # fmt: skip
        remedies = result["remedies"]
        assert remedies["restart_needed"] is True
        assert ("    command: postgres -c wal_level=replica -c max_wal_senders=10 -c max_replication_slots=10 "
                "-c archive_timeout=60\n") in remedies["compose_override"]  # fmt: skip
        assert remedies["compose_commands"][0].startswith("docker compose up -d postgres")
        assert f'psql -U postgres -d postgres -c "CREATE ROLE {ROLE} WITH LOGIN REPLICATION;"' in " ".join(
            remedies["compose_commands"])  # fmt: skip
        host = remedies["host_commands"]
        assert host[:5] == ["ALTER SYSTEM SET wal_level = 'replica';", "ALTER SYSTEM SET max_wal_senders = '10';",
                            "ALTER SYSTEM SET max_replication_slots = '10';",
                            "ALTER SYSTEM SET archive_timeout = '60';",
                            "# restart PostgreSQL: systemctl restart postgresql, or pg_ctl restart -D "
                            f"{archive.pg.datadir}"]  # fmt: skip

        # Apply the bare-host remedies as printed: SQL lines as they are, the restart, the pg_hba line.
        conn = await asyncpg.connect(archive.url)
        try:
            for line in host[:4]:
                await conn.execute(line)
        finally:
            await conn.close()
        restart(archive)
        conn = await asyncpg.connect(archive.url)
        try:
            for line in host[5:]:
                if line.startswith("# add to pg_hba.conf"):
                    with (archive.pg.datadir / "pg_hba.conf").open("a") as hba:
                        hba.write(line.rsplit(": ", 1)[1].replace("scram-sha-256", "trust") + "\n")
                elif not line.startswith(("#", "\\")):
                    await conn.execute(line)
        finally:
            await conn.close()
        fixed = await check(archive.url)
        # Only the receiver is missing now: the slot keeps WAL for it until Barman connects.
        assert fixed["verdict"] == "warn" and {k: v for k, v in by_name(fixed).items() if v != "ok"} == {
            "replication_slot": "warn"}  # fmt: skip
        assert "no receiver is connected" in fixed["summary"]


@pytest.mark.anyio
async def test_archiving_on_with_barman_streaming_is_ok_and_says_nothing_needs_changing(tmp_path: Path) -> None:
    with archive_cluster("archive_timeout=60") as archive:
        await create_replication_role(archive.url)
        barman = barman_for(barman_config(archive, tmp_path / "barman"))
        await barman.cron()  # connects pg_receivewal to the slot
        try:
            result: dict[str, Any] = {}
            with anyio.fail_after(30):
                # pg_receivewal connects a moment after cron returns.
                while result.get("verdict") != "ok":
                    result = await check(archive.url)
                    await anyio.sleep(0.2)
            # Engram's role in a production-style deployment is no superuser: pg_hba cannot be read, and says so.
            limited = await check(archive.url.replace("postgres@", "barman@"))
        finally:
            await barman.stop_receiving()
    assert limited["verdict"] == "warn" and {k: v for k, v in by_name(limited).items() if v != "ok"} == {
        "pg_hba": "warn"}  # fmt: skip
    assert "pg_hba.conf could not be read" in limited["summary"] and limited["remedies"]["compose_override"] is None
    assert result["summary"] == "ready for streaming archiving", result["summary"]
    assert result["slot_name"] == SLOT and set(by_name(result).values()) == {"ok"}
    assert result["remedies"] == {"restart_needed": False, "compose_override": None, "compose_commands": [],
                                  "host_commands": []}  # fmt: skip


@pytest.mark.anyio
async def test_the_cli_prints_the_fixes_as_json_and_exits_2_on_a_failed_check() -> None:
    with archive_cluster("wal_level=minimal", "max_wal_senders=0") as archive:
        result = await arun_cli(["call", "check_archiving"], env_for(archive.url))
    assert result.returncode == 2, result.stderr
    body = json.loads(result.stdout)
    assert body["verdict"] == "fail" and "ALTER SYSTEM SET wal_level = 'replica';" in body["remedies"]["host_commands"]


def test_a_lost_slot_and_a_failing_archive_command_are_named_with_their_fix() -> None:
    facts = ServerFacts(
        settings={"wal_level": "replica", "max_wal_senders": "10", "max_replication_slots": "10",
                  "archive_mode": "on", "archive_command": "false", "archive_timeout": "60"},
        role={"rolreplication": False, "rolcanlogin": True, "rolsuper": True}, slots_used=1,
        slot={"slot_type": "physical", "active": False, "wal_status": "lost", "retained_bytes": None},
        hba_rules=[{"line_number": 3, "type": "host", "database": ["replication"], "user_name": ["all"],
                    "address": "10.0.0.0", "auth_method": "reject", "error": None}],
        archiver={"last_failed_time": datetime(2026, 11, 25, 9, 0, tzinfo=UTC), "last_archived_time": None,
                  "last_failed_wal": "000000010000000000000003"},
    )  # fmt: skip
    checks = {c.name: c for c in judge(facts, ROLE, SLOT)}
    assert checks["replication_slot"].status == "fail" and "lost WAL" in checks["replication_slot"].summary
    assert checks["archive_mode"].status == "warn" and "000000010000000000000003" in checks["archive_mode"].summary
    assert checks["pg_hba"].status == "fail" and "line 3 rejects" in checks["pg_hba"].summary
    assert checks["replication_role"].status == "ok"  # a superuser may replicate without the attribute
