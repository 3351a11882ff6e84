"""run_restore of a plan_token for `recovery_point="at:<time>"`, on PostgreSQL 18 with Barman streaming and a versioned
SeaweedFS bucket: a seeded Engram database with S3 attachments, a base backup, two marked writes with the bucket and
the live database changed in between; the restore into a fresh target database shows the first mark and not the
second, its row counts equal the recovered server's, the canary opens, the attachments are rolled back to their
versions of the time, the fences hold, the scratch server is gone and the log is written. A changed premise, a time
no longer in the window and confirm=false change nothing."""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import archiving_support
import asyncpg
import pytest
from archiving_support import archive_cluster, backup_under_writes, receiving, streaming_barman, write_two_marks
from support import (
    bucket_contents,
    bucket_env,
    databases_named,
    engram_env,
    fetchval,
    make_engram_db,
    new_bucket,
    restore,
)
from support import (
    restore_step as step,
)

from engram_recovery.core.errors import RecoveryError, UnsafeOperation
from engram_recovery.core.progress import silent
from engram_recovery.core.restore.run import RestoreLog
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores import s3
from engram_recovery.core.stores.pgclient import process
from engram_recovery.core.stores.pgclient.commands import PgClientCommand
from engram_recovery.core.stores.s3 import S3Location
from engram_recovery.testbed.seaweedfs import SeaweedFS
from engram_recovery.tools.plan_restore import PlanRestoreInput, PlanRestoreResult, plan_restore

ORDER = ["premises", "sessions", "snapshot_live", "roles", "target", "database", "canary", "attachments",
         "fence_tokens", "fence_sync", "protect_orphans", "qdrant", "remove_server"]  # fmt: skip
SCRATCH = "engram-pitr-restore-*"


@dataclass(frozen=True)
class Archived(archiving_support.Archived):
    bucket: S3Location
    originals: dict[str, bytes]  # the attachments as uploaded before the time
    spoiled: str  # overwritten after the time
    deleted: str  # deleted after the time
    revoked_token: str  # revoked in the live database after the time
    weed: SeaweedFS

    def env(self, base: Path, **extra: str) -> dict[str, str]:
        return engram_env(self.db, base, ENGRAM_RECOVERY_BARMAN_CONFIG=str(self.config),
                          ENGRAM_RECOVERY_BARMAN_SERVER="engram", **(bucket_env(self.bucket) | extra))  # fmt: skip


@pytest.fixture(scope="module")
async def archived(
    master_key: bytes, weed: SeaweedFS, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Archived]:
    with archive_cluster("archive_timeout=60", "track_commit_timestamp=on", "autovacuum=off") as archive:
        config, barman = await streaming_barman(archive, tmp_path_factory.mktemp("barman"))
        async for db in make_engram_db(archive.url, master_key, storage="s3", notes=30, attachments=6):
            originals = dict(db.report.attachment_objects)
            bucket = await new_bucket(weed, originals, versioned=True)
            spoiled, deleted = sorted(originals)[:2]
            async with receiving(barman):
                async with backup_under_writes(barman, archive.url) as backup:
                    between, _ = await write_two_marks(db.dsn, "pitr_marks", pause=1.2)  # S3 times are whole seconds
                    conn = await asyncpg.connect(db.dsn)
                    try:
                        token = await conn.fetchval("SELECT id::text FROM refresh_tokens WHERE revoked_at IS NULL "
                                                    "ORDER BY id LIMIT 1")  # fmt: skip
                        await conn.execute("UPDATE refresh_tokens SET revoked_at = now() WHERE id = $1::uuid", token)
                    finally:
                        await conn.close()
                    async with s3.client(bucket) as c:
                        await c.put_object(Bucket=bucket.bucket, Key=spoiled, Body=b"not the attachment")
                        await c.delete_object(Bucket=bucket.bucket, Key=deleted)
            yield Archived(db, config, barman, backup, between, bucket, originals, spoiled, deleted, token, weed)


async def plan(env: dict[str, str], point: str, target: str) -> PlanRestoreResult:
    async with Runtime(load_settings(environ=env)) as runtime:
        return await plan_restore(runtime, PlanRestoreInput(recovery_point=point, target_database=target), silent)


async def counts(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        tables = [r["t"] for r in await conn.fetch(
            "SELECT table_schema || '.' || table_name AS t FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'")]  # fmt: skip
        return {t: int(await conn.fetchval(f"SELECT count(*) FROM {t}")) for t in tables}
    finally:
        await conn.close()


async def plan_between(archived: Archived, tmp_path: Path) -> tuple[dict[str, str], str, PlanRestoreResult]:
    """An executable plan to a new database at the time between the two marks: env, target, plan."""
    env = archived.env(tmp_path)
    target = "engram_pitr_" + secrets.token_hex(4)
    planned = await plan(env, f"at:{archived.between.isoformat()}", target)
    assert planned.executable, planned.summary
    return env, target, planned


def scratch_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob(SCRATCH))


