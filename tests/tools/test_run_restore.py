"""run_restore against real PostgreSQL 18, SeaweedFS and a backup made by run_backup.

One seeded deployment with S3 attachments is backed up once per module; every test plans a restore
into a database and a bucket of its own, then runs it through the tool (the main round trip through
the MCP server alone).
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import mcp_types as types
import pytest
from mcp import Client
from support import BACKUP_KEY, EngramDB, engram_env, fingerprints, make_engram_db, restore
from support import bucket_contents as contents
from support import databases_named as databases
from support import fetchval as sql
from support import restore_step as step

from engram_recovery.core.engram import crypto as engram_crypto
from engram_recovery.core.errors import Busy, ConfigurationError, StoreUnreachable, UnsafeOperation
from engram_recovery.core.progress import silent
from engram_recovery.core.repository.layout import restore_log_key
from engram_recovery.core.restore import fences, run_steps
from engram_recovery.core.restore.database import restore_database
from engram_recovery.core.restore.run import RestoreLog, run_id_of
from engram_recovery.core.restore.run import lock as restore_lock
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores import postgres, s3
from engram_recovery.core.stores.advisory import database_lock
from engram_recovery.core.stores.s3 import S3Location
from engram_recovery.server.app import build_server
from engram_recovery.server.invoke import DECLINED
from engram_recovery.testbed.seaweedfs import SeaweedFS
from engram_recovery.tools.plan_restore import PlanRestoreInput, PlanRestoreResult, plan_restore
from engram_recovery.tools.run_backup import RunBackupInput, run_backup
from engram_recovery.tools.run_restore import RunRestoreInput, RunRestoreResult, confirmation, run_restore_tool

# The fence steps move vaults.change_seq on purpose (the sync fence): compared apart from the rest.
FENCED = ("vaults", "change_seq")
ORDER = ["premises", "sessions", "snapshot_live", "roles", "target", "database", "canary", "attachments",
         "fence_tokens", "fence_sync", "protect_orphans", "qdrant"]  # fmt: skip


@dataclass
class Deployment:
    db: EngramDB
    base: Path
    weed: SeaweedFS
    source: S3Location
    at_backup: dict[str, bytes]  # the source bucket when the backup was taken
    rows_at_backup: dict[str, tuple[int, str]]
    revoked_token: str  # a refresh token revoked in the live database after the backup
    deleted_key: str  # an API key deleted from the live database after the backup

    async def restored_rows(self, name: str) -> dict[str, tuple[int, str]]:
        """The restored database's fingerprints, comparable with `rows_at_backup`."""
        return await fingerprints(self.target_dsn(name), without=FENCED, leave_out=self.fenced_rows())

    def fenced_rows(self) -> dict[str, str]:
        """The rows the token fence changes on purpose: compared by the fence checks, not with the rest."""
        return {"refresh_tokens": f"t.id = '{self.revoked_token}'", "api_keys": f"t.id = '{self.deleted_key}'",
                "api_key_vaults": f"t.api_key_id = '{self.deleted_key}'"}  # fmt: skip

    def env(self, bucket: str, base: Path | None = None, **extra: str) -> dict[str, str]:
        host, port = self.weed.endpoint.removeprefix("http://").split(":")
        return engram_env(self.db, base or self.base, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY, STORAGE_BACKEND="s3",
                          STORAGE_BUCKET=bucket, STORAGE_HOST=host, STORAGE_PORT=port, STORAGE_SCHEME="http://",
                          STORAGE_ACCESS_KEY_ID=self.weed.access_key_id,
                          STORAGE_SECRET_ACCESS_KEY=self.weed.secret_access_key, **extra)  # fmt: skip

    def where(self, bucket: str) -> S3Location:
        w = self.weed
        return S3Location(w.endpoint, w.access_key_id, w.secret_access_key, w.region, bucket)

    def target_dsn(self, name: str) -> str:
        return self.db.dsn.rsplit("/", 1)[0] + "/" + name


async def new_bucket(where: S3Location, objects: dict[str, bytes] | None = None) -> S3Location:
    async with s3.bulk_client(where) as c:
        await c.create_bucket(Bucket=where.bucket)
        for key, body in (objects or {}).items():
            await c.put_object(Bucket=where.bucket, Key=key, Body=body)
    return where


