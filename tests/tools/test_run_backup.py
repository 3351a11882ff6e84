"""run_backup against real PostgreSQL (and SeaweedFS): restores, tampering, kills, locks, retention, secrets."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import asyncpg
import format_reader
import pytest
from mcp import Client
from support import (
    EngramDB,
    backup,
    engram_env,
    fingerprints,
    make_engram_db,
    new_bucket,
    pg_bin,
    repository_env,
    restore_client,
    run_tool,
    s3_location,
    storage_env,
)

from engram_recovery import testbed
from engram_recovery.core.backup.run import verify_artifacts
from engram_recovery.core.errors import Busy, ConfigurationError, IntegrityError, StoreUnreachable
from engram_recovery.core.repository import open_repository
from engram_recovery.core.repository.local import LocalRepository
from engram_recovery.core.repository.manifest import Manifest
from engram_recovery.core.repository.prune import apply_retention
from engram_recovery.core.repository.records import read_state
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores import s3
from engram_recovery.core.stores.pgclient.commands import PgRestoreCommand
from engram_recovery.core.stores.pgclient.versions import beside, client_version
from engram_recovery.server import cli
from engram_recovery.server.app import build_server
from engram_recovery.testbed.seaweedfs import SeaweedFS
from engram_recovery.tools.backup_status import BackupStatusInput, Check, backup_status
from engram_recovery.tools.run_backup import RunBackupResult

FORMAT_DOC = Path(__file__).resolve().parents[2] / "docs" / "backup-format.md"
READER_SOURCE = Path(format_reader.__file__).read_text()
BACKUP_KEY = base64.b64encode(b"k" * 16 + secrets.token_bytes(16)).decode()


async def last_backup_check(env: dict[str, str]) -> Check:
    status = await run_tool(backup_status, BackupStatusInput(), env)
    return next(c for c in status.checks if c.component == "last_backup")


def manifest_of(repo: Path, backup_id: str) -> Manifest:
    return Manifest.model_validate_json((repo / "backups" / backup_id / "manifest.json").read_bytes())


async def restore_and_compare(admin_dsn: str, source: EngramDB, dump: Path, fmt: str = "custom") -> None:
    async with testbed.scratch_database(admin_dsn, prefix="engram_restored") as target:
        # The clients the tool would choose for this server (a newer pg_restore may emit settings an older
        # server does not know, e.g. 18's transaction_timeout on 15).
        pg_restore = await restore_client(target)
        if fmt == "plain":
            argv = [beside(pg_restore, "psql"), "--quiet", "--set=ON_ERROR_STOP=1", f"--dbname={target}",
                    f"--file={dump}"]
        else:
            argv = PgRestoreCommand(pg_restore, target, str(dump)).argv
        done = await anyio.run_process(argv, check=False)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        restored, original = await fingerprints(target), await fingerprints(source.dsn)
        assert restored == original
        assert original["notes"][0] > 0 and original["storage_objects"][0] > 0


async def main(*argv: str) -> int:
    """The real CLI entry point (it runs its own event loop, so in a worker thread)."""
    return await anyio.to_thread.run_sync(cli.main, list(argv))


async def decrypt_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str]:
    monkeypatch.setenv("ENGRAM_RECOVERY_BACKUP_KEY", BACKUP_KEY)
    code = await main("decrypt", *argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.anyio
async def test_encrypted_backup_restores_with_stock_pg_restore_after_decrypt(
    engram_db: EngramDB, admin_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY)
    result = await backup(env)
    assert result.verified and result.encrypted and result.backup_id
    assert [a.name for a in result.artifacts] == ["db.dump.zst.enc"]
    assert result.compression_ratio is not None and 0 < result.compression_ratio < 1
    stored = tmp_path / "repo" / "backups" / result.backup_id / "db.dump.zst.enc"
    assert stored.read_bytes()[:7] == b"ENGRBAK"
    code, out = await decrypt_cli(monkeypatch, capsys, str(stored), "--output", str(tmp_path / "db.dump"))
    assert code == 0, out
    assert (tmp_path / "db.dump").read_bytes()[:5] == b"PGDMP"
    await restore_and_compare(admin_dsn, engram_db, tmp_path / "db.dump")
    # The same through the repository, checked against the manifest, on a machine that has the
    # backups but no database (DATABASE_URL unset): decrypting must not need one.
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("ENGRAM_RECOVERY_REPOSITORY", str(tmp_path / "repo"))
    code, out = await decrypt_cli(monkeypatch, capsys, f"backup:{result.backup_id}", "-o", str(tmp_path / "again.dump"))
    assert code == 0, out
    assert (tmp_path / "again.dump").read_bytes() == (tmp_path / "db.dump").read_bytes()


@pytest.mark.anyio
async def test_the_manifest_binds_the_facts_of_one_moment(engram_db: EngramDB, tmp_path: Path) -> None:
    result = await backup(engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY))
    assert result.backup_id is not None
    m = manifest_of(tmp_path / "repo", result.backup_id)
    assert m.verified is True and m.verified_at is not None
    assert m.database.wal_lsn_start and "/" in m.database.wal_lsn_start
    conn = await asyncpg.connect(engram_db.dsn)
    try:
        assert m.database.server_major == int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()
    # The client that wrote the dump, by version and path: what a restore needs to match.
    client = await client_version(m.database.pg_dump_path or "")
    assert client.text == m.database.pg_dump_version and client.major >= m.database.server_major
    assert m.database.engram_schema_version == max(testbed.migration_versions("0.18.1"))
    conn = await asyncpg.connect(engram_db.dsn)
    try:
        for table in ("users", "vaults", "notes", "attachments", "storage_objects", "oban_jobs"):
            assert m.database.row_counts[table] == await conn.fetchval(f"SELECT count(*) FROM {table}")
        canary = await conn.fetchrow("SELECT wrapped_dek, dek_sha256 FROM system_canaries ORDER BY id DESC LIMIT 1")
    finally:
        await conn.close()
    assert canary is not None and m.canary.present and m.canary.matches_configured_key
    assert base64.b64decode(m.canary.wrapped_dek_b64 or "") == bytes(canary["wrapped_dek"])
    assert m.canary.dek_sha256_hex == bytes(canary["dek_sha256"]).hex()
    assert m.attachments.backend == "database" and m.attachments.in_database_dump
    assert m.oban.embed_backlog == len(engram_db.report.embed_job_note_ids)
    assert m.qdrant.configured and m.qdrant.exists is False
    assert m.backup_key_fingerprint and m.master_key_fingerprint
    artifact = m.artifacts[0]
    assert artifact.size == (tmp_path / "repo" / "backups" / m.backup_id / artifact.name).stat().st_size
    assert m.database.roles_referenced and testbed.OWNER_ROLE in m.database.roles_referenced


@pytest.mark.anyio
async def test_a_database_without_canary_is_backed_up_and_flagged(
    admin_dsn: str, master_key: bytes, tmp_path: Path
) -> None:
    async for db in make_engram_db(admin_dsn, master_key, notes=10, attachments=1, with_canary=False):
        result = await backup(engram_env(db, tmp_path))
        assert result.verdict == "warn" and result.backup_id
        assert any("system_canaries is empty" in w for w in result.warnings)
        assert manifest_of(tmp_path / "repo", result.backup_id).canary.present is False


@pytest.mark.anyio
@pytest.mark.parametrize(("fmt", "compression"), [("directory", "gzip"), ("plain", "none")])
async def test_directory_and_plain_dumps_restore_too(
    engram_db: EngramDB, admin_dsn: str, tmp_path: Path, fmt: str, compression: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    result = await backup(engram_env(engram_db, tmp_path), format=fmt, compression=compression)
    assert result.backup_id and result.verified
    monkeypatch.setenv("DATABASE_URL", engram_db.dsn)
    monkeypatch.setenv("ENGRAM_RECOVERY_REPOSITORY", str(tmp_path / "repo"))
    out = tmp_path / "restored-input"
    code, text = await decrypt_cli(monkeypatch, capsys, f"backup:{result.backup_id}", "-o", str(out))
    assert code == 0, text
    await restore_and_compare(admin_dsn, engram_db, out, fmt)


@pytest.mark.anyio
async def test_an_artifact_altered_by_one_byte_is_detected_by_verification_and_by_decrypt(
    engram_db: EngramDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    result = await backup(engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY))
    assert result.backup_id
    stored = tmp_path / "repo" / "backups" / result.backup_id / "db.dump.zst.enc"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    m = manifest_of(tmp_path / "repo", result.backup_id)
    problems = await verify_artifacts(LocalRepository(tmp_path / "repo"), result.backup_id, m.artifacts)
    assert len(problems) == 1 and "db.dump.zst.enc" in problems[0]
    code, out = await decrypt_cli(monkeypatch, capsys, str(stored), "-o", str(tmp_path / "db.dump"))
    assert code == 2 and "failed authentication" in out
    assert not (tmp_path / "db.dump").exists()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".db.dump")]


@pytest.mark.anyio
async def test_a_reader_written_only_from_the_format_document_decrypts_a_real_artifact(
    engram_db: EngramDB, admin_dsn: str, tmp_path: Path
) -> None:
    result = await backup(engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY))
    assert result.backup_id
    stored = tmp_path / "repo" / "backups" / result.backup_id / "db.dump.zst.enc"
    dump = tmp_path / "by-the-document.dump"
    dump.write_bytes(format_reader.read_artifact(stored, base64.b64decode(BACKUP_KEY), FORMAT_DOC))
    await restore_and_compare(admin_dsn, engram_db, dump)
    # The reader stays independent: it imports nothing of this project.
    imports = [line for line in READER_SOURCE.splitlines() if line.startswith(("import ", "from "))]
    assert imports and not [line for line in imports if "engram" in line or line.startswith("from .")]


@pytest.mark.anyio
async def test_a_role_that_cannot_read_rls_tables_is_refused_before_dumping(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path, DATABASE_URL=engram_db.role_dsn(testbed.OWNER_ROLE))
    with pytest.raises(ConfigurationError, match="BYPASSRLS") as info:
        await backup(env)
    assert "FORCE ROW LEVEL SECURITY" in info.value.message
    assert not (tmp_path / "repo" / "backups").exists()
    # The operator's fix works: a BYPASSRLS role backs up.
    ok = await backup(engram_env(engram_db, tmp_path, DATABASE_URL=engram_db.role_dsn(testbed.BACKUP_ROLE)))
    assert ok.verified


@pytest.mark.anyio
async def test_a_pg_dump_older_than_the_server_is_refused(engram_db: EngramDB, tmp_path: Path) -> None:
    old = tmp_path / "pg_dump_12"
    old.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 12.22'\n")
    old.chmod(0o755)
    with pytest.raises(ConfigurationError, match=r"pg_dump 12 \(.*ENGRAM_RECOVERY_PG_DUMP\) cannot dump a PostgreSQL") \
            as info:
        await backup(engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_PG_DUMP=str(old)))
    # The fix works on this host: the bundled client is there to use.
    assert f"unset ENGRAM_RECOVERY_PG_DUMP to use the bundled pg_dump 18 ({pg_bin('pg_dump')})" in info.value.hint
    assert not (tmp_path / "repo" / "backups").exists()


@pytest.mark.anyio
async def test_dry_run_reports_sizes_and_changes_nothing(engram_db: EngramDB, tmp_path: Path) -> None:
    env = engram_env(engram_db, tmp_path)
    first = await backup(env)
    repo = tmp_path / "repo"
    leftover = repo / "backups" / "20200101T000000Z-dead"
    leftover.mkdir()
    (leftover / "db.dump").write_bytes(b"half")
    before = sorted((p.relative_to(repo), p.stat().st_mtime_ns) for p in repo.rglob("*"))
    result = await backup(env, dry_run=True, prune=True)
    assert result.dry_run and result.backup_id is None
    assert result.database_bytes and result.database_bytes > 0
    assert "would delete 1 leftover" in result.summary
    assert result.retention is not None and result.retention.keep == [first.backup_id]
    assert sorted((p.relative_to(repo), p.stat().st_mtime_ns) for p in repo.rglob("*")) == before


@pytest.mark.anyio
async def test_a_cancelled_run_leaves_nothing_and_the_next_run_succeeds(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path)
    started = anyio.Event()

    async def on_progress(done: float, total: float | None = None, message: str | None = None) -> None:
        if message and message.startswith("dumping"):
            started.set()
            await anyio.sleep_forever()  # hold the run mid-dump until it is cancelled

    async with anyio.create_task_group() as tg:
        tg.start_soon(backup, env, on_progress)
        with anyio.fail_after(30):
            await started.wait()
        tg.cancel_scope.cancel()
    repo = tmp_path / "repo"
    # The cancelled run removed its own folder on the way out: not even an incomplete one is left.
    assert not list(repo.glob("backups/*"))
    assert not [p for p in repo.rglob("*") if ".tmp-" in p.name]
    result = await backup(env)
    assert result.verified and result.cleaned_leftovers == []
    assert [p.name for p in (repo / "backups").iterdir()] == [result.backup_id]


@pytest.mark.anyio
async def test_a_killed_process_leaves_no_complete_backup_and_releases_its_lock(
    admin_dsn: str, master_key: bytes, tmp_path: Path
) -> None:
    # Enough attachment bytes that the dump takes a moment, so the kill lands in the middle of it.
    async for db in make_engram_db(admin_dsn, master_key, notes=50, attachments=60, attachment_size=256 << 10):
        env = engram_env(db, tmp_path)
        repo = tmp_path / "repo"
        async with await anyio.open_process(
            [sys.executable, "-m", "engram_recovery.server.cli", "call", "run_backup"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ) as proc:
            deadline = time.monotonic() + 60
            while not [p for p in repo.glob("backups/*/.*tmp-*") if p.stat().st_size > 0]:
                assert proc.returncode is None, "the run ended before it could be killed mid-dump"
                assert time.monotonic() < deadline
                await anyio.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        assert not list(repo.glob("backups/*/manifest.json"))
        # The advisory lock died with the killed process's session: the next run is not refused.
        with anyio.fail_after(60):
            while True:
                try:
                    result = await backup(env)
                    break
                except Busy:
                    await anyio.sleep(0.1)  # the server notices the dead connection within moments
        assert result.verified and len(result.cleaned_leftovers) == 1
        assert not [p for p in repo.rglob("*") if ".tmp-" in p.name]


@pytest.mark.anyio
async def test_concurrent_runs_are_refused_clearly(engram_db: EngramDB, tmp_path: Path) -> None:
    env = engram_env(engram_db, tmp_path)
    holding = anyio.Event()
    release = anyio.Event()

    async def slow_progress(done: float, total: float | None = None, message: str | None = None) -> None:
        if message and message.startswith("dumping") and not holding.is_set():
            holding.set()
            await release.wait()

    results: list[RunBackupResult] = []

    async def first() -> None:
        results.append(await backup(env, slow_progress))

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        with anyio.fail_after(30):
            await holding.wait()
        with pytest.raises(Busy, match="another backup of this database is running"):
            await backup(env)
        # A second deployment writing the same local repository is refused by the directory lock.
        async for other in make_engram_db(os.environ.get("ENGRAM_TEST_ADMIN_URL", engram_db.dsn.rsplit("/", 1)[0]
                                                         + "/postgres"), engram_db.master_key, notes=5,
                                          attachments=1):
            with pytest.raises(Busy, match="writing to the repository"):
                await backup(engram_env(other, tmp_path))
        release.set()
    assert results[0].verified


@pytest.mark.anyio
async def test_retention_prunes_only_with_confirmation_and_keeps_the_newest(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_KEEP_LAST="2", ENGRAM_RECOVERY_KEEP_DAILY="0",
                     ENGRAM_RECOVERY_KEEP_WEEKLY="0", ENGRAM_RECOVERY_KEEP_MONTHLY="0")
    ids = [(await backup(env)).backup_id for _ in range(3)]
    fourth = await backup(env, prune=True)
    assert fourth.retention is not None
    assert fourth.retention.would_delete == [ids[1], ids[0]] and fourth.retention.deleted == []
    assert "confirm=true" in fourth.retention.note
    # backup_status reads the same repository state: verified, and what the policy would prune.
    last = await last_backup_check(env)
    assert last.details["backup_id"] == fourth.backup_id and last.details["verified"] is True
    assert last.details["verified_at"] and last.details["retention"]["prunable"] == [ids[1], ids[0]]
    assert "2 beyond the retention policy" in last.summary
    fifth = await backup(env, prune=True, confirm=True)
    assert fifth.retention is not None
    assert fifth.retention.deleted == [ids[2], ids[1], ids[0]]
    remaining = sorted(p.name for p in (tmp_path / "repo" / "backups").iterdir())
    assert remaining == sorted(str(r.backup_id) for r in (fourth, fifth))


@pytest.mark.anyio
async def test_no_secret_appears_in_the_repository_the_output_or_the_logs(
    engram_db: EngramDB, tmp_path: Path, admin_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password = "pw-" + secrets.token_hex(12)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"ALTER ROLE {testbed.SUPER_ROLE} PASSWORD '{password}'")
    finally:
        await conn.close()
    dsn = engram_db.role_dsn(testbed.SUPER_ROLE).replace(f"{testbed.SUPER_ROLE}@", f"{testbed.SUPER_ROLE}:{password}@")
    env = engram_env(engram_db, tmp_path, DATABASE_URL=dsn, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY,
                     STORAGE_SECRET_ACCESS_KEY="unused-" + secrets.token_hex(8))
    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")

    async with Client(build_server(load_settings(environ=env))) as client:
        answer = await client.call_tool("run_backup", {"prune": True}, progress_callback=on_progress)
    assert not answer.is_error, answer.content
    # Progress notifications reach the MCP client during the run.
    assert any(m.startswith("dumping the database") for m in messages), messages
    output = json.dumps(answer.structured_content) + " ".join(getattr(b, "text", "") for b in answer.content)
    output += " ".join(messages) + caplog.text
    master = env["ENCRYPTION_MASTER_KEY"]
    secrets_ = [master, base64.b64decode(master).hex(), BACKUP_KEY, base64.b64decode(BACKUP_KEY).hex(), password,
                env["STORAGE_SECRET_ACCESS_KEY"]]
    files = [p for p in (tmp_path / "repo").rglob("*") if p.is_file()]
    assert len(files) >= 2
    for secret in secrets_:
        assert secret not in output
        for path in files:
            data = path.read_bytes()
            assert secret.encode() not in data, path
    for raw in (base64.b64decode(master), base64.b64decode(BACKUP_KEY)):
        assert all(raw not in p.read_bytes() for p in files)


@pytest.mark.anyio
async def test_an_unwritable_repository_fails_clearly_before_dumping(engram_db: EngramDB, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnreachable, match="not a directory"):
        await backup(engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_REPOSITORY=str(blocker)))


@pytest.mark.anyio
async def test_a_full_repository_fails_clearly_and_leaves_nothing_half_written(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mounted = await anyio.run_process(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=False)
    if mounted.returncode != 0:
        pytest.skip("needs permission to mount a 64 KiB tmpfs (run as root)")
    try:
        env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_REPOSITORY=str(small / "repo"))
        with pytest.raises(StoreUnreachable, match="is full") as info:
            await backup(env)
        assert "ENGRAM_RECOVERY_REPOSITORY" in info.value.hint
        assert [p.name for p in (small / "repo").rglob("*") if p.is_file()] == [".lock"]
    finally:
        await anyio.run_process(["umount", str(small)], check=False)


@pytest.mark.anyio
async def test_a_wrong_backup_key_is_named_by_decrypt(
    engram_db: EngramDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result = await backup(engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY))
    assert result.backup_id
    stored = tmp_path / "repo" / "backups" / result.backup_id / "db.dump.zst.enc"
    monkeypatch.setenv("ENGRAM_RECOVERY_BACKUP_KEY", base64.b64encode(secrets.token_bytes(32)).decode())
    code = await main("decrypt", str(stored), "-o", str(tmp_path / "x.dump"))
    err = capsys.readouterr().err
    assert code == 2 and "another backup key" in err and "Traceback" not in err
    monkeypatch.delenv("ENGRAM_RECOVERY_BACKUP_KEY")
    assert await main("decrypt", str(stored), "-o", str(tmp_path / "x.dump")) == 2
    assert "no backup key is configured" in capsys.readouterr().err


# --- S3: the repository on SeaweedFS, and the attachments bucket -----------------------------------------


@pytest.mark.anyio
async def test_an_s3_repository_on_seaweedfs_works_end_to_end(
    engram_db: EngramDB, admin_dsn: str, weed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bucket = (await new_bucket(weed)).bucket
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY, **repository_env(weed, bucket))
    result = await backup(env)
    assert result.verified and result.backup_id and result.repository.startswith(f"s3://{bucket}/engram/prod/")
    state = await read_state(load_settings(environ=env))
    assert [b.backup_id for b in state.backups] == [result.backup_id] and state.newest_verified
    last = await last_backup_check(env)
    assert last.status == "ok" and last.details["verified"] is True, last.summary
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "from-s3.dump"
    code, text = await decrypt_cli(monkeypatch, capsys, f"backup:{result.backup_id}", "-o", str(out))
    assert code == 0, text
    await restore_and_compare(admin_dsn, engram_db, out)


@pytest.mark.anyio
async def test_wrong_s3_credentials_fail_clearly_and_write_nothing(
    engram_db: EngramDB, weed: SeaweedFS, tmp_path: Path
) -> None:
    bucket = (await new_bucket(weed)).bucket
    wrong = "wrong-" + secrets.token_hex(8)
    env = engram_env(engram_db, tmp_path, **repository_env(weed, bucket, secret=wrong))
    with pytest.raises(StoreUnreachable, match="refused the credentials") as info:
        await backup(env)
    assert wrong not in str(info.value)
    async with s3.client(s3_location(weed, bucket)) as client:
        assert (await client.list_objects_v2(Bucket=bucket)).get("KeyCount", 0) == 0


@pytest.mark.anyio
async def test_s3_attachments_are_mirrored_and_the_inventory_matches_the_bucket(
    admin_dsn: str, master_key: bytes, weed: SeaweedFS, tmp_path: Path
) -> None:
    async for db in make_engram_db(admin_dsn, master_key, storage="s3", notes=20, attachments=10):
        objects: list[tuple[str, bytes]] = db.report.attachment_objects
        location = await new_bucket(weed, objects)
        source = location.bucket
        env = engram_env(db, tmp_path, **storage_env(weed, source))
        dry = await backup(env, dry_run=True)
        assert dry.attachments is not None and dry.attachments.copied_objects == len(objects)
        assert not (tmp_path / "repo" / "backups").exists()
        first = await backup(env)
        assert first.attachments is not None and first.attachments.copied_objects == len(objects)
        assert first.backup_id
        m = manifest_of(tmp_path / "repo", first.backup_id)
        assert m.attachments.backend == "s3" and m.attachments.objects == len(objects) and m.attachments.inventory
        stored = tmp_path / "repo" / "backups" / first.backup_id / m.attachments.inventory
        inventory = [json.loads(line) for line in stored.read_text().splitlines()]
        async with s3.client(location) as client:
            listed = [o async for o in s3.list_objects(client, source)]
        assert sorted((e["key"], e["size"], e["etag"]) for e in inventory) == sorted(
            (o.key, o.size, o.etag) for o in listed
        )
        for entry in inventory:  # every blob of the inventory is in the repository, byte for byte
            data = dict(objects)[entry["key"]]
            assert (tmp_path / "repo" / entry["repo_key"]).read_bytes() == data
        second = await backup(env)
        assert second.attachments is not None and second.attachments.copied_objects == 0
        # An object deleted at the source stays in the pool for the recovery points that list it...
        gone = inventory[0]
        async with s3.client(location) as client:
            await client.delete_object(Bucket=source, Key=gone["key"])
        third = await backup(env)
        assert third.attachments is not None and third.attachments.objects == len(objects) - 1
        assert (tmp_path / "repo" / gone["repo_key"]).exists()
        # ...until retention lets go of every point that lists it; then the pool lets go of the blob too.
        pruned = await backup(
            env | {"ENGRAM_RECOVERY_KEEP_LAST": "1", "ENGRAM_RECOVERY_KEEP_DAILY": "0",
                   "ENGRAM_RECOVERY_KEEP_WEEKLY": "0", "ENGRAM_RECOVERY_KEEP_MONTHLY": "0"},
            prune=True, confirm=True,
        )
        assert pruned.retention is not None and len(pruned.retention.deleted) == 3
        assert pruned.retention.pool_objects_deleted == 1
        assert not (tmp_path / "repo" / gone["repo_key"]).exists()
        assert all((tmp_path / "repo" / e["repo_key"]).exists() for e in inventory[1:])
        # A kept backup whose inventory has gone missing stops the pool collection: its blobs are
        # not "unreferenced", they are unaccounted for.
        newest = await backup(env)
        assert newest.backup_id and pruned.backup_id
        newest_manifest = manifest_of(tmp_path / "repo", newest.backup_id)
        assert newest_manifest.attachments.inventory
        (tmp_path / "repo" / "backups" / newest.backup_id / newest_manifest.attachments.inventory).unlink()
        keep_one = load_settings(environ=env | {
            "ENGRAM_RECOVERY_KEEP_LAST": "1", "ENGRAM_RECOVERY_KEEP_DAILY": "0",
            "ENGRAM_RECOVERY_KEEP_WEEKLY": "0", "ENGRAM_RECOVERY_KEEP_MONTHLY": "0",
        })
        async with open_repository(keep_one) as repo:
            with pytest.raises(IntegrityError, match="inventory"):
                await apply_retention(repo, keep_one, prune=True, confirm=True)
        assert all((tmp_path / "repo" / e["repo_key"]).exists() for e in inventory[1:])
