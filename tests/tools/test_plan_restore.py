"""plan_restore against real PostgreSQL, SeaweedFS and backups made by run_backup.

The round trip follows the plan's commands exactly, in a shell, after the
database was destroyed; the other tests break one premise each and expect the
plan to stop with that premise's own verdict.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
import support
from mcp import Client
from support import BACKUP_KEY, EngramDB, engram_env, fingerprints, make_engram_db, new_bucket, run_tool, storage_env

from engram_recovery.core.engram import crypto as engram_crypto
from engram_recovery.core.progress import silent
from engram_recovery.core.repository import open_repository
from engram_recovery.core.repository.points import resolve
from engram_recovery.core.restore import observe as restore_checks
from engram_recovery.core.restore.steps import BLIND_FENCE
from engram_recovery.core.restore.token import Premises, verify_plan_token
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores import s3
from engram_recovery.server.app import build_server
from engram_recovery.testbed.seaweedfs import SeaweedFS
from engram_recovery.tools.plan_restore import PlanRestoreInput, PlanRestoreResult, plan_restore
from engram_recovery.tools.run_backup import RunBackupInput, run_backup

# reindex_qdrant runs last, after the tables were compared (it re-queues embedding on purpose);
# boot_app has no command (starting Engram is deployment-specific).
NOT_RUN_HERE = {"reindex_qdrant"}


async def backup(env: dict[str, str]) -> str:
    result = await support.backup(env)
    assert result.backup_id and result.verified
    return result.backup_id


async def plan(env: dict[str, str], **params: Any) -> PlanRestoreResult:
    return await run_tool(plan_restore, PlanRestoreInput(**params), env)


def check(result: PlanRestoreResult, name: str) -> Any:
    return next(c for c in result.checks if c.name == name)


async def column(dsn: str, sql: str) -> dict[Any, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r[0]: r[1] for r in await conn.fetch(sql)}
    finally:
        await conn.close()


async def drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def shell_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    """What the operator's shell holds: the tool's environment, our venv on PATH, the backup key."""
    bin_dir = str(Path(sys.executable).parent)
    return env | {"PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                  "ENGRAM_RECOVERY_BACKUP_KEY": BACKUP_KEY, "HOME": os.environ.get("HOME", "/tmp")} | extra  # fmt: skip


async def run_steps(result: PlanRestoreResult, env: dict[str, str], cwd: Path) -> dict[str, list[str]]:
    """Run every command of every step, exactly as written; returns each step's output lines."""
    outputs: dict[str, list[str]] = {}
    for step in result.steps:
        if step.id in NOT_RUN_HERE:
            continue
        lines: list[str] = []
        for command in step.commands:
            done = await anyio.run_process(["bash", "-c", command], env=env, cwd=cwd, check=False)
            assert done.returncode == 0, (step.id, command, done.stderr.decode()[-2000:])
            lines += done.stdout.decode().splitlines()
        outputs[step.id] = lines
    return outputs


