"""The attachments mirror (core/repository/mirror.py) against a real SeaweedFS: into local and S3 repositories."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream
from support import loopback_server, new_bucket, s3_location

from engram_recovery.core.errors import IntegrityError, StoreUnreachable
from engram_recovery.core.progress import silent
from engram_recovery.core.repository import layout, mirror
from engram_recovery.core.repository.base import Repository
from engram_recovery.core.repository.layout import inventory_key, pool_key
from engram_recovery.core.repository.local import LocalRepository
from engram_recovery.core.repository.mirror import STREAM_CHUNK, MirrorOptions, mirror_attachments
from engram_recovery.core.repository.pool import InventoryEntry, collect_garbage, read_inventory
from engram_recovery.core.repository.s3 import S3Repository
from engram_recovery.core.stores import s3
from engram_recovery.core.stores.s3 import S3Location
from engram_recovery.testbed.seaweedfs import SeaweedFS


async def put(source: S3Location, key: str, body: bytes) -> None:
    async with s3.bulk_client(source) as c:
        await c.put_object(Bucket=source.bucket, Key=key, Body=body)


async def remove(source: S3Location, key: str) -> None:
    async with s3.bulk_client(source) as c:
        await c.delete_object(Bucket=source.bucket, Key=key)


async def bucket_listing(source: S3Location) -> list[tuple[str, int, str]]:
    async with s3.bulk_client(source) as c:
        return sorted([(o.key, o.size, o.etag) async for o in s3.list_objects(c, source.bucket)])


def engram_objects(count: int) -> dict[str, bytes]:
    """Keys shaped like Engram's (<user>/<vault>/objects/<attachment>), plus an export and an empty blob."""
    objects = {f"u{i % 3}/v{i % 2}/objects/{i:04d}": secrets.token_bytes(100 + 37 * i) for i in range(count)}
    objects["exports/u0/account-export.zip"] = secrets.token_bytes(4096)
    objects["u1/v0/objects/empty"] = b""
    objects["u2/v1/objects/ünïcode name.png"] = b"\x89PNG" + secrets.token_bytes(64)
    return objects


async def engram_bucket(weed: SeaweedFS, count: int) -> tuple[dict[str, bytes], S3Location]:
    """A new bucket holding `engram_objects(count)`: the objects and the bucket."""
    objects = engram_objects(count)
    return objects, await new_bucket(weed, objects)


async def mirrored_once(repo: Repository, weed: SeaweedFS, count: int) -> tuple[dict[str, bytes], S3Location]:
    """A bucket of `count` Engram-shaped objects (and the extras), mirrored into `repo` as backup b1."""
    objects, source = await engram_bucket(weed, count)
    await mirror_attachments(source, repo, "b1", silent)
    return objects, source


async def inventory(repo: Repository, backup_id: str) -> list[InventoryEntry]:
    return [entry async for entry in read_inventory(repo, inventory_key(backup_id))]


async def repository_keys(repo: Repository) -> list[str]:
    return [key async for key, _size in repo.list("")]


@pytest.mark.anyio
async def test_the_inventory_matches_the_bucket_exactly_and_every_blob_is_a_faithful_copy(
    repo: Repository, weed: SeaweedFS
) -> None:
    objects, source = await engram_bucket(weed, 20)
    calls: list[tuple[float, float | None]] = []

    async def progress(done: float, total: float | None = None, message: str | None = None) -> None:
        calls.append((done, total))

    report = await mirror_attachments(source, repo, "b1", progress)

    entries = await inventory(repo, "b1")
    assert sorted((e.key, e.size, e.etag) for e in entries) == await bucket_listing(source)
    for entry in entries:
        assert entry.version_id is None
        assert await repo.get_bytes(entry.repo_key) == objects[entry.key]
    stored = await repo.sha256(inventory_key("b1"))
    assert (report.inventory_size, report.inventory_sha256) == stored
    assert report.inventory_name == layout.INVENTORY_NAME
    assert (report.objects, report.bytes) == (len(objects), sum(map(len, objects.values())))
    assert (report.copied_objects, report.skipped_objects, report.versioned) == (len(objects), 0, False)
    # Same endpoint and same credentials: the S3 repository gets server-side copies.
    assert report.server_side_copy is isinstance(repo, S3Repository)
    assert calls[0] == (0, len(objects)) and calls[-1] == (len(objects), len(objects))


