"""A backup is called good only when it is proven good: re-verification, blob content, attachments it lacks.

Against the test bed's real schema, real PostgreSQL and a real SeaweedFS: the
status re-verifies and records, mirrored blobs are checked by content (not
size), a damaged blob is copied again, and live attachments without a blob are
reported by run_backup, the plan and the drill.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from support import EngramDB, backup, engram_env, make_engram_db, new_bucket, repository_env, run_tool, storage_env

from engram_recovery.core.repository import pool
from engram_recovery.core.repository.local import LocalRepository
from engram_recovery.core.repository.pool import InventoryEntry
from engram_recovery.core.stores import s3
from engram_recovery.server import cli
from engram_recovery.testbed.seaweedfs import SeaweedFS
from engram_recovery.tools.backup_status import BackupStatusInput, Check, backup_status
from engram_recovery.tools.plan_restore import PlanRestoreInput, PlanRestoreResult, plan_restore
from engram_recovery.tools.restore_drill import RestoreDrillInput, RestoreDrillResult, restore_drill

# --- helpers ---------------------------------------------------------------------------------------------


async def status(env: dict[str, str], deep: bool = False) -> dict[str, Check]:
    result = await run_tool(backup_status, BackupStatusInput(deep=deep), env)
    return {c.component: c for c in result.checks}


async def plan(env: dict[str, str]) -> PlanRestoreResult:
    return await run_tool(plan_restore, PlanRestoreInput(target_database="engram_restore_target"), env)


async def drill(env: dict[str, str]) -> RestoreDrillResult:
    return await run_tool(restore_drill, RestoreDrillInput(sample_notes=5, sample_attachments=5), env)


def plan_check(result: PlanRestoreResult, name: str) -> Any:
    return next(c for c in result.checks if c.name == name)


def flip_a_byte(path: Path, keep_mtime: bool = False) -> None:
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    if keep_mtime:  # bit rot: the bytes change, the file's times do not
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def inventory_of(repo: Path, backup_id: str) -> list[dict[str, Any]]:
    lines = (repo / "backups" / backup_id / "attachments-inventory.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@dataclass
class S3Deployment:
    db: EngramDB
    env: dict[str, str]
    repo: Path
    source: s3.S3Location
    objects: dict[str, bytes]


@pytest.fixture
async def deployment(
    admin_dsn: str, master_key: bytes, weed: SeaweedFS, tmp_path: Path
) -> AsyncIterator[S3Deployment]:
    """An Engram deployment with STORAGE_BACKEND=s3 on SeaweedFS, backed up into a local repository."""
    async for db in make_engram_db(admin_dsn, master_key, storage="s3", notes=20, attachments=8):
        objects = dict(db.report.attachment_objects)
        source = await new_bucket(weed, objects)
        env = engram_env(db, tmp_path, **storage_env(weed, source.bucket))
        yield S3Deployment(db, env, tmp_path / "repo", source, objects)


# --- status: re-verification, recorded, and failures named ---------------------------------------------------


@pytest.mark.anyio
async def test_a_deep_status_re_verifies_the_newest_backup_records_it_and_later_statuses_name_the_failure(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path)
    first = await backup(env)
    assert first.backup_id
    fresh = (await status(env))["last_backup"]
    assert fresh.status == "ok" and fresh.details["last_verified"]["how"] == "at write"
    assert "verified at write" in fresh.summary
    # A deep status on a sound backup proves it again, and says so from then on.
    deep = (await status(env, deep=True))["last_backup"]
    assert deep.status == "ok" and deep.details["deep_verification"]["ok"] is True, deep.summary
    recorded = deep.details["deep_verification"]["recorded"]
    assert recorded.startswith("verifications/") and (tmp_path / "repo" / recorded).is_file()
    later = (await status(env))["last_backup"]
    assert later.details["last_verified"]["how"] == "deep status" and "verified by a deep status" in later.summary
    # With read-only access the deep status still verifies, but writes nothing.
    records = sorted((tmp_path / "repo" / "verifications").iterdir())
    looked = (await status(env | {"ENGRAM_RECOVERY_ACCESS": "read-only"}, deep=True))["last_backup"]
    assert looked.details["deep_verification"]["recorded"] is None and "read-only" in str(looked.details)
    assert sorted((tmp_path / "repo" / "verifications").iterdir()) == records
    # One byte of the database artifact changes in storage: the deep status fails it, by name.
    flip_a_byte(tmp_path / "repo" / "backups" / first.backup_id / "db.dump.zst")
    deep = (await status(env, deep=True))["last_backup"]
    assert deep.status == "fail" and first.backup_id in deep.summary, deep.summary
    assert "FAILED verification by a deep status" in deep.summary and "db.dump.zst" in deep.summary
    record = json.loads((tmp_path / "repo" / deep.details["deep_verification"]["recorded"]).read_text())
    assert record["ok"] is False and record["backup_id"] == first.backup_id and record["problems"]
    # The verdict is durable: a default status, which re-reads nothing, still reports it failed.
    default = (await status(env))["last_backup"]
    assert default.status == "fail" and "FAILED verification by a deep status" in default.summary
    assert first.backup_id in default.details["failed_backups"]
    # A newer sound backup is the one to count on; the failed one stays named.
    second = await backup(env)
    assert second.backup_id
    after = (await status(env))["last_backup"]
    assert after.status == "warn" and second.backup_id in after.summary and first.backup_id in after.summary
    assert "older backup(s) FAILED" in after.summary


@pytest.mark.anyio
async def test_a_failed_drill_is_reported_failed_by_backup_name(engram_db: EngramDB, tmp_path: Path) -> None:
    env = engram_env(engram_db, tmp_path)
    made = await backup(env)
    assert made.backup_id
    flip_a_byte(tmp_path / "repo" / "backups" / made.backup_id / "db.dump.zst")
    assert (await drill(env)).verdict == "fail"
    checks = await status(env)
    drilled = checks["restore_drill"]
    assert drilled.status == "fail" and made.backup_id in drilled.summary and "FAILED" in drilled.summary
    assert "SHA-256" in drilled.summary, drilled.summary
    last = checks["last_backup"]
    assert last.status == "fail" and "FAILED verification by a restore drill" in last.summary
    assert last.details["last_verified"]["how"] == "drill"


# --- mirrored attachments: content, not size ---------------------------------------------------------------


@pytest.mark.anyio
async def test_a_mirrored_blob_changed_in_place_fails_plan_drill_and_status_and_the_next_backup_copies_it_again(
    deployment: S3Deployment,
) -> None:
    env, repo = deployment.env, deployment.repo
    first = await backup(env)
    assert first.backup_id and first.attachments and first.attachments.copied_objects == len(deployment.objects)
    entries = inventory_of(repo, first.backup_id)
    # The checksum was taken while copying: it is the SHA-256 of the source's bytes.
    assert all(e["sha256"] == hashlib.sha256(deployment.objects[e["key"]]).hexdigest() for e in entries)
    victim = repo / entries[0]["repo_key"]
    flip_a_byte(victim)  # same size, other content
    planned = await plan(env)
    attachments = plan_check(planned, "attachments")
    assert attachments.status == "fail" and "content differs" in attachments.summary, attachments.summary
    drilled = await drill(env)
    verify = next(s for s in drilled.steps if s.name == "verify_attachments")
    assert drilled.verdict == "fail" and not verify.ok and entries[0]["repo_key"] in verify.summary
    deep = (await status(env, deep=True))["last_backup"]
    assert deep.status == "fail" and entries[0]["repo_key"] in deep.summary
    # The next run does not skip it for its size: the copy is made again, from the source.
    second = await backup(env)
    assert second.attachments is not None and second.attachments.copied_objects == 1, second.attachments
    assert "1 of them copied again" in second.attachments.summary
    assert victim.read_bytes() == deployment.objects[entries[0]["key"]]
    healed = plan_check(await plan(env), "attachments")
    assert healed.status == "ok" and "checked by content" in healed.summary, healed.summary


@pytest.mark.anyio
async def test_bit_rot_that_keeps_the_file_time_is_found_by_a_deep_status_and_repaired_by_the_next_backup(
    deployment: S3Deployment,
) -> None:
    env, repo = deployment.env, deployment.repo
    first = await backup(env)
    assert first.backup_id
    entry = inventory_of(repo, first.backup_id)[1]
    flip_a_byte(repo / entry["repo_key"], keep_mtime=True)
    deep = (await status(env, deep=True))["last_backup"]
    assert deep.status == "fail" and entry["repo_key"] in deep.summary
    second = await backup(env)
    assert second.attachments is not None and second.attachments.copied_objects == 1
    assert (repo / entry["repo_key"]).read_bytes() == deployment.objects[entry["key"]]
    assert (await status(env, deep=True))["last_backup"].status == "ok"


@pytest.mark.anyio
async def test_an_s3_pool_blob_rewritten_with_other_bytes_is_copied_again(
    deployment: S3Deployment, weed: SeaweedFS
) -> None:
    repository = await new_bucket(weed)
    bucket = repository.bucket
    env = deployment.env | repository_env(weed, bucket, "prod")
    first = await backup(env)
    assert first.backup_id and first.attachments is not None
    async with s3.client(repository) as client:
        inventory = f"prod/backups/{first.backup_id}/attachments-inventory.jsonl"
        answer = await client.get_object(Bucket=bucket, Key=inventory)
        async with answer["Body"] as body:
            entries = [json.loads(line) for line in (await body.read()).decode().splitlines()]
        # Copied server-side: the server's own checksum (the MD5 ETag) is what the inventory records.
        assert all(e["md5"] == hashlib.md5(deployment.objects[e["key"]]).hexdigest() for e in entries)
        victim = f"prod/{entries[0]['repo_key']}"
        original = deployment.objects[entries[0]["key"]]
        await client.put_object(Bucket=bucket, Key=victim, Body=bytes([original[0] ^ 1]) + original[1:])
    assert plan_check(await plan(env), "attachments").status == "fail"
    second = await backup(env)
    assert second.attachments is not None and second.attachments.copied_objects == 1
    async with s3.client(repository) as client:
        answer = await client.get_object(Bucket=bucket, Key=victim)
        async with answer["Body"] as body:
            assert await body.read() == original


@pytest.mark.anyio
async def test_an_older_inventory_without_checksums_is_still_read_and_checked_by_size_only(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path)
    await repo.put_bytes("attachments/pool/ab/abc/e1", b"0123456789")
    await repo.put_bytes("attachments/pool/ab/abd/e2", b"abcdefghij")
    old = [InventoryEntry("u/v/objects/1", 10, "e1", None, "attachments/pool/ab/abc/e1"),
           InventoryEntry("u/v/objects/2", 10, "e2", None, "attachments/pool/ab/abd/e2")]  # fmt: skip
    assert old[0].checksum is None and "sha256" not in old[0].to_json()
    checked = await pool.verify_blobs(repo, old)
    assert checked.bad == [] and checked.how == "size only"
    sealed = InventoryEntry("u/v/objects/2", 10, "e2", None, "attachments/pool/ab/abd/e2",
                            sha256=hashlib.sha256(b"abcdefghiX").hexdigest())  # fmt: skip
    mixed = await pool.verify_blobs(repo, [old[0], sealed])
    assert [key for key, _why in mixed.bad] == [sealed.repo_key] and "size only" in mixed.how


# --- live attachments without a blob ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_live_attachments_without_a_blob_at_the_source_make_the_backup_warn_and_plan_and_drill_count_them(
    deployment: S3Deployment, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = await asyncpg.connect(deployment.db.dsn)
    try:
        live = [r["k"] for r in await conn.fetch(
            "SELECT storage_key AS k FROM attachments WHERE deleted_at IS NULL AND storage_key IS NOT NULL "
            "ORDER BY storage_key")]  # fmt: skip
        lost, soft_deleted = live[0], live[1]
        # A soft-deleted row whose blob Engram already deleted is normal and must not count.
        await conn.execute("UPDATE attachments SET deleted_at = now() WHERE storage_key = $1", soft_deleted)
    finally:
        await conn.close()
    async with s3.client(deployment.source) as client:
        await client.delete_objects(Bucket=deployment.source.bucket,
                                    Delete={"Objects": [{"Key": lost}, {"Key": soft_deleted}]})  # fmt: skip
    for name, value in deployment.env.items():
        monkeypatch.setenv(name, value)
    code = await anyio.to_thread.run_sync(cli.main, ["call", "run_backup"])
    result = json.loads(capsys.readouterr().out)
    assert code == 1 and result["verdict"] == "warn"
    warning = next(w for w in result["warnings"] if "live attachment" in w)
    assert warning.startswith("1 live attachment(s) have no blob") and lost in warning and soft_deleted not in warning
    planned = plan_check(await plan(deployment.env), "attachments")
    assert planned.status == "warn" and "lacks 1 live attachment(s)" in planned.summary and lost in planned.summary
    drilled = await drill(deployment.env)
    proof = next(s for s in drilled.steps if s.name == "prove_attachments")
    assert proof.details["lacking"] == 1 and "lacks 1 live attachment(s)" in proof.summary, proof.summary


@pytest.mark.anyio
async def test_a_live_attachment_missing_from_storage_objects_is_named_by_run_backup_and_the_drill(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path)
    conn = await asyncpg.connect(engram_db.dsn)
    try:
        lost = await conn.fetchval(
            "SELECT a.storage_key FROM attachments a JOIN storage_objects o USING (storage_key) "
            "WHERE a.deleted_at IS NULL ORDER BY 1 LIMIT 1")  # fmt: skip
        await conn.execute("DELETE FROM storage_objects WHERE storage_key = $1", lost)
    finally:
        await conn.close()
    made = await backup(env)
    assert made.verdict == "warn" and any(lost in w and "storage_objects" in w for w in made.warnings)
    planned = plan_check(await plan(env), "attachments")
    assert planned.status == "warn" and "lacks 1 live attachment(s)" in planned.summary
    proof = next(s for s in (await drill(env)).steps if s.name == "prove_attachments")
    assert proof.details["lacking"] == 1 and lost in proof.summary