@pytest.mark.anyio
async def test_round_trip_following_the_plan_exactly_restores_every_table(
    engram_db: EngramDB, admin_dsn: str, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY)
    await backup(env)
    # The plan's fence step moves vaults.change_seq on purpose: compared separately below.
    source = await fingerprints(engram_db.dsn, without=("vaults", "change_seq"))
    seqs = await column(engram_db.dsn, "SELECT id, change_seq FROM vaults")
    await drop_database(admin_dsn, engram_db.name)
    async with Client(build_server(load_settings(environ=env))) as client:
        answer = await client.call_tool("plan_restore", {"app_version": "0.18.1", "work_dir": str(tmp_path / "w")})
    assert not answer.is_error, answer.content
    result = PlanRestoreResult.model_validate(answer.structured_content)
    assert result.executable and result.verdict in ("ok", "warn"), result.summary
    assert check(result, "target").code == "target_absent" and check(result, "master_key").status == "ok"
    ids = [s.id for s in result.steps]
    assert ids.index("create_target") < ids.index("decrypt_database") < ids.index("restore_database")
    outputs = await run_steps(result, shell_env(env), tmp_path)
    by_id = {s.id: s for s in result.steps}
    check_db = by_id["check_database"]
    assert check_db.expect is not None and outputs["check_database"] == check_db.expect.split("; ")
    assert outputs["check_canary"] == [by_id["check_canary"].expect]
    assert await fingerprints(engram_db.dsn, without=("vaults", "change_seq")) == source
    fenced = await column(engram_db.dsn, "SELECT id, change_seq FROM vaults")
    assert fenced == {vid: seq + BLIND_FENCE for vid, seq in seqs.items()}
    # Last, the Qdrant rebuild, exactly as written: it re-queues every live note for embedding.
    for command in by_id["reindex_qdrant"].commands:
        done = await anyio.run_process(["bash", "-c", command], env=shell_env(env), cwd=tmp_path, check=False)
        assert done.returncode == 0, (command, done.stdout.decode()[-2000:], done.stderr.decode()[-2000:])
    queued = await column(engram_db.dsn, "SELECT worker, count(*) FROM oban_jobs WHERE state = 'available' "
                          "GROUP BY worker")  # fmt: skip
    assert queued.get("Engram.Workers.EmbedNote", 0) >= engram_db.report.eligible_notes
    assert source["storage_objects"][0] > 0  # the attachments came back with the rows
    consequences = {c.topic: c for c in result.consequences}
    assert "unreachable" in consequences["sign_in_again"].summary


def env_of(backed: tuple[EngramDB, Path], **extra: str) -> dict[str, str]:
    db, base = backed
    return engram_env(db, base, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY, **extra)


@pytest.mark.anyio
async def test_a_live_non_empty_target_needs_an_explicit_choice(backed_up: tuple[EngramDB, Path]) -> None:
    refused = await plan(env_of(backed_up))
    assert (refused.verdict, check(refused, "target").code) == ("fail", "target_not_empty")
    assert refused.steps == [] and not refused.executable and "DO NOT RESTORE" in refused.summary
    allowed = await plan(env_of(backed_up), allow_non_empty_target=True)
    assert allowed.executable and check(allowed, "target").code == "target_will_be_replaced"
    assert "replace_target" in [s.id for s in allowed.steps]
    # The live database is reachable: the security fixes are concrete, and nothing was written since.
    assert check(allowed, "rpo").code == "nothing_lost"
    assert {c.topic for c in allowed.consequences} >= {"sign_in_again", "revoked_come_back", "qdrant"}


@pytest.mark.anyio
async def test_a_wrong_master_key_stops_the_plan(backed_up: tuple[EngramDB, Path]) -> None:
    wrong = engram_crypto.encode_master_key(secrets.token_bytes(32))
    result = await plan(env_of(backed_up, ENCRYPTION_MASTER_KEY=wrong), allow_non_empty_target=True)
    assert (result.verdict, check(result, "master_key").code) == ("fail", "wrong_key")
    assert result.steps == [] and wrong not in result.model_dump_json()


@pytest.mark.anyio
async def test_a_previous_only_key_gets_its_own_verdict(backed_up: tuple[EngramDB, Path]) -> None:
    db, _ = backed_up
    current = engram_crypto.encode_master_key(secrets.token_bytes(32))
    previous = engram_crypto.encode_master_key(db.master_key)
    env = env_of(backed_up, ENCRYPTION_MASTER_KEY=current, ENCRYPTION_MASTER_KEY_PREVIOUS=previous)
    result = await plan(env, allow_non_empty_target=True)
    assert (result.verdict, check(result, "master_key").code) == ("fail", "previous_key_only")


@pytest.mark.anyio
async def test_an_artifact_altered_by_one_byte_stops_the_plan(
    backed_up: tuple[EngramDB, Path], tmp_path: Path
) -> None:
    shutil.copytree(backed_up[1] / "repo", tmp_path / "repo")
    artifact = next((tmp_path / "repo" / "backups").glob("*/db.dump*"))
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    result = await plan(env_of(backed_up, ENGRAM_RECOVERY_REPOSITORY=str(tmp_path / "repo")),
                        allow_non_empty_target=True)  # fmt: skip
    assert (result.verdict, check(result, "artifacts").code) == ("fail", "artifact_altered")
    assert result.steps == []


