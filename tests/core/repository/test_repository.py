"""The repository primitives, against a local directory and a real SeaweedFS bucket."""

from __future__ import annotations

import hashlib
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from support import new_bucket

from engram_recovery.core.errors import ConfigurationError, StoreUnreachable
from engram_recovery.core.repository import localfs, open_repository, verify
from engram_recovery.core.repository.base import Repository
from engram_recovery.core.repository.local import LocalRepository
from engram_recovery.core.repository.records import read_state
from engram_recovery.core.repository.s3 import PART_SIZE, S3Repository
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores.s3 import S3Location
from engram_recovery.testbed.seaweedfs import SeaweedFS


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.anyio
async def test_put_stream_stores_the_bytes_and_reports_their_size_and_sha256(repo: Repository) -> None:
    # Larger than one multipart part, so the S3 case really goes through a multipart upload.
    data = secrets.token_bytes(PART_SIZE + 123_457)
    size, digest = await repo.put_stream("backups/b1/db.dump", chunks_of(data, 1 << 20))
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert await repo.get_bytes("backups/b1/db.dump") == data
    assert await repo.sha256("backups/b1/db.dump") == (size, digest)
    assert await repo.exists("backups/b1/db.dump")
    assert not await repo.exists("backups/b1/other")


@pytest.mark.anyio
async def test_list_and_delete_see_only_the_prefix(repo: Repository) -> None:
    await repo.put_bytes("backups/a/x", b"1")
    await repo.put_bytes("backups/a/y", b"22")
    await repo.put_bytes("attachments/zz", b"333")
    assert [item async for item in repo.list("backups/")] == [("backups/a/x", 1), ("backups/a/y", 2)]
    assert [item async for item in repo.list("attachments/")] == [("attachments/zz", 3)]
    await repo.delete(["backups/a/x", "backups/a/y", "backups/a/missing"])
    assert [item async for item in repo.list("backups/")] == []
    assert await repo.exists("attachments/zz")


class Boom(Exception):
    pass


@pytest.mark.anyio
async def test_a_stream_that_fails_midway_leaves_no_object_under_any_name(repo: Repository) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield secrets.token_bytes(PART_SIZE + 1)
        yield b"more"
        raise Boom

    with pytest.raises(Boom):
        await repo.put_stream("backups/b2/db.dump", failing())
    assert [item async for item in repo.list("")] == []
    assert not await repo.exists("backups/b2/db.dump")
    if isinstance(repo, S3Repository):
        answer = await repo.client.list_multipart_uploads(Bucket=repo.bucket)
        assert answer.get("Uploads", []) == []


@pytest.mark.anyio
async def test_a_cancelled_write_leaves_nothing(repo: Repository) -> None:
    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield secrets.token_bytes(1 << 20)
            await anyio.lowlevel.checkpoint()

    with anyio.move_on_after(0.5):
        await repo.put_stream("backups/b3/db.dump", endless())
    assert [item async for item in repo.list("")] == []


@pytest.mark.anyio
async def test_a_missing_key_is_reported_as_missing(repo: Repository) -> None:
    with pytest.raises(StoreUnreachable, match="missing"):
        await repo.get_bytes("backups/none/manifest.json")


def test_keys_that_escape_the_repository_are_refused(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path)
    for key in ("../etc/passwd", "/abs", "a/../../b", "dir/", ""):
        with pytest.raises(ConfigurationError):
            repo._path(key)


@pytest.mark.anyio
async def test_wrong_s3_credentials_fail_clearly_and_without_the_secret(weed: SeaweedFS) -> None:
    location = await new_bucket(weed)
    bad = S3Location(location.endpoint, location.access_key_id, "wrong-" + secrets.token_hex(8), "us-east-1",
                     location.bucket)
    async with S3Repository(bad, "") as repo:
        with pytest.raises(StoreUnreachable, match="refused the credentials") as info:
            await repo.check_writable()
    assert bad.secret_access_key not in str(info.value)