@pytest.mark.anyio
async def test_a_rerun_copies_only_new_and_changed_objects_and_keeps_the_old_blobs(
    repo: Repository, weed: SeaweedFS
) -> None:
    objects, source = await mirrored_once(repo, weed, 12)

    again = await mirror_attachments(source, repo, "b2", silent)
    assert (again.copied_objects, again.copied_bytes, again.skipped_objects) == (0, 0, len(objects))
    assert [(e.key, e.repo_key) for e in await inventory(repo, "b2")] == [
        (e.key, e.repo_key) for e in await inventory(repo, "b1")
    ]

    changed, added = "u0/v1/objects/0003", "u2/v0/objects/new"
    await put(source, changed, b"edited attachment")
    await put(source, added, b"a new attachment")
    third = await mirror_attachments(source, repo, "b3", silent)
    assert (third.copied_objects, third.copied_bytes) == (2, len(b"edited attachment") + len(b"a new attachment"))
    now = {e.key: e for e in await inventory(repo, "b3")}
    assert await repo.get_bytes(now[changed].repo_key) == b"edited attachment"
    assert await repo.get_bytes(now[added].repo_key) == b"a new attachment"
    # The earlier recovery point still restores the version it recorded.
    before = {e.key: e for e in await inventory(repo, "b1")}
    assert before[changed].repo_key != now[changed].repo_key
    assert await repo.get_bytes(before[changed].repo_key) == objects[changed]


@pytest.mark.anyio
async def test_an_object_deleted_at_the_source_stays_restorable_from_the_earlier_backup(
    repo: Repository, weed: SeaweedFS
) -> None:
    objects, source = await mirrored_once(repo, weed, 5)
    gone = "u1/v1/objects/0001"
    await remove(source, gone)

    later = await mirror_attachments(source, repo, "b2", silent)

    assert gone not in {e.key for e in await inventory(repo, "b2")}
    assert later.objects == len(objects) - 1 and later.copied_objects == 0
    earlier = {e.key: e for e in await inventory(repo, "b1")}
    assert await repo.get_bytes(earlier[gone].repo_key) == objects[gone]


@pytest.mark.anyio
async def test_a_dry_run_reports_what_would_be_copied_and_writes_nothing(repo: Repository, weed: SeaweedFS) -> None:
    objects, source = await mirrored_once(repo, weed, 6)
    await put(source, "u0/v0/objects/fresh", b"x" * 1000)
    before = await repository_keys(repo)

    report = await mirror_attachments(source, repo, "b2", silent, MirrorOptions(dry_run=True))

    assert report.dry_run and report.inventory_name is None
    assert (report.copied_objects, report.copied_bytes, report.objects) == (1, 1000, len(objects) + 1)
    assert await repository_keys(repo) == before


@pytest.mark.anyio
async def test_objects_that_change_or_vanish_during_the_run_are_recorded_as_they_were_copied(
    repo: Repository, weed: SeaweedFS
) -> None:
    objects, source = await engram_bucket(weed, 4)
    changed, vanished = "u0/v0/objects/0000", "u1/v1/objects/0001"

    async def meddle(done: float, total: float | None = None, message: str | None = None) -> None:
        # Called once the listings are done and before the first copy: Engram writes meanwhile.
        if done == 0:
            await put(source, changed, b"rewritten after the listing")
            await remove(source, vanished)

    report = await mirror_attachments(source, repo, "b1", meddle)

    entries = {e.key: e for e in await inventory(repo, "b1")}
    assert vanished not in entries and report.vanished_objects == 1
    assert await repo.get_bytes(entries[changed].repo_key) == b"rewritten after the listing"
    assert entries[changed].etag == hashlib.md5(b"rewritten after the listing", usedforsecurity=False).hexdigest()
    assert sorted((e.key, e.size, e.etag) for e in entries.values()) == await bucket_listing(source)