@pytest.mark.anyio
async def test_a_too_old_pg_restore_stops_the_plan(backed_up: tuple[EngramDB, Path], tmp_path: Path) -> None:
    fake = tmp_path / "pg_restore"
    fake.write_text("#!/bin/sh\necho 'pg_restore (PostgreSQL) 9.6.24'\n")
    fake.chmod(0o755)
    result = await plan(env_of(backed_up, ENGRAM_RECOVERY_PG_RESTORE=str(fake)), allow_non_empty_target=True)
    assert (result.verdict, check(result, "pg_restore").code) == ("fail", "pg_restore_too_old")


@pytest.mark.anyio
async def test_the_plan_token_is_bound_to_the_verified_state(backed_up: tuple[EngramDB, Path]) -> None:
    env = env_of(backed_up)
    db, _ = backed_up
    first = await plan(env, allow_non_empty_target=True)
    again = await plan(env, allow_non_empty_target=True)
    assert first.plan_token == again.plan_token
    assert verify_plan_token(first.plan_token, again.premises, db.master_key)
    other_target = await plan(env, target_database="engram_absent_" + secrets.token_hex(4))
    assert other_target.plan_token != first.plan_token
    changed: Premises = first.premises.model_copy(update={"target_state": "non_empty:999"})
    assert not verify_plan_token(first.plan_token, changed, db.master_key)


@pytest.mark.anyio
async def test_recovery_points_resolve_by_id_and_time_and_unknown_ones_are_named(
    backed_up: tuple[EngramDB, Path],
) -> None:
    env = env_of(backed_up)
    latest = await plan(env, allow_non_empty_target=True)
    by_id = await plan(env, recovery_point=latest.recovery_point.backup_id, allow_non_empty_target=True)
    assert by_id.recovery_point == latest.recovery_point
    just_after_start = (latest.recovery_point.started_at + timedelta(seconds=1)).isoformat()
    by_time = await plan(env, recovery_point=f"before:{just_after_start}", allow_non_empty_target=True)
    assert by_time.recovery_point.backup_id == latest.recovery_point.backup_id
    async with Client(build_server(load_settings(environ=env))) as client:
        answer = await client.call_tool("plan_restore", {"recovery_point": "before:2000-01-01T00:00:00Z"})
    assert answer.is_error
    text = " ".join(getattr(b, "text", "") for b in answer.content)
    assert "no complete backup matches" in text and "Traceback" not in text


# --- attachments in S3 ------------------------------------------------------------------------------


async def bucket_objects(location: s3.S3Location) -> dict[str, bytes]:
    async with s3.client(location) as c:
        out: dict[str, bytes] = {}
        async for obj in s3.list_objects(c, location.bucket):
            answer = await c.get_object(Bucket=location.bucket, Key=obj.key)
            async with answer["Body"] as body:
                out[obj.key] = await body.read()
        return out