@pytest.fixture(scope="module")
async def deployment(
    admin_dsn: str, weed: SeaweedFS, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Deployment]:
    async for db in make_engram_db(admin_dsn, secrets.token_bytes(32), storage="s3", notes=30, attachments=12):
        base = tmp_path_factory.mktemp("run-restore")
        source = S3Location(weed.endpoint, weed.access_key_id, weed.secret_access_key, weed.region,
                            f"rr-src-{secrets.token_hex(4)}")  # fmt: skip
        await new_bucket(source, dict(db.report.attachment_objects))
        token = await sql(db.dsn, "SELECT id::text FROM refresh_tokens WHERE revoked_at IS NULL ORDER BY id LIMIT 1")
        key = await sql(db.dsn, "SELECT id::text FROM api_keys ORDER BY id LIMIT 1")
        assert token and key
        d = Deployment(db, base, weed, source, {}, {}, token, key)
        async with Runtime(load_settings(environ=d.env(source.bucket))) as runtime:
            assert (await run_backup(runtime, RunBackupInput(), silent)).verified
        d.at_backup = await contents(source)
        d.rows_at_backup = await fingerprints(db.dsn, without=FENCED, leave_out=d.fenced_rows())
        # Life goes on after the backup, in the live database and the live bucket: none of it may come back.
        live = await asyncpg.connect(db.dsn)
        try:
            await live.execute("DELETE FROM oban_jobs")
            await live.execute("UPDATE vaults SET change_seq = change_seq + 7")
            await live.execute("UPDATE refresh_tokens SET revoked_at = now() WHERE id = $1::uuid", token)
            await live.execute("DELETE FROM api_keys WHERE id = $1::uuid", key)
        finally:
            await live.close()
        async with s3.bulk_client(source) as c:
            await c.put_object(Bucket=source.bucket, Key="after/the/backup", Body=b"new")
        yield d


async def plan(env: dict[str, str], **params: Any) -> PlanRestoreResult:
    async with Runtime(load_settings(environ=env)) as runtime:
        return await plan_restore(runtime, PlanRestoreInput(**params), silent)


async def rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(r) for r in await conn.fetch(query)]
    finally:
        await conn.close()