@pytest.mark.anyio
async def test_a_versioned_bucket_records_the_version_id_of_each_current_object(
    repo: Repository, weed: SeaweedFS
) -> None:
    source = await new_bucket(weed, {"u0/v0/objects/a": b"first", "u0/v0/objects/gone": b"bye"}, versioned=True)
    await put(source, "u0/v0/objects/a", b"second")
    await remove(source, "u0/v0/objects/gone")  # leaves a delete marker as the newest version
    async with s3.bulk_client(source) as c:
        head = await c.head_object(Bucket=source.bucket, Key="u0/v0/objects/a")

    report = await mirror_attachments(source, repo, "b1", silent)

    assert report.versioned
    (entry,) = await inventory(repo, "b1")
    assert (entry.key, entry.version_id) == ("u0/v0/objects/a", head["VersionId"])
    assert await repo.get_bytes(entry.repo_key) == b"second"


@pytest.mark.anyio
async def test_the_latest_versions_survive_paging_through_many_versions_and_delete_markers(weed: SeaweedFS) -> None:
    source = await new_bucket(weed, {f"k{i}": b"old" for i in range(5)}, versioned=True)
    for i in range(5):
        await put(source, f"k{i}", f"new {i}".encode())
    await remove(source, "k2")
    async with s3.bulk_client(source) as c:
        # Pages of two entries: every page boundary falls between versions of one key or a marker.
        latest = [(v.key, v.size) async for v in s3.list_latest_versions(c, source.bucket, page_size=2)]
    assert sorted(latest) == [(f"k{i}", 5) for i in (0, 1, 3, 4)]


@pytest.mark.anyio
async def test_large_objects_are_copied_server_side_in_parts(weed: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    big = secrets.token_bytes(11 << 20)
    source = await new_bucket(weed, {"u0/v0/objects/video": big})
    target = await new_bucket(weed)
    # Lower the 5 GiB CopyObject limit so an 11 MiB object takes the UploadPartCopy path.
    monkeypatch.setattr(mirror, "COPY_CUTOFF", 6 << 20)
    monkeypatch.setattr(mirror, "COPY_PART", 5 << 20)
    async with S3Repository(target, "") as repo:
        report = await mirror_attachments(source, repo, "b1", silent)
        (entry,) = await inventory(repo, "b1")
        assert report.server_side_copy and await repo.get_bytes(entry.repo_key) == big
        async with s3.bulk_client(target) as c:
            head = await c.head_object(Bucket=target.bucket, Key=entry.repo_key)
        assert head["ETag"].strip('"').endswith("-3")  # three parts: a multipart object, not one CopyObject


@pytest.mark.anyio
async def test_wrong_credentials_fail_with_a_clear_message_that_hides_the_secret(
    weed: SeaweedFS, tmp_path: Path
) -> None:
    source = await new_bucket(weed, {"k": b"v"})
    bad = s3_location(weed, source.bucket, secret_access_key="wrong-secret-" + secrets.token_hex(8))
    async with LocalRepository(tmp_path / "repo") as repo:
        with pytest.raises(StoreUnreachable) as caught:
            await mirror_attachments(bad, repo, "b1", silent)
    assert "refused the credentials" in str(caught.value) and "secret access key" in caught.value.hint
    assert bad.secret_access_key not in str(caught.value)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("*"))