@pytest.mark.anyio
@pytest.mark.slow
async def test_run_restore_at_a_time_between_two_marks_restores_the_first_only_verified_and_fenced(
    archived: Archived, tmp_path: Path
) -> None:
    env, target, planned = await plan_between(archived, tmp_path)
    assert planned.premises.point_in_time == archived.between and planned.premises.target_state == "absent"
    assert planned.steps[-1].id == "restore"
    before = scratch_dirs()
    # Not confirmed: the plan is re-checked, nothing happens (no database, the bucket still spoiled, no log).
    preview = await restore(env, plan_token=planned.plan_token)
    assert preview.verdict == "not_confirmed" and "nothing was changed" in preview.summary
    assert archived.between.isoformat() in preview.summary
    assert await databases_named(archived.db.dsn, target) == 0
    assert (await bucket_contents(archived.bucket))[archived.spoiled] == b"not the attachment"
    assert not (tmp_path / "repo" / "restores").exists() and scratch_dirs() == before

    result = await restore(env, plan_token=planned.plan_token, confirm=True, reindex_qdrant=False)
    assert result.verdict in ("ok", "warn"), result.summary
    assert [s.name for s in result.steps] == ORDER, [(s.name, s.status, s.summary) for s in result.steps]
    assert all(s.status in ("ok", "skipped") for s in result.steps), [(s.name, s.summary) for s in result.steps]
    restored = archived.db.sibling_dsn(target)
    # The first mark and not the second: replay stopped at the time asked.
    assert await fetchval(restored, "SELECT array_agg(n ORDER BY n) FROM pitr_marks") == [1]
    # Verified against the recovered server: its counts (the database step's reference) are the target's.
    database = step(result, "database")
    assert database.details["counts"] == await counts(restored)
    assert database.details["counts"]["public.pitr_marks"] == 1
    assert database.details["tables"] > 10 and database.details["indexes"] > 0 and database.details["constraints"] > 0
    assert set(database.details["timings"]) == {"dump", "restore", "verify"}
    # The time was recovered during the first step that needed the scratch server (the roles it names), and said.
    recovered = step(result, "roles").details["recovered"]
    assert recovered["recover_seconds"] > 0 and recovered["replay_seconds"] > 0
    assert "first recovered" in step(result, "roles").summary
    assert "every row count equal to the recovered server's" in database.summary
    # The canary opens with the master key.
    assert step(result, "canary").details["code"] == "ok"
    # The attachments as of the time: the overwritten one and the deleted one copied back from their old versions.
    attachments = step(result, "attachments")
    assert attachments.details["copied"] == 2 and attachments.details["lacking"] == 0, attachments.summary
    assert sorted(attachments.details["copied_keys"]) == sorted([archived.spoiled, archived.deleted])
    now = await bucket_contents(archived.bucket)
    assert {k: now[k] for k in archived.originals} == archived.originals
    # The fences: the token revoked in the live database after the time stays revoked.
    assert await fetchval(restored, "SELECT revoked_at IS NOT NULL FROM refresh_tokens WHERE id = $1::uuid",
                          archived.revoked_token) is True  # fmt: skip
    assert step(result, "fence_tokens").changed and step(result, "fence_sync").changed
    # The scratch server is stopped and its directory removed.
    assert scratch_dirs() == before
    assert "stopped the scratch server and removed" in step(result, "remove_server").summary
    # The step log, with the RTO per step.
    assert result.log is not None
    log = RestoreLog.model_validate_json((tmp_path / "repo" / result.log).read_text())
    assert [s.name for s in log.steps] == ORDER and log.premises.point_in_time == archived.between
    assert result.rto_seconds >= database.seconds > 0


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_failed_database_step_removes_the_scratch_server_and_resume_recovers_again(
    archived: Archived, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = archived.env(tmp_path)
    target = "engram_pitr_" + secrets.token_hex(4)
    planned = await plan(env, f"at:{archived.between.isoformat()}", target)
    before = scratch_dirs()
    real = process.run

    async def dies_after_restoring(command: PgClientCommand, fix: str, what: str | None = None) -> str:
        out = await real(command, fix, what)
        if command.name == "pg_restore":
            raise RecoveryError("the connection was lost (injected)", fix)
        return out

    monkeypatch.setattr(process, "run", dies_after_restoring)
    first = await restore(env, plan_token=planned.plan_token, confirm=True, reindex_qdrant=False)
    assert first.verdict == "fail" and first.failed_step == "database" and "injected" in first.summary
    assert [s.name for s in first.steps][-2:] == ["database", "remove_server"] and scratch_dirs() == before
    assert "PARTIAL restore" in first.target_state
    monkeypatch.setattr(process, "run", real)
    second = await restore(env, plan_token=planned.plan_token, confirm=True, resume=True, reindex_qdrant=False)
    assert second.verdict == "ok", second.summary
    assert [s.name for s in second.steps] == ORDER
    # The partial target was dropped and the time recovered again (a new scratch server, removed again).
    assert any("dropped database" in c for c in step(second, "target").changed)
    assert step(second, "target").details["recovered"]["recover_seconds"] > 0
    assert await fetchval(archived.db.sibling_dsn(target), "SELECT array_agg(n ORDER BY n) FROM pitr_marks") == [1]
    assert scratch_dirs() == before
    # The attachments were rolled back by the first test or are now: nothing differs from the time's versions.
    assert step(second, "attachments").details["lacking"] == 0


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_changed_target_refuses_the_token_with_nothing_touched(archived: Archived, tmp_path: Path) -> None:
    env, target, planned = await plan_between(archived, tmp_path)
    await fetchval(archived.db.dsn, f'CREATE DATABASE "{target}" TEMPLATE template0')
    try:
        await fetchval(archived.db.sibling_dsn(target), "CREATE TABLE meanwhile (x int)")
        before = scratch_dirs()
        with pytest.raises(UnsafeOperation, match=r"premises changed: target_state: 'absent' -> 'non_empty:1'"):
            await restore(env, plan_token=planned.plan_token, confirm=True)
        tables = await fetchval(archived.db.sibling_dsn(target),
                                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")  # fmt: skip
        assert tables == 1
        assert scratch_dirs() == before and not (tmp_path / "repo" / "restores").exists()
    finally:
        await fetchval(archived.db.dsn, f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')


@pytest.mark.anyio
@pytest.mark.slow
async def test_onto_a_new_server_after_losing_the_old_one_the_roles_are_created_and_the_fences_fall_back(
    archived: Archived, tmp_path: Path
) -> None:
    """The disaster case: DATABASE_URL now names a fresh PostgreSQL 18 (the old one is gone), which has neither
    Engram's roles nor its database. The time is recovered from Barman's archive all the same."""
    with archive_cluster() as fresh:
        dsn = f"{fresh.url.rsplit('/', 1)[0]}/{archived.db.name}"
        env = archived.env(tmp_path, DATABASE_URL=dsn)
        planned = await plan(env, f"at:{archived.between.isoformat()}", archived.db.name)
        assert planned.executable and planned.premises.target_state == "absent", planned.summary
        result = await restore(env, plan_token=planned.plan_token, confirm=True, reindex_qdrant=False)
        assert result.verdict == "warn", result.summary  # the live database is not readable: said, not failed
        assert [s.name for s in result.steps] == ORDER
        assert step(result, "snapshot_live").status == "warn"
        created = " ".join(step(result, "roles").changed)
        assert "created role engram_app NOLOGIN" in created and "first recovered" in step(result, "roles").summary
        assert await fetchval(dsn, "SELECT array_agg(n ORDER BY n) FROM pitr_marks") == [1]
        assert step(result, "database").details["counts"] == await counts(dsn)
        assert step(result, "canary").details["code"] == "ok"
        owners = await fetchval(dsn, "SELECT array_agg(DISTINCT pg_get_userbyid(relowner)) FROM pg_class c JOIN "
                                "pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'")  # fmt: skip
        assert owners == await fetchval(archived.db.dsn, "SELECT array_agg(DISTINCT pg_get_userbyid(relowner)) FROM "
                                        "pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                        "WHERE n.nspname = 'public'")  # fmt: skip
        # No live database to compare with: every refresh token is revoked (everyone signs in again).
        assert await fetchval(dsn, "SELECT count(*) FROM refresh_tokens WHERE revoked_at IS NULL") == 0


@pytest.mark.anyio
@pytest.mark.slow
async def test_zz_a_time_no_longer_in_the_window_is_refused_with_nothing_touched(
    archived: Archived, tmp_path: Path
) -> None:
    """Last in the module: it deletes the base backup (the window's start moves past the time)."""
    env, target, planned = await plan_between(archived, tmp_path)
    command = archived.barman.command
    await anyio.run_process([command.binary, "-c", str(archived.config), "delete", command.server,
                             archived.backup.backup_id])  # fmt: skip
    before = scratch_dirs()
    with pytest.raises(UnsafeOperation, match="premises changed: no time can be recovered") as refused:
        await restore(env, plan_token=planned.plan_token, confirm=True)
    assert "nothing was changed" in refused.value.message and "plan_restore again" in refused.value.hint
    assert await databases_named(archived.db.dsn, target) == 0
    assert scratch_dirs() == before and not (tmp_path / "repo" / "restores").exists()
