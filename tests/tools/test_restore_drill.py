"""restore_drill against real PostgreSQL and backups made by run_backup: pass, fail, always clean up."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from mcp import Client
from support import BACKUP_KEY, EngramDB, engram_env, make_engram_db

from engram_recovery.core.engram import crypto as engram_crypto
from engram_recovery.core.progress import silent
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores import s3
from engram_recovery.server.app import build_server
from engram_recovery.testbed.seaweedfs import SeaweedFS
from engram_recovery.tools.plan_restore import PlanRestoreInput, plan_restore
from engram_recovery.tools.restore_drill import RestoreDrillInput, RestoreDrillResult, restore_drill
from engram_recovery.tools.run_backup import RunBackupInput, run_backup


async def drill_databases(admin_dsn: str) -> list[str]:
    conn = await asyncpg.connect(admin_dsn)
    try:
        return [r["datname"] for r in await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'engram\\_drill\\_%'")]  # fmt: skip
    finally:
        await conn.close()


async def drill(env: dict[str, str], **params: Any) -> RestoreDrillResult:
    runtime = Runtime(load_settings(environ=env))
    try:
        return await restore_drill(runtime, RestoreDrillInput(**params), silent)
    finally:
        await runtime.aclose()


def copy_repo(backed: tuple[EngramDB, Path], tmp_path: Path, **extra: str) -> dict[str, str]:
    """A private copy of the shared repository, so a test may tamper with it or record drills in it."""
    db, base = backed
    shutil.copytree(base / "repo", tmp_path / "repo")
    return engram_env(db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY, **extra)


def steps(result: RestoreDrillResult) -> dict[str, Any]:
    return {s.name: s for s in result.steps}


@pytest.mark.anyio
async def test_a_good_backup_passes_the_drill_sweeps_stale_drills_and_backup_status_sees_it(
    backed_up: tuple[EngramDB, Path], tmp_path: Path, admin_dsn: str
) -> None:
    env = copy_repo(backed_up, tmp_path)
    # A drill killed 7 hours ago left its database; one started a moment ago (elsewhere) is still running.
    stale = f"engram_drill_{int(time.time()) - 7 * 3600}_{secrets.token_hex(4)}"
    fresh = f"engram_drill_{int(time.time())}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        for name in (stale, fresh):
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        await good_drill(env, tmp_path, admin_dsn, stale, fresh)
    finally:
        for name in (stale, fresh):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.close()


async def good_drill(env: dict[str, str], tmp_path: Path, admin_dsn: str, stale: str, fresh: str) -> None:
    before = set(await drill_databases(admin_dsn)) - {stale}
    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    async with Client(build_server(load_settings(environ=env))) as client:
        answer = await client.call_tool("restore_drill", {"sample_notes": 20}, progress_callback=on_progress)
        assert not answer.is_error, answer.content
        result = RestoreDrillResult.model_validate(answer.structured_content)
        assert result.verdict == "ok", result.summary
        by = steps(result)
        assert all(by[n].ok for n in ("verify", "create_database", "restore", "prove_canary", "prove_row_counts",
                                      "prove_notes", "prove_attachments", "drop_database"))  # fmt: skip
        assert by["prove_notes"].details["sampled"] == 20 and by["prove_attachments"].details["sampled"] > 0
        assert result.rto_seconds is not None and result.rto_seconds > 0 and result.scratch_dropped
        assert result.scratch_database and result.scratch_database.startswith("engram_drill_")
        assert any("restore" in m for m in messages) and any("proving" in m for m in messages)
        status = await client.call_tool("backup_status", {})
    assert status.structured_content is not None
    drill_check = next(c for c in status.structured_content["checks"] if c["component"] == "restore_drill")
    assert drill_check["status"] == "ok" and drill_check["details"]["last_successful"]["backup_id"] == result.backup_id
    assert result.record is not None
    record = json.loads((tmp_path / "repo" / result.record).read_text())
    assert {"at", "backup_id", "ok", "rto_seconds"} <= record.keys() and record["ok"] is True
    assert stale in result.leftovers_dropped and fresh not in result.leftovers_dropped
    assert set(await drill_databases(admin_dsn)) == before


@pytest.mark.anyio
async def test_an_altered_artifact_fails_the_drill_before_any_database_exists(
    backed_up: tuple[EngramDB, Path], tmp_path: Path, admin_dsn: str
) -> None:
    env = copy_repo(backed_up, tmp_path)
    artifact = next((tmp_path / "repo" / "backups").glob("*/db.dump*"))
    data = bytearray(artifact.read_bytes())
    data[-100] ^= 0x01
    artifact.write_bytes(bytes(data))
    result = await drill(env)
    assert result.verdict == "fail" and not steps(result)["verify"].ok
    assert "SHA-256" in steps(result)["verify"].summary and result.scratch_database is None
    record = json.loads((tmp_path / "repo" / str(result.record)).read_text())
    assert record["ok"] is False


@pytest.mark.anyio
async def test_a_dump_damaged_before_hashing_fails_mid_restore_and_the_scratch_database_is_dropped(
    backed_up: tuple[EngramDB, Path], tmp_path: Path, admin_dsn: str
) -> None:
    env = copy_repo(backed_up, tmp_path)
    before = await drill_databases(admin_dsn)
    artifact = next((tmp_path / "repo" / "backups").glob("*/db.dump*"))
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    # Re-seal the manifest around the damage, as if the bytes were damaged before the backup hashed them.
    manifest_path = artifact.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["artifacts"]:
        if entry["name"] == artifact.name:
            entry["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    result = await drill(env)
    by = steps(result)
    assert result.verdict == "fail" and by["verify"].ok and not by["restore"].ok
    assert "altered" in by["restore"].summary or "authentication" in by["restore"].summary
    assert by["drop_database"].ok and result.scratch_dropped
    assert await drill_databases(admin_dsn) == before


@pytest.mark.anyio
async def test_a_wrong_master_key_fails_the_proofs_and_still_drops(
    backed_up: tuple[EngramDB, Path], tmp_path: Path, admin_dsn: str
) -> None:
    wrong = engram_crypto.encode_master_key(secrets.token_bytes(32))
    before = await drill_databases(admin_dsn)
    result = await drill(copy_repo(backed_up, tmp_path, ENCRYPTION_MASTER_KEY=wrong))
    by = steps(result)
    assert result.verdict == "fail" and by["restore"].ok
    assert not by["prove_canary"].ok and not by["prove_notes"].ok and by["prove_row_counts"].ok
    assert wrong not in result.model_dump_json()
    assert await drill_databases(admin_dsn) == before


@pytest.mark.anyio
async def test_a_previous_only_key_gets_the_plans_own_verdict_and_rows_still_read_as_engram_reads_them(
    backed_up: tuple[EngramDB, Path], tmp_path: Path
) -> None:
    db, _ = backed_up
    current = engram_crypto.encode_master_key(secrets.token_bytes(32))
    env = copy_repo(backed_up, tmp_path, ENCRYPTION_MASTER_KEY=current,
                    ENCRYPTION_MASTER_KEY_PREVIOUS=engram_crypto.encode_master_key(db.master_key))  # fmt: skip
    result = await drill(env, sample_notes=10_000)
    by = steps(result)
    # Engram would refuse to boot (canary: current key only) but reads every user's DEK with PREVIOUS.
    assert result.verdict == "fail" and result.key_verdict == "previous_key_only"
    assert not by["prove_canary"].ok and by["prove_canary"].code == "previous_key_only"
    assert "ENCRYPTION_MASTER_KEY_PREVIOUS" in by["prove_canary"].summary and "wrong key" not in result.summary
    assert by["prove_notes"].ok and by["prove_attachments"].ok, result.summary
    assert by["prove_notes"].details["users_by_previous_key"] == len(db.report.user_ids)
    planned = await plan_restore_check(env)
    assert planned == ("fail", "previous_key_only")


async def plan_restore_check(env: dict[str, str]) -> tuple[str, str]:
    runtime = Runtime(load_settings(environ=env))
    try:
        result = await plan_restore(runtime, PlanRestoreInput(allow_non_empty_target=True), silent)
    finally:
        await runtime.aclose()
    key = next(c for c in result.checks if c.name == "master_key")
    return result.verdict, key.code


@pytest.mark.anyio
async def test_mid_rotation_a_dek_wrapped_by_the_previous_key_reads_and_the_drill_passes(
    admin_dsn: str, tmp_path: Path
) -> None:
    old = secrets.token_bytes(32)
    async for db in make_engram_db(admin_dsn, secrets.token_bytes(32), notes=30, attachments=3):
        conn = await asyncpg.connect(db.dsn)
        try:
            # One user not yet re-wrapped by the rotation: its DEK still sits under the old key.
            row = await conn.fetchrow("SELECT id, encrypted_dek FROM users WHERE encrypted_dek IS NOT NULL "
                                      "ORDER BY id LIMIT 1")  # fmt: skip
            assert row is not None
            user, blob = row["id"], row["encrypted_dek"]
            dek = engram_crypto.unwrap_dek(db.master_key, bytes(blob), user)
            await conn.execute("UPDATE users SET encrypted_dek = $1 WHERE id = $2",
                               engram_crypto.wrap_dek(old, dek, user), user)  # fmt: skip
            others = await conn.fetchval("SELECT count(*) FROM notes WHERE user_id = $1", user)
        finally:
            await conn.close()
        assert others > 0
        env = engram_env(db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY,
                         ENCRYPTION_MASTER_KEY_PREVIOUS=engram_crypto.encode_master_key(old))  # fmt: skip
        runtime = Runtime(load_settings(environ=env))
        try:
            assert (await run_backup(runtime, RunBackupInput(), silent)).verified
        finally:
            await runtime.aclose()
        result = await drill(env, sample_notes=10_000, sample_attachments=10_000)
        by = steps(result)
        assert result.verdict == "ok" and result.key_verdict == "ok", result.summary
        assert by["prove_notes"].details["users_by_previous_key"] == 1
        assert "ENCRYPTION_MASTER_KEY_PREVIOUS" in by["prove_notes"].summary


@pytest.mark.anyio
async def test_a_database_error_inside_a_proof_fails_the_drill_cleanly(
    backed_up: tuple[EngramDB, Path], tmp_path: Path, admin_dsn: str
) -> None:
    env = copy_repo(backed_up, tmp_path)
    before = await drill_databases(admin_dsn)
    manifest_path = next((tmp_path / "repo" / "backups").glob("*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest["database"]["row_counts"]["table_the_dump_lacks"] = 1
    manifest_path.write_text(json.dumps(manifest))
    result = await drill(env, sample_attachments=0)
    assert result.verdict == "fail" and "table_the_dump_lacks" in result.summary
    assert result.scratch_dropped and await drill_databases(admin_dsn) == before


@pytest.mark.anyio
async def test_the_drill_restores_with_the_restore_engine_and_reports_its_schema_check(
    backed_up: tuple[EngramDB, Path], tmp_path: Path
) -> None:
    """restore_drill restores as a real restore does (core/restore/database.py) and reports the engine's check:
    every table, constraint and index of the dump present, every row count as the manifest says."""
    db, _ = backed_up
    env = copy_repo(backed_up, tmp_path)
    source = await asyncpg.connect(db.dsn)
    try:
        tables = await source.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        indexes = await source.fetchval("SELECT count(*) FROM pg_indexes WHERE schemaname = 'public'")
    finally:
        await source.close()
    result = await drill(env, sample_attachments=0)
    assert result.verdict == "ok", result.summary
    by = steps(result)
    # The engine's way in for a custom dump: rows loaded while decrypting, then post-data with two jobs.
    assert by["restore"].details["mode"] == "parallel" and by["restore"].details["jobs"] == 2
    schema = by["prove_schema"]
    assert schema.ok and schema.details["objects_from"] == "the dump's table of contents"
    assert schema.details["tables"] == tables >= 10 and schema.details["constraints"] > 0
    # Constraint-backed indexes are restored as constraints: the TOC names the others as indexes.
    assert 0 < schema.details["indexes"] <= indexes
    assert f"{tables} tables" in schema.summary
    assert by["prove_row_counts"].ok and "table counts match the manifest" in by["prove_row_counts"].summary
    # The check is a proof, outside the RTO (verify + create + restore).
    rto = sum(by[n].seconds for n in ("verify", "create_database", "restore"))
    assert result.rto_seconds is not None and abs(result.rto_seconds - rto) < 0.01
    assert result.record is not None
    record = json.loads((tmp_path / "repo" / result.record).read_text())
    assert any(s["name"] == "prove_schema" and s["details"]["tables"] == tables for s in record["steps"])

    # A manifest that counts one more note, and a table the dump lacks: wrong counts, reported as such.
    manifest_path = next((tmp_path / "repo" / "backups").glob("*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    notes = manifest["database"]["row_counts"]["notes"]
    manifest["database"]["row_counts"]["notes"] = notes + 1
    manifest["database"]["row_counts"]["table_the_dump_lacks"] = 1
    manifest_path.write_text(json.dumps(manifest))
    wrong = steps(await drill(env, sample_attachments=0))
    assert wrong["restore"].ok and wrong["prove_schema"].ok and not wrong["prove_row_counts"].ok
    assert wrong["prove_row_counts"].details == {
        "notes": {"manifest": notes + 1, "restored": notes},
        "table_the_dump_lacks": {"manifest": 1, "restored": 0},
    }


@pytest.mark.anyio
async def test_a_drill_reads_an_s3_repository_and_proves_mirrored_attachments(
    admin_dsn: str, weed: SeaweedFS, tmp_path: Path
) -> None:
    suffix = secrets.token_hex(4)
    attachments, repository = f"att-{suffix}", f"repo-{suffix}"
    source = s3.S3Location(weed.endpoint, weed.access_key_id, weed.secret_access_key, weed.region, attachments)
    async for db in make_engram_db(admin_dsn, secrets.token_bytes(32), storage="s3", attachments=4, notes=40):
        async with s3.client(source) as c:
            for bucket in (attachments, repository):
                await c.create_bucket(Bucket=bucket)
            for key, blob in db.report.attachment_objects:
                await c.put_object(Bucket=attachments, Key=key, Body=blob)
        scheme, _, hostport = weed.endpoint.partition("://")
        host, _, port = hostport.partition(":")
        env = engram_env(
            db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY, STORAGE_BACKEND="s3", STORAGE_BUCKET=attachments,
            STORAGE_HOST=host, STORAGE_PORT=port, STORAGE_SCHEME=scheme + "://",
            STORAGE_ACCESS_KEY_ID=weed.access_key_id, STORAGE_SECRET_ACCESS_KEY=weed.secret_access_key,
            ENGRAM_RECOVERY_REPOSITORY=f"s3://{repository}/engram", ENGRAM_RECOVERY_REPOSITORY_ENDPOINT=weed.endpoint,
            ENGRAM_RECOVERY_REPOSITORY_ACCESS_KEY_ID=weed.access_key_id,
            ENGRAM_RECOVERY_REPOSITORY_SECRET_ACCESS_KEY=weed.secret_access_key,
        )  # fmt: skip
        runtime = Runtime(load_settings(environ=env))
        try:
            assert (await run_backup(runtime, RunBackupInput(), silent)).verified
        finally:
            await runtime.aclose()
        result = await drill(env)
        assert result.verdict == "ok", result.summary
        assert steps(result)["prove_attachments"].details["sampled"] == 4
        assert result.record is not None and result.record.startswith("drills/")
        # One mirrored blob is altered in the repository: the attachment proof catches it.
        repo_location = s3.S3Location(weed.endpoint, weed.access_key_id, weed.secret_access_key, weed.region,
                                      repository)  # fmt: skip
        async with s3.client(repo_location) as c:
            pool = [o.key async for o in s3.list_objects(c, repository, "engram/attachments/pool/")]
            answer = await c.get_object(Bucket=repository, Key=pool[0])
            async with answer["Body"] as body:
                blob = bytearray(await body.read())
            blob[0] ^= 0x01
            await c.put_object(Bucket=repository, Key=pool[0], Body=bytes(blob))
        tampered = await drill(env)
        # Every blob is checked against the inventory's checksum before any database exists, not only a sample.
        assert tampered.verdict == "fail" and not steps(tampered)["verify_attachments"].ok
        assert "content differs" in steps(tampered)["verify_attachments"].summary
        assert tampered.scratch_database is None and tampered.scratch_dropped


@pytest.mark.anyio
async def test_annotations_are_honest_and_read_only_mode_keeps_only_the_plan(
    backed_up: tuple[EngramDB, Path], tmp_path: Path
) -> None:
    env = copy_repo(backed_up, tmp_path)
    async with Client(build_server(load_settings(environ=env))) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
    drill_ann, plan_ann = listed["restore_drill"].annotations, listed["plan_restore"].annotations
    assert drill_ann is not None and drill_ann.read_only_hint is False and drill_ann.destructive_hint is False
    assert plan_ann is not None and plan_ann.read_only_hint is True
    async with Client(build_server(load_settings(environ=env | {"ENGRAM_RECOVERY_ACCESS": "read-only"}))) as client:
        names = {t.name for t in (await client.list_tools()).tools}
    assert "plan_restore" in names and "restore_drill" not in names


@pytest.mark.anyio
@pytest.mark.parametrize("fmt", ["directory", "plain"])
async def test_directory_and_plain_dumps_pass_the_drill_too(
    backed_up: tuple[EngramDB, Path], tmp_path: Path, admin_dsn: str, fmt: str
) -> None:
    env = engram_env(backed_up[0], tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY)
    runtime = Runtime(load_settings(environ=env))
    try:
        assert (await run_backup(runtime, RunBackupInput.model_validate({"format": fmt}), silent)).verified
    finally:
        await runtime.aclose()
    before = await drill_databases(admin_dsn)
    result = await drill(env, sample_attachments=5)
    assert result.verdict == "ok", result.summary
    assert steps(result)["prove_row_counts"].ok and steps(result)["prove_notes"].details["sampled"] > 0
    assert await drill_databases(admin_dsn) == before


@pytest.mark.anyio
async def test_the_scratch_database_is_owned_by_the_source_databases_owner(admin_dsn: str, tmp_path: Path) -> None:
    async for db in make_engram_db(admin_dsn, secrets.token_bytes(32), notes=20, attachments=2):
        admin = await asyncpg.connect(admin_dsn)
        try:  # as in production: Engram's owner role owns the database, not the superuser that runs the drill
            await admin.execute(f'ALTER DATABASE "{db.name}" OWNER TO engram_owner')
        finally:
            await admin.close()
        env = engram_env(db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY)
        runtime = Runtime(load_settings(environ=env))
        try:
            assert (await run_backup(runtime, RunBackupInput(), silent)).verified
        finally:
            await runtime.aclose()
        result = await drill(env, sample_attachments=0)
        assert result.verdict == "ok", result.summary
        # Read back from pg_database right after CREATE DATABASE, not taken from the manifest.
        assert steps(result)["create_database"].summary.endswith("owned by engram_owner")
