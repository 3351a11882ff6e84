"""PostgreSQL 15 beside 18: a 15 dump restores into 18; a 15 client is refused by 18, with a fix that works here.

The main server is 18 (the bundled one); the host's 15 (Debian's, 127.0.0.1:5432) and its
clients are used only here, and these tests skip where they are absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from support import EngramDB, engram_env, fingerprints, make_engram_db, old_client_dir, pg_bin, run_tool

from engram_recovery import testbed
from engram_recovery.core.errors import ConfigurationError
from engram_recovery.core.repository import open_repository
from engram_recovery.core.repository.manifest import Manifest
from engram_recovery.core.restore import observe as rc
from engram_recovery.core.restore.decrypt import extract_backup
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores.pgclient.commands import PgRestoreCommand
from engram_recovery.tools.backup_status import BackupStatusInput, backup_status
from engram_recovery.tools.plan_restore import PlanRestoreInput, plan_restore
from engram_recovery.tools.restore_drill import RestoreDrillInput, restore_drill
from engram_recovery.tools.run_backup import RunBackupInput, RunBackupResult, run_backup

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def old_bin(admin_dsn: str) -> Path:
    """The host's PostgreSQL 15 (or any pre-18) client binaries, older than the main server."""
    found = old_client_dir()
    if found is None:
        pytest.skip("no PostgreSQL client older than 18 is installed (/usr/lib/postgresql/N/bin)")
    if anyio.run(major_of, admin_dsn) < 18:
        pytest.skip("the main server (ENGRAM_TEST_ADMIN_URL) is not PostgreSQL 18: no newer server to refuse 15")
    return found


async def major_of(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()


async def call(tool: Any, input_type: Any, env: dict[str, str], **params: Any) -> Any:
    return await run_tool(tool, input_type(**params), env)


async def backup(env: dict[str, str]) -> RunBackupResult:
    result: RunBackupResult = await call(run_backup, RunBackupInput, env)
    assert result.verified and result.backup_id
    return result


def manifest_of(repo: Path, backup_id: str) -> Manifest:
    return Manifest.model_validate_json((repo / "backups" / backup_id / "manifest.json").read_bytes())


async def test_a_dump_of_15_restores_into_18_with_identical_tables(
    old_server_dsn: str, admin_dsn: str, master_key: bytes, old_bin: Path, tmp_path: Path
) -> None:
    async for source in make_engram_db(old_server_dsn, master_key, notes=60, attachments=6):
        # The 15 client, as a host with Debian's packages would dump its 15 server.
        env = engram_env(source, tmp_path, ENGRAM_RECOVERY_PG_DUMP=str(old_bin / "pg_dump"))
        result = await backup(env)
        manifest = manifest_of(tmp_path / "repo", result.backup_id or "")
        assert manifest.database.server_major == 15 and "(PostgreSQL) 15." in manifest.database.pg_dump_version
        target_major = await major_of(admin_dsn)
        assert target_major == 18
        # Restoring into 18 needs a pg_restore of 18: with nothing configured, the bundled one is chosen.
        settings = load_settings(environ=engram_env(source, tmp_path))
        choice = await rc.restore_client(settings, manifest, target_major)
        assert choice.chosen is not None and choice.chosen.major == 18, choice.describe()
        async with open_repository(settings) as repo:
            await extract_backup(repo, manifest.backup_id, None, tmp_path / "db.dump")
        async with testbed.scratch_database(admin_dsn, prefix="engram_from15") as target:
            # Roles are the cluster's, not the dump's: a new server needs them first, as a real restore does.
            conn = await asyncpg.connect(target)
            try:
                await testbed.create_roles(conn, target.rsplit("/", 1)[-1])
            finally:
                await conn.close()
            done = await anyio.run_process(PgRestoreCommand(choice.chosen.path, target, str(tmp_path / "db.dump")).argv,
                                           check=False)  # fmt: skip
            assert done.returncode == 0, done.stderr.decode()[-2000:]
            restored, original = await fingerprints(target), await fingerprints(source.dsn)
        assert restored == original and original["notes"][0] == 60


async def test_a_15_pg_dump_is_refused_against_an_18_server_before_any_work(
    engram_db: EngramDB, old_bin: Path, tmp_path: Path
) -> None:
    old = str(old_bin / "pg_dump")
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_PG_DUMP=old)
    with pytest.raises(ConfigurationError) as info:
        await call(run_backup, RunBackupInput, env)
    assert info.value.message.startswith(
        f"pg_dump 15 ({old}, set by ENGRAM_RECOVERY_PG_DUMP) cannot dump a PostgreSQL 18 server (18."
    )
    assert f"unset ENGRAM_RECOVERY_PG_DUMP to use the bundled pg_dump 18 ({pg_bin('pg_dump')})" in info.value.hint
    assert not (tmp_path / "repo" / "backups").exists()
    # backup_status says the same, before anyone runs a backup.
    status = await call(backup_status, BackupStatusInput, env)
    postgres = next(c for c in status.checks if c.component == "postgres")
    assert postgres.status == "fail" and postgres.details["pg_dump"]["usable"] is False
    # The fix works: unset, the bundled 18 client dumps the same server.
    assert (await backup(engram_env(engram_db, tmp_path))).verified


async def test_an_18_dump_is_refused_by_a_15_pg_restore_with_a_clear_message(
    engram_db: EngramDB, old_bin: Path, tmp_path: Path
) -> None:
    result = await backup(engram_env(engram_db, tmp_path))
    old = str(old_bin / "pg_restore")
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_PG_RESTORE=old)
    # The refusal is grounded: pg_restore 15 really cannot read what pg_dump 18 wrote.
    settings = load_settings(environ=env)
    async with open_repository(settings) as repo:
        await extract_backup(repo, result.backup_id or "", None, tmp_path / "db.dump")
    listing = await anyio.run_process([old, "--list", str(tmp_path / "db.dump")], check=False)
    assert listing.returncode != 0 and b"unsupported version" in listing.stderr
    # restore_drill refuses before it creates a scratch database, and says what to do.
    drill = await call(restore_drill, RestoreDrillInput, env)
    assert drill.verdict == "fail" and drill.scratch_database is None
    step = next(s for s in drill.steps if s.name == "pg_restore")
    assert not step.ok
    assert f"pg_restore 15 ({old}, set by ENGRAM_RECOVERY_PG_RESTORE) cannot read a dump written by pg_dump 18" \
        in step.summary
    assert "unset ENGRAM_RECOVERY_PG_RESTORE to use the bundled pg_restore 18" in step.summary
    # plan_restore stops on the same finding.
    plan = await call(plan_restore, PlanRestoreInput, env, allow_non_empty_target=True)
    check = next(c for c in plan.checks if c.name == "pg_restore")
    assert (plan.verdict, check.code) == ("fail", "pg_restore_too_old")
    assert "unset ENGRAM_RECOVERY_PG_RESTORE to use the bundled pg_restore 18" in check.summary
    # Unset, the drill passes with the bundled client.
    assert (await call(restore_drill, RestoreDrillInput, engram_env(engram_db, tmp_path))).verdict == "ok"