@pytest.mark.anyio
# The plan prints AWS CLI commands for the operator, and this test runs them: where the AWS CLI is not installed
# (it is not a dependency: awscli pins a botocore aiobotocore cannot use), there is nothing to run them with.
@pytest.mark.skipif(shutil.which("aws") is None, reason="the AWS CLI (aws) is not on PATH")
async def test_s3_attachments_come_back_by_the_plan_and_a_missing_blob_stops_it(
    admin_dsn: str, weed: SeaweedFS, tmp_path: Path
) -> None:
    async for db in make_engram_db(admin_dsn, secrets.token_bytes(32), storage="s3", attachments=2):
        location = await new_bucket(weed, db.report.attachment_objects)
        bucket = location.bucket
        env = engram_env(db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY, **storage_env(weed, bucket))
        await backup(env)
        original = await bucket_objects(location)
        assert len(original) == 2
        async with s3.client(location) as c:  # the bucket is lost
            for key in original:
                await c.delete_object(Bucket=bucket, Key=key)
        result = await plan(env, allow_non_empty_target=True)
        assert check(result, "attachments").status == "ok", result.summary
        step = next(s for s in result.steps if s.id == "restore_attachments")
        aws = {"AWS_ACCESS_KEY_ID": weed.access_key_id, "AWS_SECRET_ACCESS_KEY": weed.secret_access_key,
               "AWS_DEFAULT_REGION": weed.region}  # fmt: skip
        for command in step.commands:
            done = await anyio.run_process(["bash", "-c", command], env=shell_env(env, **aws), check=False)
            assert done.returncode == 0, done.stderr.decode()[-1000:]
        assert await bucket_objects(location) == original
        # The database is lost but the bucket lives on, holding a user the backup never knew.
        await drop_database(admin_dsn, db.name)
        newcomer = "0193ffff-0000-7000-8000-" + secrets.token_hex(6)
        async with s3.client(location) as c:
            await c.put_object(Bucket=bucket, Key=f"{newcomer}/v/objects/a1", Body=b"blob of a newer user")
        lost = await plan(env, work_dir=str(tmp_path / "w"))
        risk = next(c for c in lost.consequences if c.topic == "orphan_sweep")
        assert risk.count == 1 and "OrphanSweep" in risk.summary
        save = next(s for s in lost.steps if s.id == "save_newer_blobs")
        for command in save.commands:
            done = await anyio.run_process(["bash", "-c", command], env=shell_env(env, **aws), check=False)
            assert done.returncode == 0, done.stderr.decode()[-1000:]
        assert (tmp_path / "w" / "newer-users" / newcomer / "v" / "objects" / "a1").read_bytes() == (
            b"blob of a newer user"
        )
        # Now one mirrored blob disappears from the repository.
        async with open_repository(load_settings(environ=env)) as repo:
            point = await resolve(repo, "latest")
            inventory = await restore_checks.inventory_state(repo, point)
            assert inventory is not None and inventory.entries
            await repo.delete([inventory.entries[0][1]])
        broken = await plan(env, allow_non_empty_target=True)
        assert (broken.verdict, check(broken, "attachments").code) == ("fail", "inventory_objects_missing")
        assert broken.steps == []