@pytest.mark.anyio
async def test_an_unreachable_s3_endpoint_fails_clearly() -> None:
    location = S3Location("http://127.0.0.1:9", "k", "secret-value", "us-east-1", "b")
    async with S3Repository(location, "") as repo:
        with pytest.raises(StoreUnreachable, match="unreachable"):
            await repo.check_writable()


@pytest.mark.anyio
async def test_read_state_lists_complete_backups_and_leftovers_in_an_s3_repository(weed: SeaweedFS) -> None:
    location = await new_bucket(weed)
    settings = load_settings(environ={
        "DATABASE_URL": "postgresql://x@127.0.0.1/engram",
        "ENGRAM_RECOVERY_REPOSITORY": f"s3://{location.bucket}/p",
        "ENGRAM_RECOVERY_REPOSITORY_ENDPOINT": weed.endpoint,
        "ENGRAM_RECOVERY_REPOSITORY_ACCESS_KEY_ID": weed.access_key_id,
        "ENGRAM_RECOVERY_REPOSITORY_SECRET_ACCESS_KEY": weed.secret_access_key,
    })
    async with open_repository(settings) as repo:
        assert isinstance(repo, S3Repository)
        await repo.put_bytes(
            "backups/20260101T000000Z/manifest.json",
            b'{"backup_id": "20260101T000000Z", "finished_at": "2026-01-01T00:00:00+00:00", "total_bytes": 5, '
            b'"verified": true, "verified_at": "2026-01-01T00:00:01+00:00"}',
        )
        await repo.put_bytes("backups/20260102T000000Z/db.dump", b"half")
    state = await read_state(settings)
    assert [b.backup_id for b in state.backups] == ["20260101T000000Z"]
    assert state.newest_verified is not None and state.newest_verified.size_bytes == 5
    assert state.incomplete == ["20260102T000000Z"]


@pytest.mark.anyio
async def test_verify_rereads_what_was_stored(repo: Repository) -> None:
    data = secrets.token_bytes(3 << 20)
    size, digest = await repo.put_stream("backups/b1/db.dump", chunks_of(data, 1 << 20))
    assert await repo.verify("backups/b1/db.dump", size, digest) is None
    assert await repo.verify("backups/b1/db.dump", size, "0" * 64) == (
        f"stored {size} bytes with SHA-256 {digest[:16]}..., recorded {size} bytes with {'0' * 16}..."
    )
    with pytest.raises(StoreUnreachable, match="missing"):
        await repo.verify("backups/b1/gone", 1, "0" * 64)


@pytest.mark.anyio
async def test_a_mismatch_reads_the_same_in_a_backup_check_and_a_restore_check(repo: Repository) -> None:
    # The repository's own re-read (a backup's verification) and a restore's verify_artifacts word it alike.
    data = secrets.token_bytes(1 << 16)
    size, digest = await repo.put_stream("backups/b1/db.dump", chunks_of(data, 1 << 14))
    fact = await repo.verify("backups/b1/db.dump", size + 1, digest)
    assert fact == f"stored {size} bytes with SHA-256 {digest[:16]}..., recorded {size + 1} bytes with {digest[:16]}..."
    judged = verify.compare("db.dump", digest, size + 1, verify.Digest(digest, size))
    assert judged.problem is not None and judged.problem.startswith(f"db.dump: {fact}: ")
    if (path := repo.local_file("backups/b1/db.dump")) is not None:  # one file hasher for both
        assert verify.sha256_file(path) == verify.Digest(digest, size)


# --- local files: durable writes, checkpoints and verification by windows --------------------------------------

WINDOW = 64 << 10
KEY = "backups/b1/db.dump"


