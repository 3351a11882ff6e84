"""The attachments copy-back engine against a real SeaweedFS and backups made by run_backup."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream
from support import EngramDB, engram_env, loopback_server, make_engram_db

from engram_recovery.core.errors import StoreUnreachable
from engram_recovery.core.progress import silent
from engram_recovery.core.repository import open_repository
from engram_recovery.core.repository.base import Repository
from engram_recovery.core.repository.layout import BACKUPS, inventory_key
from engram_recovery.core.repository.manifest import Manifest
from engram_recovery.core.repository.pool import InventoryEntry, read_inventory
from engram_recovery.core.restore import copy_back as copy_back_module
from engram_recovery.core.restore.copy_back import copy_back
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores import s3
from engram_recovery.core.stores.s3 import S3Location
from engram_recovery.testbed.seaweedfs import SeaweedFS
from engram_recovery.tools.run_backup import RunBackupInput, run_backup


def location(weed: SeaweedFS, bucket: str, endpoint: str | None = None) -> S3Location:
    return S3Location(endpoint or weed.endpoint, weed.access_key_id, weed.secret_access_key, weed.region, bucket)


async def new_bucket(weed: SeaweedFS, objects: Sequence[tuple[str, bytes]] = (), versioned: bool = False) -> S3Location:
    where = location(weed, f"cb-{secrets.token_hex(4)}")
    async with s3.bulk_client(where) as c:
        await c.create_bucket(Bucket=where.bucket)
        if versioned:
            await c.put_bucket_versioning(Bucket=where.bucket, VersioningConfiguration={"Status": "Enabled"})
        for key, body in objects:
            await c.put_object(Bucket=where.bucket, Key=key, Body=body)
    return where


async def contents(where: S3Location) -> dict[str, tuple[int, str, bytes]]:
    async with s3.bulk_client(where) as c:
        out: dict[str, tuple[int, str, bytes]] = {}
        async for o in s3.list_objects(c, where.bucket):
            answer = await c.get_object(Bucket=where.bucket, Key=o.key)
            async with answer["Body"] as body:
                out[o.key] = (o.size, o.etag, await body.read())
        return out


@dataclass
class Backed:
    env: dict[str, str]
    source: S3Location
    manifest: Manifest
    at_backup: dict[str, tuple[int, str, bytes]]

    def repository(self) -> Repository:
        return open_repository(load_settings(environ=self.env))


async def backup(db: EngramDB, weed: SeaweedFS, tmp_path: Path, *, s3_repo: bool, versioned: bool = False) -> Backed:
    source = await new_bucket(weed, db.report.attachment_objects, versioned=versioned)
    host, port = weed.endpoint.removeprefix("http://").split(":")
    extra = {"STORAGE_BACKEND": "s3", "STORAGE_BUCKET": source.bucket, "STORAGE_HOST": host, "STORAGE_PORT": port,
             "STORAGE_SCHEME": "http://", "STORAGE_ACCESS_KEY_ID": weed.access_key_id,
             "STORAGE_SECRET_ACCESS_KEY": weed.secret_access_key}  # fmt: skip
    if s3_repo:
        repo_bucket = await new_bucket(weed)
        extra |= {"ENGRAM_RECOVERY_REPOSITORY": f"s3://{repo_bucket.bucket}/engram/prod",
                  "ENGRAM_RECOVERY_REPOSITORY_ENDPOINT": weed.endpoint,
                  "ENGRAM_RECOVERY_REPOSITORY_ACCESS_KEY_ID": weed.access_key_id,
                  "ENGRAM_RECOVERY_REPOSITORY_SECRET_ACCESS_KEY": weed.secret_access_key}  # fmt: skip
    env = engram_env(db, tmp_path, **extra)
    runtime = Runtime(load_settings(environ=env))
    try:
        result = await run_backup(runtime, RunBackupInput(), silent)
    finally:
        await runtime.aclose()
    assert result.verified and result.backup_id
    async with open_repository(load_settings(environ=env)) as repo:
        manifest = Manifest.model_validate_json(await repo.get_bytes(f"{BACKUPS}{result.backup_id}/manifest.json"))
    return Backed(env, source, manifest, await contents(source))


@pytest.fixture
async def s3_db(admin_dsn: str, master_key: bytes) -> AsyncIterator[EngramDB]:
    async for db in make_engram_db(admin_dsn, master_key, storage="s3", notes=20, attachments=12):
        yield db


async def entries_of(repo: Repository, manifest: Manifest) -> list[InventoryEntry]:
    assert manifest.attachments.inventory
    return [e async for e in read_inventory(repo, inventory_key(manifest.backup_id, manifest.attachments.inventory))]


@pytest.mark.anyio
@pytest.mark.parametrize("s3_repo", [False, True], ids=["local-repo-streamed", "s3-repo-server-side"])
async def test_a_copy_back_equals_the_bucket_at_backup_time_and_a_rerun_copies_nothing(
    s3_db: EngramDB, weed: SeaweedFS, tmp_path: Path, s3_repo: bool
) -> None:
    backed = await backup(s3_db, weed, tmp_path, s3_repo=s3_repo)
    # The live bucket moves on after the backup: none of that may reach the restored bucket.
    async with s3.bulk_client(backed.source) as c:
        first = sorted(backed.at_backup)[0]
        await c.delete_object(Bucket=backed.source.bucket, Key=first)
        await c.put_object(Bucket=backed.source.bucket, Key="u9/v9/objects/after-the-backup", Body=b"new")
    target = await new_bucket(weed)
    async with backed.repository() as repo:
        report = await copy_back(repo, backed.manifest, target)
        assert report.ok and report.server_side_copy is s3_repo
        assert report.copied_objects == len(backed.at_backup) == report.objects and report.skipped_objects == 0
        assert report.copied_bytes == sum(size for size, _e, _b in backed.at_backup.values())
        assert await contents(target) == backed.at_backup
        again = await copy_back(repo, backed.manifest, target)
    assert again.ok and again.copied_objects == 0 and again.skipped_objects == len(backed.at_backup)


@pytest.mark.anyio
@pytest.mark.parametrize("s3_repo", [False, True], ids=["local-repo-streamed", "s3-repo-server-side"])
async def test_a_blob_corrupted_in_the_pool_is_refused_by_checksum_and_named(
    s3_db: EngramDB, weed: SeaweedFS, tmp_path: Path, s3_repo: bool
) -> None:
    backed = await backup(s3_db, weed, tmp_path, s3_repo=s3_repo)
    target = await new_bucket(weed)
    async with backed.repository() as repo:
        entries = await entries_of(repo, backed.manifest)
        victim = next(e for e in entries if e.size > 0)
        # Same size, other bytes: only the content checksum can tell.
        await repo.put_bytes(victim.repo_key, secrets.token_bytes(victim.size))
        report = await copy_back(repo, backed.manifest, target)
    assert [(f.key, f.repo_key) for f in report.failures] == [(victim.key, victim.repo_key)]
    assert "content differs from the backup" in report.failures[0].reason
    restored = await contents(target)
    assert victim.key not in restored  # nothing damaged left behind, even by a server-side copy
    assert restored == {k: v for k, v in backed.at_backup.items() if k != victim.key}
    assert report.copied_objects == len(entries) - 1


@pytest.mark.anyio
async def test_blobs_uploaded_in_parts_are_recognised_on_a_rerun_by_the_checksums_stored_with_them(
    s3_db: EngramDB, weed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backed = await backup(s3_db, weed, tmp_path, s3_repo=False)
    monkeypatch.setattr(copy_back_module, "SINGLE_PUT", 100)  # every blob above 100 bytes goes up in parts
    target = await new_bucket(weed)
    async with backed.repository() as repo:
        first = await copy_back(repo, backed.manifest, target)
        restored = await contents(target)
        assert first.ok and restored == {k: (v[0], restored[k][1], v[2]) for k, v in backed.at_backup.items()}
        assert any(etag.endswith("-1") for _size, etag, _body in restored.values())  # multipart ETags: no MD5
        again = await copy_back(repo, backed.manifest, target)
    assert again.ok and again.copied_objects == 0 and again.skipped_objects == len(backed.at_backup)


@dataclass
class Dying:
    endpoint: str = ""
    puts: int = 0


@contextlib.asynccontextmanager
async def dying_proxy(upstream: str, puts_allowed: int) -> AsyncIterator[Dying]:
    """Relay to `upstream` until `puts_allowed` PUT requests went through; then the server is gone."""
    host, port = upstream.removeprefix("http://").split(":")
    state = Dying()

    async def relay(client: SocketStream) -> None:
        if state.puts >= puts_allowed:
            await client.aclose()
            return
        async with client, await anyio.connect_tcp(host, int(port)) as server, anyio.create_task_group() as tg:

            async def requests() -> None:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    async for data in client:
                        if data.startswith(b"PUT "):
                            if state.puts >= puts_allowed:
                                break
                            state.puts += 1
                        await server.send(data)
                tg.cancel_scope.cancel()

            async def responses() -> None:
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    async for data in server:
                        await client.send(data)
                tg.cancel_scope.cancel()

            tg.start_soon(requests)
            tg.start_soon(responses)

    async with loopback_server(relay) as endpoint:
        state.endpoint = endpoint
        yield state


@pytest.mark.anyio
async def test_a_failure_mid_way_stops_the_run_and_a_rerun_copies_only_what_is_missing(
    s3_db: EngramDB, weed: SeaweedFS, tmp_path: Path
) -> None:
    backed = await backup(s3_db, weed, tmp_path, s3_repo=False)
    target = await new_bucket(weed)
    async with backed.repository() as repo:
        async with dying_proxy(weed.endpoint, puts_allowed=5) as relay:
            with pytest.raises(StoreUnreachable, match="attachments were restored before this") as failed:
                await copy_back(repo, backed.manifest, location(weed, target.bucket, relay.endpoint), concurrency=2)
        assert "run the restore again" in failed.value.hint
        there = await contents(target)
        assert 0 < len(there) < len(backed.at_backup)
        assert all(backed.at_backup[k] == v for k, v in there.items())  # what landed is whole
        report = await copy_back(repo, backed.manifest, target)
    assert report.ok and report.skipped_objects == len(there)
    assert report.copied_objects == len(backed.at_backup) - len(there)
    assert await contents(target) == backed.at_backup


@pytest.mark.anyio
async def test_a_versioned_bucket_gets_its_recorded_versions_back_and_keeps_what_is_already_them(
    s3_db: EngramDB, weed: SeaweedFS, tmp_path: Path
) -> None:
    backed = await backup(s3_db, weed, tmp_path, s3_repo=False, versioned=True)
    async with backed.repository() as repo:
        entries = await entries_of(repo, backed.manifest)
        assert backed.manifest.attachments.source_versioned and all(e.version_id for e in entries)
        changed = sorted(backed.at_backup)[:3]
        recorded = {e.key: e.version_id for e in entries}
        async with s3.bulk_client(backed.source) as c:
            await c.put_object(Bucket=backed.source.bucket, Key=changed[0], Body=b"overwritten after the backup")
            await c.delete_object(Bucket=backed.source.bucket, Key=changed[1])  # a delete marker on top
            # The recorded version itself destroyed: only the repository's pool still has its bytes.
            await c.put_object(Bucket=backed.source.bucket, Key=changed[2], Body=b"a newer version")
            await c.delete_object(Bucket=backed.source.bucket, Key=changed[2], VersionId=recorded[changed[2]])
        report = await copy_back(repo, backed.manifest, backed.source)
    assert report.ok and report.recorded_versions == len(entries)
    assert report.copied_objects == 3 and report.skipped_objects == len(entries) - 3
    assert report.from_versions == 2  # copied inside the bucket from the versions it still holds
    assert {k: v for k, v in (await contents(backed.source)).items() if k in backed.at_backup} == backed.at_backup


@pytest.mark.anyio
async def test_a_database_backend_backup_has_nothing_to_copy_back(
    engram_db: EngramDB, weed: SeaweedFS, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path)
    runtime = Runtime(load_settings(environ=env))
    try:
        result = await run_backup(runtime, RunBackupInput(), silent)
    finally:
        await runtime.aclose()
    target = await new_bucket(weed)
    async with open_repository(load_settings(environ=env)) as repo:
        manifest = Manifest.model_validate_json(await repo.get_bytes(f"{BACKUPS}{result.backup_id}/manifest.json"))
        report = await copy_back(repo, manifest, target)
    assert report.nothing_to_do and "rows of the database dump" in report.nothing_to_do
    assert report.objects == 0 and not await contents(target)


def test_a_small_local_pool_blob_is_read_and_hashed_in_one_thread_call(tmp_path: Path) -> None:
    import hashlib

    blob = tmp_path / "blob"
    data = secrets.token_bytes(70_000)
    blob.write_bytes(data)
    sha256, md5 = hashlib.sha256(data).hexdigest(), hashlib.md5(data, usedforsecurity=False).hexdigest()
    assert copy_back_module._read_hashed(blob, md5=True) == (data, sha256, md5)
    assert copy_back_module._read_hashed(blob, md5=False) == (data, sha256, None)  # SHA-256 recorded: MD5 unused
    assert copy_back_module._read_hashed(tmp_path / "gone", md5=False) is None  # the stream then says what is wrong
    blob.write_bytes(bytes(copy_back_module.SINGLE_PUT + 10))  # grown past the one-put limit: read one past it
    read = copy_back_module._read_hashed(blob, md5=False)
    assert read is not None and len(read[0]) == copy_back_module.SINGLE_PUT + 1
