"""backup_status against real PostgreSQL, SeaweedFS and Qdrant (local mode): every check, every failure mode."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from mcp import Client
from support import EngramDB, engram_env, free_port, make_engram_db, new_bucket, run_tool, storage_env

from engram_recovery import testbed
from engram_recovery.core.engram import crypto as engram_crypto
from engram_recovery.core.settings import load_settings
from engram_recovery.server.app import build_server
from engram_recovery.testbed.seaweedfs import SeaweedFS
from engram_recovery.tools.backup_status import BackupStatusInput, BackupStatusResult, Check, backup_status


async def status(env: dict[str, str], deep: bool = False) -> BackupStatusResult:
    return await run_tool(backup_status, BackupStatusInput(deep=deep), env)


def check(result: BackupStatusResult, component: str) -> Check:
    return next(c for c in result.checks if c.component == component)


@pytest.mark.anyio
async def test_a_pg_dump_that_cannot_dump_the_server_fails_the_postgres_check_with_a_fix(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    old = tmp_path / "pg_dump"
    old.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 12.22'\n")
    old.chmod(0o755)
    pg = check(await status(engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_PG_DUMP=str(old))), "postgres")
    assert pg.status == "fail" and pg.details["pg_dump"]["usable"] is False
    assert f"pg_dump 12 ({old}, set by ENGRAM_RECOVERY_PG_DUMP) cannot dump a PostgreSQL" in pg.summary
    assert "Fix: unset ENGRAM_RECOVERY_PG_DUMP to use the bundled pg_dump 18" in pg.summary


@pytest.mark.anyio
async def test_without_a_barman_configuration_the_archive_check_is_a_neutral_ok(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    result = await status(engram_env(engram_db, tmp_path))
    archive = check(result, "archive")
    assert archive.status == "ok" and archive.details == {"configured": False}
    assert "not configured (ENGRAM_RECOVERY_BARMAN_CONFIG unset)" in archive.summary
    assert result.archive.configured is False and result.archive.window is None
    assert "archive" not in result.summary


@pytest.mark.anyio
async def test_healthy_database_passes_postgres_and_master_key_checks(engram_db: EngramDB, tmp_path: Path) -> None:
    result = await status(engram_env(engram_db, tmp_path))
    pg = check(result, "postgres")
    assert pg.status == "ok", pg.summary
    assert pg.details["sees_all_rows"] is True
    # Which pg_dump run_backup would use, and that it can dump this server.
    dump = pg.details["pg_dump"]
    server_major = int(pg.details["server_version"].split(".")[0])
    assert dump["usable"] is True and dump["major"] >= dump["needed_major"] == server_major
    assert dump["origin"] in ("PATH", "bundled") and dump["path"] in pg.summary
    assert dump["version"].startswith("pg_dump (PostgreSQL)")
    assert pg.details["wal"]["archiving"] is False
    assert "row_estimates" in pg.estimates
    key = check(result, "master_key")
    assert key.status == "ok", key.summary
    assert key.details["canary"] == "match"
    assert key.details["fingerprint"] == engram_crypto.key_fingerprint(engram_db.master_key)
    # No backup was ever taken: recovery is impossible, so the verdict is a failure that says so.
    assert check(result, "last_backup").status == "fail"
    assert "no backup yet" in check(result, "last_backup").summary
    assert result.verdict == "fail"
    assert check(result, "restore_drill").status == "warn"


@pytest.mark.anyio
async def test_the_key_never_appears_in_the_result(engram_db: EngramDB, tmp_path: Path) -> None:
    env = engram_env(engram_db, tmp_path)
    result = await status(env)
    text = result.model_dump_json()
    assert env["ENCRYPTION_MASTER_KEY"] not in text
    assert engram_db.master_key.hex() not in text


def _wrong(db: EngramDB) -> dict[str, str]:
    return {"ENCRYPTION_MASTER_KEY": engram_crypto.encode_master_key(secrets.token_bytes(32))}


def _previous_only(db: EngramDB) -> dict[str, str]:
    return {"ENCRYPTION_MASTER_KEY": engram_crypto.encode_master_key(secrets.token_bytes(32)),
            "ENCRYPTION_MASTER_KEY_PREVIOUS": engram_crypto.encode_master_key(db.master_key)}  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("keys", "phrases"),
    [
        (_wrong, ["does not unwrap"]),  # a wrong key
        (_previous_only, ["PREVIOUS", "refuse to boot"]),  # an unfinished rotation
        (lambda db: {"ENCRYPTION_MASTER_KEY": "dG9vLXNob3J0"}, ["ENCRYPTION_MASTER_KEY is malformed"]),
        (lambda db: {"ENCRYPTION_MASTER_KEY": ""}, ["ENCRYPTION_MASTER_KEY"]),  # missing
    ],
    ids=["wrong", "previous_only", "malformed", "missing"],
)
async def test_a_master_key_that_cannot_open_the_canary_fails_the_key_check_with_the_reason(
    engram_db: EngramDB, tmp_path: Path, keys: Callable[[EngramDB], dict[str, str]], phrases: list[str]
) -> None:
    result = await status(engram_env(engram_db, tmp_path, **keys(engram_db)))
    key = check(result, "master_key")
    assert key.status == "fail"
    assert all(phrase in key.summary for phrase in phrases), key.summary
    assert check(result, "postgres").status == "ok"


@pytest.mark.anyio
async def test_fewer_than_two_escrow_locations_is_a_warning(engram_db: EngramDB, tmp_path: Path) -> None:
    key = check(await status(engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_KEY_ESCROW="only one place")),
                "master_key")
    assert key.status == "warn"
    assert "escrow" in key.summary


@pytest.fixture
async def db_without_canary(admin_dsn: str, master_key: bytes) -> AsyncIterator[EngramDB]:
    async for db in make_engram_db(admin_dsn, master_key, with_canary=False, notes=20, attachments=2):
        yield db


@pytest.mark.anyio
async def test_missing_canary_is_a_failure_that_explains_the_danger(
    db_without_canary: EngramDB, tmp_path: Path
) -> None:
    key = check(await status(engram_env(db_without_canary, tmp_path)), "master_key")
    assert key.status == "fail"
    assert "system_canaries is empty" in key.summary and "ANY master key" in key.summary


@pytest.mark.anyio
async def test_role_without_bypassrls_is_told_what_that_means(engram_db: EngramDB, tmp_path: Path) -> None:
    app_dsn = engram_db.role_dsn(testbed.APP_ROLE)
    result = await status(engram_env(engram_db, tmp_path, DATABASE_URL=app_dsn))
    pg = check(result, "postgres")
    assert pg.status == "fail"
    assert pg.details["sees_all_rows"] is False
    assert "BYPASSRLS" in pg.summary and "notes" in pg.summary


@pytest.mark.anyio
async def test_postgres_down_fails_its_checks_and_the_others_still_report(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path, DATABASE_URL=f"postgresql://postgres:pw-secret-9@127.0.0.1:{free_port()}/x")
    result = await status(env)
    assert check(result, "postgres").status == "fail"
    assert "connection refused" in check(result, "postgres").summary
    assert "start PostgreSQL, or correct the host and port in DATABASE_URL" in check(result, "postgres").summary
    assert "pw-secret-9" not in result.model_dump_json()
    # The repository and drill checks do not need the database and still answer.
    assert check(result, "last_backup").summary.startswith("no backup yet")
    assert check(result, "restore_drill").status == "warn"


@pytest.mark.anyio
async def test_qdrant_collection_missing_or_qdrant_down_is_only_a_warning_of_its_own_check(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    missing = check(await status(engram_env(engram_db, tmp_path)), "qdrant")
    assert missing.status == "warn"
    assert "does not exist" in missing.summary and "reindex_qdrant" in missing.summary
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_QDRANT_PATH="",
                     QDRANT_URL=f"http://127.0.0.1:{free_port()}")
    result = await status(env)
    # Qdrant holds derived data, rebuildable from PostgreSQL: down, it is a warning, never a failure.
    down = check(result, "qdrant")
    assert down.status == "warn" and "Qdrant did not answer" in down.summary and "QDRANT_URL" in down.summary
    assert check(result, "master_key").status == "ok"


@pytest.mark.anyio
async def test_deep_check_finds_attachment_rows_whose_blob_is_missing(engram_db: EngramDB, tmp_path: Path) -> None:
    env = engram_env(engram_db, tmp_path)
    clean = check(await status(env, deep=True), "attachments")
    assert clean.status == "ok", clean.summary
    assert clean.details["missing_blobs"] == 0
    conn = await asyncpg.connect(engram_db.dsn)
    try:
        await conn.execute(
            "DELETE FROM storage_objects WHERE storage_key = "
            "(SELECT storage_key FROM attachments WHERE storage_key IS NOT NULL AND deleted_at IS NULL LIMIT 1)"
        )
    finally:
        await conn.close()
    shallow = check(await status(env), "attachments")
    assert "missing_blobs" not in shallow.details and "deep=true" in shallow.summary
    drifted = check(await status(env, deep=True), "attachments")
    assert drifted.status == "fail"
    assert drifted.details["missing_blobs"] == 1


@pytest.mark.anyio
async def test_s3_attachments_bucket_versioning_counts_and_drift(
    s3_db: EngramDB, weed: SeaweedFS, tmp_path: Path
) -> None:
    objects: list[tuple[str, bytes]] = s3_db.report.attachment_objects
    assert objects, "the seeder returned no S3 objects"
    # Leave one referenced blob out and add one no row references.
    stray = (f"{s3_db.report.user_ids[0]}/{secrets.token_hex(4)}/objects/orphan", b"orphan")
    bucket = (await new_bucket(weed, [*objects[1:], stray], versioned=True)).bucket
    env = engram_env(s3_db, tmp_path, **storage_env(weed, bucket))
    shallow = check(await status(env), "attachments")
    assert shallow.details["versioning"] == "Enabled"
    assert shallow.details["objects"] == len(objects)
    deep = check(await status(env, deep=True), "attachments")
    assert deep.status == "fail"
    assert deep.details["missing_blobs"] == 1 and deep.details["unreferenced_blobs"] == 1
    assert deep.details["missing_examples"] == [objects[0][0]]


@pytest.mark.anyio
async def test_unversioned_bucket_is_a_warning(s3_db: EngramDB, weed: SeaweedFS, tmp_path: Path) -> None:
    bucket = (await new_bucket(weed, s3_db.report.attachment_objects)).bucket
    att = check(await status(engram_env(s3_db, tmp_path, **storage_env(weed, bucket))), "attachments")
    assert att.status == "warn" and "versioning is off" in att.summary


@pytest.mark.anyio
async def test_s3_down_or_wrong_credentials_fail_only_the_attachments_check(
    s3_db: EngramDB, weed: SeaweedFS, tmp_path: Path
) -> None:
    down = engram_env(s3_db, tmp_path, **storage_env(weed, "any", STORAGE_PORT=str(free_port())))
    result = await status(down)
    assert check(result, "attachments").status == "fail"
    assert "unreachable" in check(result, "attachments").summary
    assert check(result, "postgres").status == "ok"
    bucket = (await new_bucket(weed, versioned=True)).bucket
    wrong = engram_env(s3_db, tmp_path, **storage_env(weed, bucket, STORAGE_SECRET_ACCESS_KEY="not-the-secret-000"))
    refused = check(await status(wrong), "attachments")
    assert refused.status == "fail" and "credentials" in refused.summary
    assert "not-the-secret-000" not in refused.model_dump_json()


@pytest.mark.anyio
async def test_status_through_the_mcp_client_is_structured_and_reports_progress(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    server = build_server(load_settings(environ=engram_env(engram_db, tmp_path)))
    async with Client(server) as client:
        listed = await client.list_tools()
        result = await client.call_tool("backup_status", {}, progress_callback=on_progress)
    tool = next(t for t in listed.tools if t.name == "backup_status")
    assert tool.annotations is not None and tool.annotations.read_only_hint is True
    assert tool.output_schema is not None
    body: dict[str, Any] = result.structured_content or {}
    assert body["verdict"] in ("ok", "warn", "fail") and len(body["checks"]) == 8
    assert len(seen) == 8 and seen[-1][0] == 8
    assert body["archive"]["configured"] is False