async def written(tmp_path: Path, data: bytes) -> tuple[LocalRepository, int, str, Path]:
    repo = LocalRepository(tmp_path / "repo", window=WINDOW)
    size, digest = await repo.put_stream(KEY, chunks_of(data, 16 << 10))
    return repo, size, digest, tmp_path / "repo" / KEY


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["first", "middle", "last"])
async def test_verification_by_windows_names_the_window_whose_bytes_changed(tmp_path: Path, where: str) -> None:
    data = secrets.token_bytes(10 * WINDOW + 1234)  # ten full windows and a short last one
    repo, size, digest, path = await written(tmp_path, data)
    assert await repo.verify(KEY, size, digest) is None
    offset = {"first": 5, "middle": 4 * WINDOW + 77, "last": size - 1}[where]
    altered = bytearray(data)
    altered[offset] ^= 0x01
    path.write_bytes(altered)
    start = offset // WINDOW * WINDOW
    assert await repo.verify(KEY, size, digest) == (
        f"bytes {start}-{min(start + WINDOW, size)} do not read back as written "
        f"(recorded {size} bytes with SHA-256 {digest[:16]}...)"
    )
    # A repository that did not write the file re-reads it whole, and finds the same damage.
    fresh = await LocalRepository(tmp_path / "repo").verify(KEY, size, digest)
    assert fresh is not None and fresh.startswith(f"stored {size} bytes with SHA-256 ")


@pytest.mark.anyio
async def test_verification_by_windows_catches_a_file_cut_short_or_grown(tmp_path: Path) -> None:
    data = secrets.token_bytes(3 * WINDOW)
    repo, size, digest, path = await written(tmp_path, data)
    path.write_bytes(data[:-1])
    assert await repo.verify(KEY, size, digest) == f"stored {size - 1} bytes, {size} were written"
    path.write_bytes(data + b"x")
    assert await repo.verify(KEY, size, digest) == f"stored {size + 1} bytes, {size} were written"
    path.write_bytes(data)
    assert await repo.verify(KEY, size, digest) is None


@pytest.mark.anyio
async def test_an_empty_file_verifies(tmp_path: Path) -> None:
    repo, size, digest, _path = await written(tmp_path, b"")
    assert (size, digest) == (0, hashlib.sha256(b"").hexdigest())
    assert await repo.verify(KEY, 0, digest) is None


@pytest.mark.anyio
async def test_a_file_of_one_window_is_verified_by_a_whole_reread(tmp_path: Path) -> None:
    # Such files (a mirror writes many) keep no checkpoints, so memory stays flat whatever their number.
    data = secrets.token_bytes(WINDOW - 1)
    repo, size, digest, path = await written(tmp_path, data)
    assert await repo.verify(KEY, size, digest) is None
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    problem = await repo.verify(KEY, size, digest)
    assert problem is not None and problem.startswith(f"stored {size} bytes with SHA-256 ")


def test_writeback_starts_for_each_window_as_soon_as_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[tuple[int, int]] = []

    def record(fd: int, offset: int, length: int) -> bool:
        started.append((offset, length))
        return True

    monkeypatch.setattr(localfs, "_start_writeback", record)
    with (tmp_path / "f").open("wb") as handle:
        writer = localfs.HashedWriter(handle, window=WINDOW)
        for _ in range(5):
            writer.write(b"x" * (WINDOW // 2))
        assert started == [(0, WINDOW), (WINDOW, WINDOW)]
        writer.finish()
    # The half window at the end is left to the final fsync; every window has its checkpoint.
    assert started == [(0, WINDOW), (WINDOW, WINDOW)]
    assert [c.offset for c in writer.checkpoints] == [0, WINDOW, 2 * WINDOW, 5 * WINDOW // 2]
    assert writer.checkpoints[-1].state.hexdigest() == hashlib.sha256(b"x" * (5 * WINDOW // 2)).hexdigest()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_the_kernel_accepts_the_writeback_request(tmp_path: Path) -> None:
    assert localfs._start_writeback is not None
    with (tmp_path / "f").open("wb") as handle:
        handle.write(b"x" * 8192)
        handle.flush()
        assert localfs._start_writeback(handle.fileno(), 0, 8192)