@pytest.mark.anyio
async def test_a_missing_bucket_and_an_unreachable_endpoint_are_named(weed: SeaweedFS, tmp_path: Path) -> None:
    async with LocalRepository(tmp_path / "repo") as repo:
        with pytest.raises(StoreUnreachable, match="does not exist"):
            await mirror_attachments(s3_location(weed, "no-such-bucket-here"), repo, "b1", silent)
        with pytest.raises(StoreUnreachable, match="unreachable") as caught:
            await mirror_attachments(s3_location(weed, "b", endpoint="http://127.0.0.1:9"), repo, "b1", silent)
    assert "running" in caught.value.hint


@pytest.mark.anyio
async def test_garbage_collection_deletes_only_pool_entries_no_kept_inventory_references(
    repo: Repository, weed: SeaweedFS
) -> None:
    source = await new_bucket(weed, {"a": b"kept by both", "b": b"only in the old backup", "c": b"v1"})
    await mirror_attachments(source, repo, "old", silent)
    await remove(source, "b")
    await put(source, "c", b"v2 is longer")
    await mirror_attachments(source, repo, "new", silent)
    old = {e.key: e for e in await inventory(repo, "old")}

    with pytest.raises(IntegrityError, match="missing; nothing was deleted"):
        await collect_garbage(repo, [inventory_key("new"), inventory_key("never-ran")])
    assert await repo.exists(old["b"].repo_key)

    deleted = await collect_garbage(repo, [inventory_key("new")])

    assert deleted == (2, len(b"only in the old backup") + len(b"v1"))
    assert not await repo.exists(old["b"].repo_key) and not await repo.exists(old["c"].repo_key)
    for entry in await inventory(repo, "new"):
        assert await repo.get_bytes(entry.repo_key) == {"a": b"kept by both", "c": b"v2 is longer"}[entry.key]
    assert await collect_garbage(repo, [inventory_key("new")]) == (0, 0)


@dataclass
class Proxy:
    """A TCP proxy in front of SeaweedFS that counts its connections and can cut responses short."""

    endpoint: str = ""
    open_now: int = 0
    most_open: int = 0
    response_bytes: int = 0


@contextlib.asynccontextmanager
async def proxy(upstream: str, cut_after: int | None = None, flip_at: int | None = None) -> AsyncIterator[Proxy]:
    """Relay to `upstream`; with `cut_after`, drop a connection once it has relayed that many response bytes;
    with `flip_at`, invert the bits of the response byte at that offset of each connection."""
    host, port = upstream.removeprefix("http://").split(":")
    state = Proxy()

    async def relay(client: SocketStream) -> None:
        state.open_now += 1
        state.most_open = max(state.most_open, state.open_now)
        try:
            async with client, await anyio.connect_tcp(host, int(port)) as server, anyio.create_task_group() as tg:

                async def requests() -> None:
                    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                        async for data in client:
                            await server.send(data)
                    tg.cancel_scope.cancel()

                async def responses() -> None:
                    relayed, limit = 0, cut_after if cut_after is not None else float("inf")
                    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                        async for data in server:
                            if flip_at is not None and relayed <= flip_at < relayed + len(data):
                                at = flip_at - relayed
                                data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
                            await client.send(data[: int(min(len(data), limit - relayed))])
                            relayed += len(data)
                            state.response_bytes += len(data)
                            if relayed >= limit:
                                break
                    tg.cancel_scope.cancel()

                tg.start_soon(requests)
                tg.start_soon(responses)
        finally:
            state.open_now -= 1

    async with loopback_server(relay) as endpoint:
        state.endpoint = endpoint
        yield state