@pytest.mark.anyio
async def test_a_role_the_dump_names_but_the_server_lacks_stops_the_plan(
    backed_up: tuple[EngramDB, Path], tmp_path: Path
) -> None:
    shutil.copytree(backed_up[1] / "repo", tmp_path / "repo")
    manifest_path = next((tmp_path / "repo" / "backups").glob("*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    ghost = "engram_ghost_" + secrets.token_hex(4)
    manifest["database"]["roles_referenced"].append(ghost)
    manifest_path.write_text(json.dumps(manifest))
    result = await plan(env_of(backed_up, ENGRAM_RECOVERY_REPOSITORY=str(tmp_path / "repo")),
                        allow_non_empty_target=True)  # fmt: skip
    roles = check(result, "roles")
    assert (result.verdict, roles.code, roles.details["missing"]) == ("fail", "roles_missing", [ghost])


@pytest.mark.anyio
async def test_a_backup_with_an_empty_canary_table_is_flagged_loudly(admin_dsn: str, tmp_path: Path) -> None:
    async for db in make_engram_db(admin_dsn, secrets.token_bytes(32), with_canary=False, notes=20, attachments=2):
        env = engram_env(db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY)
        await backup(env)
        result = await plan(env, allow_non_empty_target=True)
        key = check(result, "master_key")
        assert (key.status, key.code) == ("warn", "canary_empty") and "DANGER" in key.summary
        assert "restore_drill" in key.summary


@pytest.mark.anyio
async def test_without_roles_in_the_manifest_the_dumps_table_of_contents_names_them(
    backed_up: tuple[EngramDB, Path], tmp_path: Path
) -> None:
    shutil.copytree(backed_up[1] / "repo", tmp_path / "repo")
    manifest_path = next((tmp_path / "repo" / "backups").glob("*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest["database"]["roles_referenced"] = []
    manifest_path.write_text(json.dumps(manifest))
    result = await plan(env_of(backed_up, ENGRAM_RECOVERY_REPOSITORY=str(tmp_path / "repo")),
                        allow_non_empty_target=True)  # fmt: skip
    roles = check(result, "roles")
    assert roles.status == "ok" and "engram_owner" in roles.summary, roles.summary


def test_owners_are_read_from_a_pg_restore_listing() -> None:
    listing = (
        ";\n; Archive created at 2026-11-24 00:43:43 UTC\n"
        "214; 1259 1003665 TABLE public t engram_owner\n"
        "3345; 0 0 ACL public TABLE t engram_owner\n"
        "3338; 0 1003665 TABLE DATA public t other_owner\n"
        "3339; 0 0 ENCODING - ENCODING \n"
        "3340; 0 0 COMMENT - SCHEMA public postgres\n"
    )
    assert restore_checks.toc_owners(listing) == {"engram_owner", "other_owner"}


@pytest.mark.anyio
async def test_what_changed_after_the_backup_is_counted_and_the_plans_fixes_undo_it(
    engram_db: EngramDB, admin_dsn: str, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY)
    await backup(env)
    live = await asyncpg.connect(engram_db.dsn)
    try:  # life goes on after the backup
        now = "timezone('UTC', now())"
        first = "(SELECT id FROM {} ORDER BY id LIMIT 1)"
        revoked = await live.fetchval(f"UPDATE refresh_tokens SET revoked_at = {now} WHERE id = "
                                      + first.format("refresh_tokens WHERE revoked_at IS NULL") + " RETURNING id")
        deleted = await live.fetchval("DELETE FROM api_keys WHERE id = " + first.format("api_keys") + " RETURNING id")
        newcomer = await live.fetchval(f"INSERT INTO users (email, created_at, updated_at) VALUES "
                                       f"('new@example.org', {now}, {now}) RETURNING id")
        await live.execute(f"INSERT INTO refresh_tokens (user_id, token_hash, family_id, expires_at, created_at) "
                           f"VALUES ($1, 'h-new', 'f-new', {now} + interval '30 days', {now})", newcomer)
        moved = await live.fetchrow("UPDATE vaults SET change_seq = change_seq + 500 WHERE id = "
                                    + first.format("vaults") + " RETURNING id, change_seq")
        assert moved is not None
        vault, head = moved["id"], moved["change_seq"]
    finally:
        await live.close()
    target = "engram_restored_" + secrets.token_hex(4)
    result = await plan(env, target_database=target, work_dir=str(tmp_path / "w"))
    assert result.executable, result.summary
    topics = {c.topic: c for c in result.consequences}
    assert topics["revoked_come_back"].count == 2 and topics["orphan_sweep"].count == 1
    assert topics["sign_in_again"].count == 1 and check(result, "rpo").code == "data_lost"
    try:
        await run_steps(result, shell_env(env), tmp_path)
        restored = await asyncpg.connect(engram_db.dsn.rsplit("/", 1)[0] + "/" + target)
        try:
            assert await restored.fetchval("SELECT revoked_at FROM refresh_tokens WHERE id = $1", revoked) is not None
            assert await restored.fetchval("SELECT count(*) FROM api_keys WHERE id = $1", deleted) == 0
            assert await restored.fetchval("SELECT change_seq FROM vaults WHERE id = $1", vault) >= head
            assert await restored.fetchval("SELECT count(*) FROM users WHERE id = $1", newcomer) == 0
        finally:
            await restored.close()
    finally:
        await drop_database(admin_dsn, target)


@pytest.mark.anyio
async def test_a_directory_dump_restores_by_the_plan_into_a_new_database(
    backed_up: tuple[EngramDB, Path], tmp_path: Path, admin_dsn: str
) -> None:
    # (plain dumps go through psql with the same flags in restore_drill's tests; one CLI round trip less here)
    db = backed_up[0]
    env = engram_env(db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY)
    runtime = Runtime(load_settings(environ=env))
    try:
        assert (await run_backup(runtime, RunBackupInput(format="directory"), silent)).verified
    finally:
        await runtime.aclose()
    target = "engram_restored_" + secrets.token_hex(4)
    result = await plan(env, target_database=target, work_dir=str(tmp_path / "w"))
    assert result.executable, result.summary
    try:
        await run_steps(result, shell_env(env), tmp_path)
        # Nothing changed since the backup, so the revoke and fence steps change nothing either.
        assert await fingerprints(db.dsn.rsplit("/", 1)[0] + "/" + target) == await fingerprints(db.dsn)
    finally:
        await drop_database(admin_dsn, target)


async def as_engram_0_18_1_in_production(db: EngramDB, admin_dsn: str) -> None:
    """What a prod-style Engram database has beyond the test bed's tables: its owner role owns the database,
    and release 0.18.1's migration 20260629230000 created pg_stat_statements (superuser-only)."""
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'ALTER DATABASE "{db.name}" OWNER TO engram_owner')
    finally:
        await admin.close()
    conn = await asyncpg.connect(db.dsn)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    finally:
        await conn.close()


@pytest.mark.anyio
async def test_under_row_level_security_the_live_database_is_read_per_tenant_never_as_empty(
    engram_db: EngramDB, admin_dsn: str, tmp_path: Path
) -> None:
    await as_engram_0_18_1_in_production(engram_db, admin_dsn)
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY)
    await backup(env)
    live = await asyncpg.connect(engram_db.dsn)
    try:  # one API key deleted after the backup: the plan must count exactly it
        deleted = await live.fetchval("DELETE FROM api_keys WHERE id = (SELECT id FROM api_keys ORDER BY id LIMIT 1) "
                                      "RETURNING id")  # fmt: skip
        assert deleted is not None
    finally:
        await live.close()
    owner_env = env | {"DATABASE_URL": engram_db.role_dsn("engram_owner")}
    since = datetime.now(UTC) - timedelta(hours=1)
    by_owner = await restore_checks.live_state(load_settings(environ=owner_env), since)
    by_superuser = await restore_checks.live_state(load_settings(environ=env), since)
    assert by_owner.api_key_ids and by_owner.api_key_ids == by_superuser.api_key_ids
    assert by_owner.vault_seqs and by_owner.vault_seqs == by_superuser.vault_seqs
    assert by_owner.newest_write is not None and by_owner.newest_write == by_superuser.newest_write
    assert by_owner.reachable and by_owner.unchecked == {} and "per tenant" in (by_owner.read_as or "")
    result = await plan(owner_env, target_database="engram_restored_" + secrets.token_hex(4),
                        work_dir=str(tmp_path / "w"))  # fmt: skip
    text = result.model_dump_json()
    assert "ANY('{}'" not in text.replace('\\"', '"') and "live database unreachable" not in text
    assert {c.topic: c for c in result.consequences}["revoked_come_back"].count == 1
    # engram_owner can read per tenant but cannot restore: the plan says so before anything runs.
    role = check(result, "restore_role")
    assert not result.executable and result.steps == [] and role.status == "fail"
    assert {"extension_needs_superuser", "row_security_blocks_restore"} <= set(role.details["problems"])
    assert "pg_stat_statements" in role.summary


@pytest.mark.anyio
async def test_a_role_that_cannot_restore_is_named_and_a_superusers_restore_keeps_the_sources_owner(
    engram_db: EngramDB, admin_dsn: str, tmp_path: Path
) -> None:
    await as_engram_0_18_1_in_production(engram_db, admin_dsn)
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY)
    await backup(env)
    target = "engram_restored_" + secrets.token_hex(4)
    # BYPASSRLS, but neither CREATEDB nor a member of engram_owner, which owns the database and its tables.
    backup_role = await plan(env | {"DATABASE_URL": engram_db.role_dsn("engram_backup")}, target_database=target)
    role = check(backup_role, "restore_role")
    assert not backup_role.executable and role.status == "fail"
    assert {"cannot_set_owner", "cannot_create_database", "extension_needs_superuser"} <= set(role.details["problems"])
    result = await plan(env, target_database=target, work_dir=str(tmp_path / "w"))
    assert result.executable and check(result, "restore_role").status == "ok", result.summary
    try:
        await run_steps(result, shell_env(env), tmp_path)
        owner = await column(admin_dsn, f"SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
                             f"WHERE datname = '{target}'")  # fmt: skip
        assert owner == {target: "engram_owner"}
    finally:
        await drop_database(admin_dsn, target)


@pytest.mark.anyio
async def test_the_decrypt_step_runs_from_a_fresh_shell_with_no_settings_and_no_tool_on_path(
    backed_up: tuple[EngramDB, Path], tmp_path: Path
) -> None:
    db, base = backed_up
    key_file = tmp_path / "backup.key"
    key_file.write_text(BACKUP_KEY + "\n")
    env_file = tmp_path / "engram.env"  # Engram's .env, as an operator points the tool at it
    env_file.write_text(f"DATABASE_URL={db.dsn}\nENCRYPTION_MASTER_KEY={engram_crypto.encode_master_key(db.master_key)}\n"
                        f"ENGRAM_RECOVERY_REPOSITORY={base / 'repo'}\n")  # fmt: skip
    # The backup key from the tool's environment, by file: the command names the file, never the key.
    settings = load_settings(environ={"ENGRAM_RECOVERY_BACKUP_KEY_FILE": str(key_file)}, env_file=env_file)
    runtime = Runtime(settings)
    try:
        result = await plan_restore(runtime, PlanRestoreInput(target_database="engram_restored_" + secrets.token_hex(4),
                                                              work_dir=str(tmp_path / "w")), silent)  # fmt: skip
    finally:
        await runtime.aclose()
    assert result.executable, result.summary
    step = next(s for s in result.steps if s.id == "decrypt_database")
    text = " ".join(c for s in result.steps for c in s.commands)
    assert BACKUP_KEY not in text and engram_crypto.encode_master_key(db.master_key) not in text
    assert f"--env-file {env_file}" in step.commands[-1] and f"ENGRAM_RECOVERY_BACKUP_KEY_FILE={key_file}" in text
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for command in step.commands:  # a fresh shell: no tool on PATH, no setting in the environment
        done = await anyio.run_process(["bash", "-c", command], env={"PATH": "/usr/bin:/bin"}, cwd=elsewhere,
                                       check=False)  # fmt: skip
        assert done.returncode == 0, (command, done.stderr.decode()[-2000:])
    dump = tmp_path / "w" / f"{result.recovery_point.backup_id}.dump"
    assert step.expect is not None and dump.stat().st_size == int(step.expect.split(": ")[1].split()[0])


@pytest.mark.anyio
async def test_a_non_superuser_the_plan_calls_able_really_restores_by_the_plan(
    engram_db: EngramDB, admin_dsn: str, tmp_path: Path
) -> None:
    admin = await asyncpg.connect(admin_dsn)
    restorer = "engram_restorer_" + secrets.token_hex(4)
    try:  # what an operator grants a restore role instead of a superuser
        await admin.execute(f'ALTER DATABASE "{engram_db.name}" OWNER TO engram_owner')
        await admin.execute(f"CREATE ROLE {restorer} LOGIN BYPASSRLS CREATEDB")
        await admin.execute(f"GRANT engram_owner TO {restorer}")
    finally:
        await admin.close()
    target = "engram_restored_" + secrets.token_hex(4)
    try:
        env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY)
        await backup(env)
        env |= {"DATABASE_URL": engram_db.role_dsn(restorer)}
        result = await plan(env, target_database=target, work_dir=str(tmp_path / "w"))
        role = check(result, "restore_role")
        assert result.executable and role.status == "ok" and role.details["role"] == restorer, result.summary
        await run_steps(result, shell_env(env), tmp_path)
        owner = await column(admin_dsn, f"SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
                             f"WHERE datname = '{target}'")  # fmt: skip
        assert owner == {target: "engram_owner"}
        assert await fingerprints(engram_db.dsn.rsplit("/", 1)[0] + "/" + target, without=("vaults", "change_seq")) \
            == await fingerprints(engram_db.dsn, without=("vaults", "change_seq"))
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')
            await admin.execute(f"DROP ROLE IF EXISTS {restorer}")
        finally:
            await admin.close()