@pytest.fixture
async def target_name(admin_dsn: str) -> AsyncIterator[str]:
    name = "engram_restored_" + secrets.token_hex(4)
    yield name
    await sql(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.anyio
async def test_through_the_tool_alone_a_restore_equals_the_source_at_backup_time_and_its_key_opens_the_canary(
    deployment: Deployment, admin_dsn: str, target_name: str
) -> None:
    bucket = await new_bucket(deployment.where(f"rr-dst-{secrets.token_hex(4)}"))
    env = deployment.env(bucket.bucket)
    planned = await plan(env, target_database=target_name, app_version="0.18.1")
    assert planned.executable, planned.summary
    messages: list[str] = []
    async with Client(build_server(load_settings(environ=env))) as client:
        # Not confirmed: nothing happens, and the answer says what confirming would do.
        answer = await client.call_tool("run_restore", {"plan_token": planned.plan_token})
        assert not answer.is_error, answer.content
        preview = RunRestoreResult.model_validate(answer.structured_content)
        assert preview.verdict == "not_confirmed" and "nothing was changed" in preview.summary
        assert await databases(admin_dsn, target_name) == 0 and await contents(bucket) == {}

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            messages.append(message or "")

        answer = await client.call_tool("run_restore", {"plan_token": planned.plan_token, "confirm": True,
                                                        "reindex_qdrant": False}, progress_callback=on_progress)
    assert not answer.is_error, answer.content
    result = RunRestoreResult.model_validate(answer.structured_content)
    assert result.verdict in ("ok", "warn"), result.summary
    assert [s.name for s in result.steps] == ORDER
    assert all(s.status in ("ok", "warn", "skipped") for s in result.steps)
    assert step(result, "canary").status == "ok" and step(result, "canary").details["code"] == "ok"
    assert any(m.startswith("database") for m in messages) and any(m.startswith("attachments") for m in messages)
    assert f"created database {target_name}" in " ".join(step(result, "target").changed)
    assert result.rto_seconds >= step(result, "database").seconds > 0
    # Contents: the database and the bucket as they were when the backup was taken, not as they are now.
    assert await fingerprints(deployment.target_dsn(target_name), without=FENCED,
                              leave_out=deployment.fenced_rows()) == deployment.rows_at_backup  # fmt: skip
    assert await contents(bucket) == deployment.at_backup
    assert "JWT" in " ".join(result.next_steps)
    # The fences: what the live database revoked or deleted after the backup stays dead, and every vault's
    # sync head is past the live one, so no client's cursor is ahead of the restored vault.
    restored = deployment.target_dsn(target_name)
    assert await sql(restored, "SELECT revoked_at IS NOT NULL FROM refresh_tokens WHERE id = $1::uuid",
                     deployment.revoked_token) is True  # fmt: skip
    assert await sql(restored, "SELECT count(*) FROM api_keys WHERE id = $1::uuid", deployment.deleted_key) == 0
    live_heads = dict(await rows(deployment.db.dsn, "SELECT id, change_seq FROM vaults"))
    restored_heads = dict(await rows(restored, "SELECT id, change_seq FROM vaults"))
    assert live_heads.keys() == restored_heads.keys() and live_heads
    assert all(restored_heads[v] > live_heads[v] for v in live_heads)
    assert step(result, "fence_tokens").changed and step(result, "fence_sync").changed
    # The log of every step is in the repository, under the run id the token names.
    assert result.log == restore_log_key(run_id_of(planned.plan_token))
    raw = (deployment.base / "repo" / result.log).read_text()
    log = RestoreLog.model_validate_json(raw)
    assert [s.name for s in log.steps] == ORDER and log.live_snapshot is not None
    for secret in (env["ENCRYPTION_MASTER_KEY"], BACKUP_KEY, env["STORAGE_SECRET_ACCESS_KEY"], planned.plan_token):
        assert secret not in raw and secret not in repr(answer.structured_content)


@pytest.mark.anyio
async def test_a_changed_premise_refuses_the_token_and_leaves_the_target_untouched(
    deployment: Deployment, admin_dsn: str, target_name: str
) -> None:
    env = deployment.env(f"rr-dst-{secrets.token_hex(4)}")
    await sql(admin_dsn, f'CREATE DATABASE "{target_name}" TEMPLATE template0')
    planned = await plan(env, target_database=target_name)
    assert planned.executable and planned.premises.target_state == "empty"
    await sql(deployment.target_dsn(target_name), "CREATE TABLE meanwhile (x int)")
    with pytest.raises(UnsafeOperation, match=r"premises changed: target_state: 'empty' -> 'non_empty:1'") as info:
        await restore(env, plan_token=planned.plan_token, confirm=True)
    assert "plan_restore again" in info.value.hint
    tables = await sql(deployment.target_dsn(target_name),
                       "SELECT string_agg(tablename, ',') FROM pg_tables WHERE schemaname = 'public'")  # fmt: skip
    assert tables == "meanwhile"


@pytest.mark.anyio
async def test_a_non_empty_target_is_replaced_only_when_the_plan_recorded_that_choice(
    deployment: Deployment, admin_dsn: str, target_name: str
) -> None:
    bucket = await new_bucket(deployment.where(f"rr-dst-{secrets.token_hex(4)}"))
    env = deployment.env(bucket.bucket)
    await sql(admin_dsn, f'CREATE DATABASE "{target_name}" TEMPLATE template0')
    await sql(deployment.target_dsn(target_name), "CREATE TABLE precious (x int)")
    refused = await plan(env, target_database=target_name)
    with pytest.raises(UnsafeOperation, match="the plan does not pass: target: .* not empty"):
        await restore(env, plan_token=refused.plan_token, confirm=True)
    assert await sql(deployment.target_dsn(target_name), "SELECT count(*) FROM pg_tables WHERE tablename = 'precious'")
    chosen = await plan(env, target_database=target_name, allow_non_empty_target=True)
    result = await restore(env, plan_token=chosen.plan_token, confirm=True, reindex_qdrant=False)
    assert result.verdict in ("ok", "warn"), result.summary
    assert any(c.startswith(f"dropped database {target_name}") for c in step(result, "target").changed)
    assert await deployment.restored_rows(target_name) == deployment.rows_at_backup


@pytest.mark.anyio
async def test_anything_connected_to_the_target_refuses_the_restore(
    deployment: Deployment, admin_dsn: str, target_name: str
) -> None:
    env = deployment.env(f"rr-dst-{secrets.token_hex(4)}")
    await sql(admin_dsn, f'CREATE DATABASE "{target_name}" TEMPLATE template0')
    planned = await plan(env, target_database=target_name)
    session = await asyncpg.connect(deployment.target_dsn(target_name))
    try:
        with pytest.raises(UnsafeOperation, match=f"1 session\\(s\\) are connected to {target_name}"):
            await restore(env, plan_token=planned.plan_token, confirm=True)
    finally:
        await session.close()
    public = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
    assert await sql(deployment.target_dsn(target_name), public) == 0


@pytest.mark.anyio
async def test_a_failure_in_the_attachments_step_stops_there_and_resume_completes_it(
    deployment: Deployment, target_name: str
) -> None:
    missing = deployment.where(f"rr-late-{secrets.token_hex(4)}")  # not created yet: the injected failure
    env = deployment.env(missing.bucket)
    planned = await plan(env, target_database=target_name)
    first = await restore(env, plan_token=planned.plan_token, confirm=True)
    assert (first.verdict, first.failed_step) == ("fail", "attachments"), first.summary
    assert [s.name for s in first.steps] == ORDER[: ORDER.index("attachments") + 1]
    assert "complete, verified database" in first.target_state and "resume=true" in first.summary
    # Without resume the same token is refused: the target is no longer what the plan saw.
    with pytest.raises(UnsafeOperation, match="premises changed: target_state") as info:
        await restore(env, plan_token=planned.plan_token, confirm=True)
    assert "resume=true" in info.value.hint
    await new_bucket(missing)
    async with Runtime(load_settings(environ=env)) as runtime:
        params = RunRestoreInput(plan_token=planned.plan_token, resume=True)
        asked = confirmation(params, await run_restore_tool(runtime, params, silent))
    # What the user confirms a resume by: not the re-plan's "DO NOT RESTORE yet" about the run's own target.
    assert asked is not None and "DO NOT RESTORE" not in asked and "own partial restore" in asked, asked
    second = await restore(env, plan_token=planned.plan_token, confirm=True, resume=True)
    assert "DO NOT RESTORE" not in step(second, "premises").summary
    assert second.verdict in ("ok", "warn") and second.resumed, second.summary
    assert [s.name for s in second.steps] == ORDER
    # The steps that had passed were kept from the log, not run again.
    assert step(second, "database") == step(first, "database")
    assert await contents(missing) == deployment.at_backup
    # (The rebuild queued below re-stamps notes and adds jobs: the other tables are compared.)
    restored = await deployment.restored_rows(target_name)
    rebuilt = ("notes", "oban_jobs")
    assert {t: v for t, v in restored.items() if t not in rebuilt} == {
        t: v for t, v in deployment.rows_at_backup.items() if t not in rebuilt}  # fmt: skip
    # The Qdrant rebuild is queued in the restored database: one EmbedNote job per eligible note.
    queued = await sql(deployment.target_dsn(target_name),
                       "SELECT count(*) FROM oban_jobs WHERE worker = 'Engram.Workers.EmbedNote'")  # fmt: skip
    assert queued == step(second, "qdrant").details["enqueued"] > 0


@pytest.mark.anyio
async def test_a_master_key_that_does_not_open_the_restored_canary_stops_at_the_canary_step(
    deployment: Deployment, tmp_path: Path, target_name: str
) -> None:
    # A manifest whose recorded canary was re-wrapped under another key: the plan's offline check passes
    # with that key, the restored canary (from the dump) does not open with it.
    shutil.copytree(deployment.base / "repo", tmp_path / "repo")
    other = secrets.token_bytes(32)
    manifest_path = next((tmp_path / "repo" / "backups").glob("*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    wrapped, digest = engram_crypto.make_canary(other)
    manifest["canary"] |= {"wrapped_dek_b64": base64.b64encode(wrapped).decode(),
                           "dek_sha256_hex": digest.hex()}  # fmt: skip
    manifest_path.write_text(json.dumps(manifest))
    env = deployment.env(f"rr-dst-{secrets.token_hex(4)}", base=tmp_path,
                         ENCRYPTION_MASTER_KEY=engram_crypto.encode_master_key(other))  # fmt: skip
    planned = await plan(env, target_database=target_name)
    assert next(c for c in planned.checks if c.name == "master_key").status == "ok", planned.summary
    result = await restore(env, plan_token=planned.plan_token, confirm=True)
    assert (result.verdict, result.failed_step) == ("fail", "canary"), result.summary
    assert step(result, "canary").details["code"] == "wrong_key"
    assert "do NOT boot Engram" in result.target_state


@pytest.mark.anyio
async def test_tokens_without_premises_or_without_a_master_key_are_refused(deployment: Deployment) -> None:
    env = deployment.env("unused")
    with pytest.raises(ConfigurationError, match="re-plan"):
        await restore(env, plan_token="ptk1.m." + "0" * 64, confirm=True)
    planned = await plan(env, target_database="engram_never_" + secrets.token_hex(4))
    tampered = planned.plan_token.rsplit(".", 1)[0] + ".AAAA"
    with pytest.raises(UnsafeOperation, match="not issued under this ENCRYPTION_MASTER_KEY, or was altered"):
        await restore(env, plan_token=tampered, confirm=True)
    keyless = {k: v for k, v in env.items() if k != "ENCRYPTION_MASTER_KEY"}
    with pytest.raises(ConfigurationError, match="ENCRYPTION_MASTER_KEY"):
        await restore(keyless, plan_token=planned.plan_token, confirm=True)


@pytest.mark.anyio
async def test_the_confirmation_text_names_the_recovery_point_the_target_and_the_consequences(
    deployment: Deployment, admin_dsn: str
) -> None:
    env = deployment.env("unused")
    name = "engram_never_" + secrets.token_hex(4)
    planned = await plan(env, target_database=name)
    async with Runtime(load_settings(environ=env)) as runtime:
        params = RunRestoreInput(plan_token=planned.plan_token)
        text = confirmation(params, await run_restore_tool(runtime, params, silent))
    assert text is not None and planned.recovery_point.backup_id in text and name in text
    assert await databases(admin_dsn, name) == 0


@pytest.mark.anyio
async def test_a_restore_in_place_over_the_live_database_replaces_it_when_the_plan_chose_so(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    # STORAGE_BACKEND=database: the attachments come back with the rows; nothing to copy.
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY)
    async with Runtime(load_settings(environ=env)) as runtime:
        assert (await run_backup(runtime, RunBackupInput(), silent)).verified
    at_backup = await fingerprints(engram_db.dsn, without=FENCED)
    await sql(engram_db.dsn, "DELETE FROM notes")
    planned = await plan(env, allow_non_empty_target=True)
    assert planned.target_database == engram_db.name and planned.executable, planned.summary
    async with Runtime(load_settings(environ=env)) as runtime:
        async with runtime.pool.acquire() as conn:  # the server's own pool holds a connection to the live database
            await conn.fetchval("SELECT 1")
        result = await run_restore_tool(runtime, RunRestoreInput(plan_token=planned.plan_token, confirm=True),
                                        silent)  # fmt: skip
    assert result.verdict in ("ok", "warn"), result.summary
    assert step(result, "attachments").status == "skipped"
    assert any(c.startswith(f"dropped database {engram_db.name}") for c in step(result, "target").changed)
    # The live database was restored: the collection that serves it is rebuilt from scratch.
    assert any(c.startswith("dropped and re-created the Qdrant collection") for c in step(result, "qdrant").changed)
    rebuilt = ("notes", "oban_jobs")  # re-stamped and queued by the rebuild
    restored = await fingerprints(engram_db.dsn, without=FENCED)
    assert {t: v for t, v in restored.items() if t not in rebuilt} == {
        t: v for t, v in at_backup.items() if t not in rebuilt}  # fmt: skip
    assert restored["notes"][0] == at_backup["notes"][0]
    assert "Boot Engram" in result.next_steps[0]


@pytest.mark.anyio
async def test_a_database_step_that_fails_half_way_is_restored_again_from_a_fresh_target_on_resume(
    deployment: Deployment, target_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = await new_bucket(deployment.where(f"rr-dst-{secrets.token_hex(4)}"))
    env = deployment.env(bucket.bucket)
    planned = await plan(env, target_database=target_name)
    real = restore_database

    async def dies_after_loading(*args: Any, **kwargs: Any) -> Any:
        await real(*args, **kwargs)  # the rows are in: a failure now leaves a full, unverified database behind
        raise StoreUnreachable("the connection to PostgreSQL was lost during the restore", "run it again")

    monkeypatch.setattr(run_steps, "restore_database", dies_after_loading)
    first = await restore(env, plan_token=planned.plan_token, confirm=True, reindex_qdrant=False)
    assert (first.verdict, first.failed_step) == ("fail", "database"), first.summary
    assert "PARTIAL restore" in first.target_state
    monkeypatch.setattr(run_steps, "restore_database", real)
    second = await restore(env, plan_token=planned.plan_token, confirm=True, resume=True, reindex_qdrant=False)
    assert second.verdict in ("ok", "warn"), second.summary
    changed = step(second, "target").changed
    assert changed[0].startswith(f"dropped database {target_name}") and "own partial restore" in changed[0]
    assert await deployment.restored_rows(target_name) == deployment.rows_at_backup
    assert await contents(bucket) == deployment.at_backup


@pytest.mark.anyio
async def test_a_second_run_into_the_same_target_is_refused_while_the_first_holds_it(
    deployment: Deployment, target_name: str
) -> None:
    env = deployment.env(f"rr-dst-{secrets.token_hex(4)}")
    planned = await plan(env, target_database=target_name)
    holder = postgres.with_database(deployment.db.dsn, "postgres")
    async with database_lock(holder, restore_lock(target_name)):
        with pytest.raises(Busy, match=f"another run_restore into {target_name} is running"):
            await restore(env, plan_token=planned.plan_token, confirm=True)
    assert await databases(holder, target_name) == 0


@pytest.mark.anyio
async def test_roles_the_dump_names_and_the_server_lacks_are_created_nologin(
    deployment: Deployment, tmp_path: Path, admin_dsn: str, target_name: str
) -> None:
    shutil.copytree(deployment.base / "repo", tmp_path / "repo")
    gone = "engram_gone_" + secrets.token_hex(4)
    manifest_path = next((tmp_path / "repo" / "backups").glob("*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest["database"]["roles_referenced"].append(gone)
    manifest_path.write_text(json.dumps(manifest))
    bucket = await new_bucket(deployment.where(f"rr-dst-{secrets.token_hex(4)}"))
    env = deployment.env(bucket.bucket, base=tmp_path)
    planned = await plan(env, target_database=target_name)
    assert next(c for c in planned.checks if c.name == "roles").code == "roles_missing"
    try:
        result = await restore(env, plan_token=planned.plan_token, confirm=True, reindex_qdrant=False)
        assert result.verdict in ("ok", "warn"), result.summary
        assert step(result, "roles").changed == [f"created role {gone} NOLOGIN"]
        assert "cannot log in yet" in step(result, "roles").summary
        assert await sql(admin_dsn, "SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", gone) is False
    finally:
        await sql(admin_dsn, f'DROP DATABASE IF EXISTS "{target_name}" WITH (FORCE)')
        await sql(admin_dsn, f'DROP ROLE IF EXISTS "{gone}"')


@pytest.mark.anyio
async def test_the_command_line_call_changes_nothing_without_confirm(
    deployment: Deployment, admin_dsn: str, target_name: str
) -> None:
    env = deployment.env(f"rr-dst-{secrets.token_hex(4)}")
    planned = await plan(env, target_database=target_name)
    done = await anyio.run_process([sys.executable, "-m", "engram_recovery.server.cli", "call", "run_restore",
                                    "--arg", f"plan_token={planned.plan_token}", "--json"], env=env,
                                   check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["verdict"] == "not_confirmed"
    assert await databases(admin_dsn, target_name) == 0


@pytest.mark.anyio
async def test_resume_after_a_target_step_that_created_nothing_drops_nothing(
    deployment: Deployment, admin_dsn: str, target_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target step refused (someone created the target database, with a table, after the premises were
    checked): this run created nothing there, so resume=true must not treat it as its own partial restore."""
    env = deployment.env(f"rr-dst-{secrets.token_hex(4)}")
    planned = await plan(env, target_database=target_name)
    assert planned.premises.target_state == "absent"
    real = run_steps.DumpSource.needs

    async def meanwhile(self: run_steps.DumpSource, ctx: run_steps.Context) -> run_steps.Needs:
        if not await databases(admin_dsn, target_name):  # during the roles step: another client gets there first
            await sql(admin_dsn, f'CREATE DATABASE "{target_name}" TEMPLATE template0')
            await sql(deployment.target_dsn(target_name), "CREATE TABLE precious (x int)")
        return await real(self, ctx)

    monkeypatch.setattr(run_steps.DumpSource, "needs", meanwhile)
    first = await restore(env, plan_token=planned.plan_token, confirm=True)
    assert (first.verdict, first.failed_step) == ("fail", "target"), first.summary
    assert "nothing was dropped" in step(first, "target").summary
    monkeypatch.setattr(run_steps.DumpSource, "needs", real)
    with pytest.raises(UnsafeOperation, match="premises changed: target_state: 'absent' -> 'non_empty:1'") as info:
        await restore(env, plan_token=planned.plan_token, confirm=True, resume=True)
    assert "resume=true" not in info.value.hint
    assert await sql(deployment.target_dsn(target_name), "SELECT count(*) FROM pg_tables WHERE tablename = 'precious'")


@pytest.mark.anyio
async def test_a_token_whose_backup_was_pruned_is_refused_and_changes_nothing(
    deployment: Deployment, tmp_path: Path, admin_dsn: str, target_name: str
) -> None:
    shutil.copytree(deployment.base / "repo", tmp_path / "repo")
    env = deployment.env(f"rr-dst-{secrets.token_hex(4)}", base=tmp_path)
    planned = await plan(env, target_database=target_name)
    assert planned.executable, planned.summary
    shutil.rmtree(tmp_path / "repo" / "backups" / planned.recovery_point.backup_id)
    # The only backup is gone: the answer names it and says to re-plan, not "run run_backup first" (a backup of
    # the broken live database is the wrong fix on the day of a restore).
    with pytest.raises(UnsafeOperation, match=f"premises changed: backup {planned.recovery_point.backup_id} .* no "
                       "longer in the repository") as info:  # fmt: skip
        await restore(env, plan_token=planned.plan_token, confirm=True)
    assert "plan_restore again" in info.value.hint and "run_backup" not in str(info.value)
    assert await databases(admin_dsn, target_name) == 0


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_declined_elicitation_changes_nothing_and_an_accepted_one_restores(
    deployment: Deployment, admin_dsn: str, target_name: str, mode: str
) -> None:
    bucket = await new_bucket(deployment.where(f"rr-dst-{secrets.token_hex(4)}"))
    env = deployment.env(bucket.bucket)
    planned = await plan(env, target_database=target_name)
    asked: list[str] = []

    def user(answer: types.ElicitResult) -> Any:
        async def answering(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
            asked.append(params.message)
            return answer

        return answering

    call = {"plan_token": planned.plan_token, "reindex_qdrant": False}
    no = types.ElicitResult(action="decline")
    async with Client(build_server(load_settings(environ=env)), mode=mode, elicitation_callback=user(no)) as client:
        declined = await client.call_tool("run_restore", call)
    assert not declined.is_error and declined.structured_content is not None, declined.content
    assert declined.structured_content["verdict"] == "not_confirmed"
    assert declined.structured_content["summary"].startswith(DECLINED)
    assert len(asked) == 1 and target_name in asked[0] and planned.recovery_point.backup_id in asked[0]
    assert await databases(admin_dsn, target_name) == 0 and await contents(bucket) == {}
    assert not (deployment.base / "repo" / restore_log_key(run_id_of(planned.plan_token))).exists()
    yes = types.ElicitResult(action="accept", content={"confirm": True})
    async with Client(build_server(load_settings(environ=env)), mode=mode, elicitation_callback=user(yes)) as client:
        accepted = await client.call_tool("run_restore", call)
    assert not accepted.is_error and accepted.structured_content is not None, accepted.content
    assert accepted.structured_content["verdict"] in ("ok", "warn"), accepted.structured_content["summary"]
    assert len(asked) == 2
    assert await deployment.restored_rows(target_name) == deployment.rows_at_backup


async def stopped_in_the_sync_fence(
    deployment: Deployment, target_name: str, monkeypatch: pytest.MonkeyPatch, **params: Any
) -> tuple[dict[str, str], str, RunRestoreResult]:
    """A run (with `params`) whose connection breaks in the sync fence: its env, plan token and result; the fence
    works again afterwards."""
    bucket = await new_bucket(deployment.where(f"rr-dst-{secrets.token_hex(4)}"))
    env = deployment.env(bucket.bucket)
    planned = await plan(env, target_database=target_name)

    async def lost(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionResetError(104, "Connection reset by peer")

    with monkeypatch.context() as patched:
        patched.setattr(fences, "fence_sync", lost)
        first = await restore(env, plan_token=planned.plan_token, confirm=True, reindex_qdrant=False, **params)
    assert (first.verdict, first.failed_step) == ("fail", "fence_sync"), first.summary
    return env, planned.plan_token, first


@pytest.mark.anyio
async def test_a_connection_lost_in_a_fence_is_a_failed_step_that_says_what_the_target_holds_and_resume_completes(
    deployment: Deployment, target_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, token, first = await stopped_in_the_sync_fence(deployment, target_name, monkeypatch)
    assert "connection to PostgreSQL broke" in step(first, "fence_sync").summary
    assert "not every fence is applied" in first.target_state and "resume=true" in first.summary
    log = RestoreLog.model_validate_json((deployment.base / "repo" / str(first.log)).read_text())
    assert log.steps[-1].name == "fence_sync" and log.steps[-1].status == "failed"
    second = await restore(env, plan_token=token, confirm=True, resume=True, reindex_qdrant=False)
    assert second.verdict in ("ok", "warn"), second.summary
    assert step(second, "fence_sync").changed and step(second, "fence_tokens") == step(first, "fence_tokens")


@pytest.mark.anyio
async def test_a_fence_switched_off_in_the_run_that_stopped_is_applied_by_a_resume_that_switches_it_on(
    deployment: Deployment, target_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run stops after the token fence, switched off.
    env, token, first = await stopped_in_the_sync_fence(deployment, target_name, monkeypatch, revoke_tokens=False)
    assert step(first, "fence_tokens").status == "skipped"
    second = await restore(env, plan_token=token, confirm=True, resume=True, reindex_qdrant=False)
    assert second.verdict in ("ok", "warn"), second.summary
    assert step(second, "fence_tokens").status == "ok"  # asked again, not the first run's "skipped" kept
    assert step(second, "qdrant").status == "skipped" and "switched off" in step(second, "qdrant").summary


@pytest.mark.anyio
async def test_the_database_password_is_in_no_result_progress_message_log_or_error(
    deployment: Deployment, target_name: str
) -> None:
    password = "pw-" + secrets.token_hex(12)
    dsn = deployment.db.dsn.replace("://postgres@", f"://postgres:{password}@")
    assert password in dsn
    missing = deployment.where(f"rr-late-{secrets.token_hex(4)}")  # the run stops at the attachments step
    env = deployment.env(missing.bucket, DATABASE_URL=dsn)
    planned = await plan(env, target_database=target_name)
    assert password not in planned.model_dump_json()
    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    async with Client(build_server(load_settings(environ=env))) as client:
        answer = await client.call_tool("run_restore", {"plan_token": planned.plan_token, "confirm": True},
                                        progress_callback=on_progress)  # fmt: skip
        assert answer.structured_content is not None and answer.structured_content["verdict"] == "fail"
        # The server gone (a port nothing listens on): the error names it, not the password.
        unreachable = env | {"DATABASE_URL": f"postgresql://postgres:{password}@127.0.0.1:9/{target_name}"}
    async with Client(build_server(load_settings(environ=unreachable))) as client:
        refused = await client.call_tool("run_restore", {"plan_token": planned.plan_token, "confirm": True})
    assert refused.is_error
    # An unreachable server is not a premise that moved (re-planning would not help): cause and fix.
    text = str(refused.content[0].text)  # type: ignore[union-attr]
    assert text.startswith("the target server is unreachable: ") and "premises changed" not in text, text
    assert "\nFix: start it or fix DATABASE_URL, then run the same plan_token again" in text, text
    log = (deployment.base / "repo" / str(answer.structured_content["log"])).read_text()
    for text in (repr(answer.content), json.dumps(answer.structured_content), log, " ".join(messages),
                 repr(refused.content)):  # fmt: skip
        assert password not in text
    assert messages and "postgres" in log


@pytest.mark.anyio
async def test_an_in_place_restore_that_fails_half_way_resumes_with_the_live_snapshot_it_took_first(
    engram_db: EngramDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst day: the live database itself was dropped by the target step, then the database step failed.
    resume=true must re-plan against the run's own partial database, and the fences must use the snapshot of
    the live database taken before the drop (in the log), not the partial one."""
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY)
    async with Runtime(load_settings(environ=env)) as runtime:
        assert (await run_backup(runtime, RunBackupInput(), silent)).verified
    at_backup = await fingerprints(engram_db.dsn, without=FENCED)
    token = await sql(engram_db.dsn, "SELECT id::text FROM refresh_tokens WHERE revoked_at IS NULL ORDER BY id LIMIT 1")
    await sql(engram_db.dsn, "UPDATE refresh_tokens SET revoked_at = now() WHERE id = $1::uuid", token)
    planned = await plan(env, allow_non_empty_target=True)
    assert planned.executable, planned.summary
    real = restore_database

    async def dies_after_loading(*args: Any, **kwargs: Any) -> Any:
        await real(*args, **kwargs)
        raise StoreUnreachable("the connection to PostgreSQL was lost during the restore", "run it again")

    monkeypatch.setattr(run_steps, "restore_database", dies_after_loading)
    first = await restore(env, plan_token=planned.plan_token, confirm=True, reindex_qdrant=False)
    assert (first.verdict, first.failed_step) == ("fail", "database"), first.summary
    monkeypatch.setattr(run_steps, "restore_database", real)
    second = await restore(env, plan_token=planned.plan_token, confirm=True, resume=True, reindex_qdrant=False)
    assert second.verdict in ("ok", "warn"), second.summary
    assert step(second, "snapshot_live") == step(first, "snapshot_live")
    # The token revoked in live after the backup stays revoked: the fence read live before the drop.
    assert await sql(engram_db.dsn, "SELECT revoked_at IS NOT NULL FROM refresh_tokens WHERE id = $1::uuid", token)
    restored = await fingerprints(engram_db.dsn, without=FENCED)
    assert {t: v for t, v in restored.items() if t != "refresh_tokens"} == {
        t: v for t, v in at_backup.items() if t != "refresh_tokens"}  # fmt: skip


@pytest.mark.anyio
async def test_a_target_dropped_by_choice_and_not_created_again_is_reported_dropped_not_untouched(
    deployment: Deployment, admin_dsn: str, target_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = deployment.env(f"rr-dst-{secrets.token_hex(4)}")
    await sql(admin_dsn, f'CREATE DATABASE "{target_name}" TEMPLATE template0')
    await sql(deployment.target_dsn(target_name), "CREATE TABLE old (x int)")
    planned = await plan(env, target_database=target_name, allow_non_empty_target=True)
    real = run_steps.DumpSource.needs
    calls: list[int] = []

    async def create_fails(self: run_steps.DumpSource, ctx: run_steps.Context) -> run_steps.Needs:
        calls.append(1)
        if len(calls) == 2:  # the target step, after its DROP: CREATE DATABASE will fail ("already exists")
            await sql(admin_dsn, f'CREATE DATABASE "{target_name}" TEMPLATE template0')
        return await real(self, ctx)

    monkeypatch.setattr(run_steps.DumpSource, "needs", create_fails)
    result = await restore(env, plan_token=planned.plan_token, confirm=True)
    assert (result.verdict, result.failed_step) == ("fail", "target"), result.summary
    assert step(result, "target").summary.startswith(f"dropped database {target_name} (1 table(s)")
    assert "was DROPPED" in result.target_state and "untouched" not in result.target_state
    assert "resume=true" not in result.summary


@pytest.mark.anyio
async def test_resume_trusts_no_step_log_it_did_not_seal(deployment: Deployment, target_name: str) -> None:
    """The log says which steps are done, and resume skips them (the database's verification, the canary): a log
    edited in the repository (here: a failed canary turned into a passed one) is refused, nothing changed."""
    missing = deployment.where(f"rr-late-{secrets.token_hex(4)}")  # the run stops at the attachments step
    env = deployment.env(missing.bucket)
    planned = await plan(env, target_database=target_name)
    first = await restore(env, plan_token=planned.plan_token, confirm=True)
    assert first.failed_step == "attachments", first.summary
    path = deployment.base / "repo" / str(first.log)
    log = json.loads(path.read_text())
    assert log["seal"]
    next(s for s in log["steps"] if s["name"] == "canary")["summary"] = "edited"
    path.write_text(json.dumps(log))
    with pytest.raises(UnsafeOperation, match="was not written under this ENCRYPTION_MASTER_KEY, or was altered"):
        await restore(env, plan_token=planned.plan_token, confirm=True, resume=True)
    assert json.loads(path.read_text()) == log  # not rewritten: the run stopped before any step