@pytest.mark.anyio
async def test_concurrency_is_bounded_and_large_streamed_objects_are_fewer_still(
    weed: SeaweedFS, tmp_path: Path
) -> None:
    small = {f"u0/v0/objects/s{i}": secrets.token_bytes(200_000) for i in range(24)}
    large = {f"u0/v1/objects/l{i}": secrets.token_bytes(STREAM_CHUNK + 1) for i in range(8)}
    async with LocalRepository(tmp_path / "repo") as repo:
        for objects, concurrency, bound in ((small, 3, 3), (large, 16, mirror.LARGE_STREAMS)):
            source = await new_bucket(weed, objects)
            async with proxy(weed.endpoint) as relay:
                counted = s3_location(weed, source.bucket, endpoint=relay.endpoint)
                # The listing connection is reused by a worker, so connections == requests in flight.
                report = await mirror_attachments(
                    counted, repo, f"c{concurrency}", silent, MirrorOptions(concurrency=concurrency)
                )
            assert report.copied_objects == len(objects)
            assert 2 <= relay.most_open <= bound


@pytest.mark.anyio
async def test_a_same_endpoint_repository_gets_copies_that_never_pass_through_this_process(weed: SeaweedFS) -> None:
    objects = {f"u0/v0/objects/{i}": secrets.token_bytes(256 << 10) for i in range(8)}
    source = await new_bucket(weed, objects)
    target = await new_bucket(weed)
    async with proxy(weed.endpoint) as relay:
        via = {"endpoint": relay.endpoint}
        async with S3Repository(s3_location(weed, target.bucket, **via), "p") as repo:
            report = await mirror_attachments(s3_location(weed, source.bucket, **via), repo, "b1", silent)
            blobs = {e.key: await repo.get_bytes(e.repo_key) for e in await inventory(repo, "b1")}
            assert report.server_side_copy and blobs == objects
            # 2 MiB were copied, yet only listings and small XML answers came back before the check above.
            assert relay.response_bytes - len(b"".join(blobs.values())) < 64 << 10


@pytest.mark.anyio
async def test_a_download_cut_off_midway_leaves_no_pool_entry_and_the_next_run_copies_it(
    weed: SeaweedFS, tmp_path: Path
) -> None:
    big = secrets.token_bytes(1 << 20)
    source = await new_bucket(weed, {"u0/v0/objects/big": big})
    async with LocalRepository(tmp_path / "repo") as repo:
        async with proxy(weed.endpoint, cut_after=256 << 10) as flaky_proxy:
            flaky = s3_location(weed, source.bucket, endpoint=flaky_proxy.endpoint)
            with pytest.raises(StoreUnreachable, match="unreachable while trying to copy 'u0/v0/objects/big'"):
                await mirror_attachments(flaky, repo, "b1", silent)
        # Nothing that could pass for a blob or an inventory, and no temporary file either.
        assert [p for p in (tmp_path / "repo").rglob("*") if p.is_file()] == []

        report = await mirror_attachments(source, repo, "b1", silent)
        (entry,) = await inventory(repo, "b1")
        assert report.copied_objects == 1 and await repo.get_bytes(entry.repo_key) == big


@pytest.mark.anyio
async def test_a_download_damaged_in_transit_is_refused_and_nothing_is_stored(weed: SeaweedFS, tmp_path: Path) -> None:
    source = await new_bucket(weed, {"u0/v0/objects/scan.pdf": secrets.token_bytes(512 << 10)})
    async with LocalRepository(tmp_path / "repo") as repo, proxy(weed.endpoint, flip_at=300_000) as relay:
        damaging = s3_location(weed, source.bucket, endpoint=relay.endpoint)
        with pytest.raises(IntegrityError, match="arrived damaged .* nothing was stored"):
            await mirror_attachments(damaging, repo, "b1", silent)
    assert [p for p in (tmp_path / "repo").rglob("*") if p.is_file()] == []


def test_pool_keys_separate_keys_and_etags_and_never_contain_path_tricks() -> None:
    assert pool_key("a", "0cc175b9c0f1b6a831c399e269772661") != pool_key("b", "0cc175b9c0f1b6a831c399e269772661")
    assert pool_key("a", "e1") != pool_key("a", "e2")
    weird = pool_key("../../etc/passwd", "../x/y")
    assert ".." not in weird and weird.count("/") == 4 and weird.startswith(layout.POOL)
