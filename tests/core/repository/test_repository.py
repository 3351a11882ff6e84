"""The repository primitives, against a local directory and a real SeaweedFS bucket."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from support import new_bucket

from engram_recovery.core.artifact.codec import Authenticate, Encoder
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


# --- a dump's file: dropped from the page cache behind the writing, re-read by windows as it is written -----

BIG = 1 << 20
HALF = BIG // 2


def _flip(path: Path, offset: int) -> None:
    """Change one byte of `path` in place, through a descriptor of its own (storage going bad)."""
    with path.open("r+b") as other:
        other.seek(offset)
        byte = other.read(1)
        other.seek(offset)
        other.write(bytes([byte[0] ^ 0x01]))


async def _reread(reader: localfs.ReadBack, windows: int) -> None:
    """Wait for the read-back thread (idle priority: on a busy machine it may take a while)."""
    for _ in range(3000):
        if reader.reread >= windows:
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"the read-back re-read {reader.reread} of {windows} windows in 30 s")


@pytest.mark.anyio
async def test_a_window_that_changes_on_disk_while_the_file_is_written_is_caught_by_the_read_back(
    tmp_path: Path,
) -> None:
    path = tmp_path / "f"
    data = secrets.token_bytes(3 * BIG + 1000)
    with path.open("wb") as handle:
        reader = localfs.ReadBack(path)
        writer = localfs.HashedWriter(handle, BIG, drop_behind=True, on_window=reader.window)
        # Window 0 complete, and the first half of window 1 already written; then that half goes bad
        # before window 1 is finished: only a read-back of the window after it was written can see it.
        writer.write(data[: BIG + HALF])
        _flip(path, BIG + 100)
        writer.write(data[BIG + HALF :])
        digest = writer.finish()
    assert digest == hashlib.sha256(data).hexdigest()
    assert [c.offset for c in writer.checkpoints] == [0, BIG, 2 * BIG, 3 * BIG, 3 * BIG + 1000]
    await _reread(reader, 4)
    assert reader.stop() == {0: (BIG, True), BIG: (2 * BIG, False), 2 * BIG: (3 * BIG, True),
                             3 * BIG: (3 * BIG + 1000, True)}  # fmt: skip


@pytest.mark.anyio
async def test_verify_counts_the_windows_read_back_during_the_write_and_rereads_only_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = LocalRepository(tmp_path / "repo", window=BIG)
    data = secrets.token_bytes(4 * BIG + 1000)
    temp: list[Path] = []

    async def stream() -> AsyncIterator[bytes]:
        yield data[: BIG + HALF]
        temp.extend((tmp_path / "repo" / "backups" / "b1").glob(".db.dump*"))
        _flip(temp[0], BIG + 100)  # window 1 goes bad on the disk while it is being written
        yield data[BIG + HALF : 3 * BIG]
        yield data[3 * BIG :]

    size, digest = await repo.put_stream(KEY, stream(), read_back=True)
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    reader = repo._written[KEY].reader
    assert reader is not None
    await _reread(reader, 5)
    # The storage "heals" before the final verification: what the read-back saw still counts.
    _flip(tmp_path / "repo" / KEY, BIG + 100)
    reread: list[int] = []
    original = localfs.verify_window

    def counting(path: Path, start: localfs.Checkpoint, end: localfs.Checkpoint) -> bool:
        reread.append(start.offset)
        return original(path, start, end)

    monkeypatch.setattr(localfs, "verify_window", counting)
    assert await repo.verify(KEY, size, digest) == (
        f"bytes {BIG}-{2 * BIG} do not read back as written (recorded {size} bytes with SHA-256 {digest[:16]}...)"
    )
    assert reread == []  # every window was re-read while the file was written


@pytest.mark.anyio
async def test_verify_rereads_the_windows_the_read_back_had_not_reached(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo", window=BIG)
    data = secrets.token_bytes(3 * BIG + 1000)
    size, digest = await repo.put_stream(KEY, chunks_of(data, 1 << 20), read_back=True)
    reader = repo._written[KEY].reader
    assert reader is not None
    reader.stop()  # whatever it had not re-read by now is the final verification's
    assert await repo.verify(KEY, size, digest) is None
    _flip(tmp_path / "repo" / KEY, size - 1)
    problem = await repo.verify(KEY, size, digest)
    assert problem is not None and problem.startswith(f"bytes {3 * BIG}-{size} do not read back")


@pytest.mark.anyio
async def test_a_dump_file_replaced_after_writing_is_read_again_whole(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo", window=BIG)
    data = secrets.token_bytes(3 * BIG)
    size, digest = await repo.put_stream(KEY, chunks_of(data, 1 << 20), read_back=True)
    path = tmp_path / "repo" / KEY
    altered = bytearray(data)
    altered[7] ^= 0x01
    replacement = path.with_name("other")
    replacement.write_bytes(altered)
    replacement.replace(path)  # a new inode under the name: the read-back's verdicts are about another file
    assert await repo.verify(KEY, size, digest) == (
        f"bytes 0-{BIG} do not read back as written (recorded {size} bytes with SHA-256 {digest[:16]}...)"
    )


def _encrypted(size: int) -> tuple[bytes, bytes]:
    """(backup key, an encrypted dump of `size` random plain bytes), as run_backup writes one."""
    key = secrets.token_bytes(32)
    encoder = Encoder("none", key)
    plain = secrets.token_bytes(size)
    return key, encoder.update(plain) + encoder.finish()


@pytest.mark.anyio
async def test_an_encrypted_dump_is_proved_by_its_own_tags_on_the_read_back_not_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = LocalRepository(tmp_path / "repo", window=BIG)
    key, data = _encrypted(4 * BIG + 1000)
    hashed: list[localfs.Checkpoint] = []
    original = localfs.window_matches

    def counting(fd: int, direct: bool, start: localfs.Checkpoint, end: localfs.Checkpoint,
                 stop: threading.Event | None = None) -> bool | None:  # fmt: skip
        hashed.append(start)  # (an earlier test's idle read-back thread may still be hashing its own file)
        return original(fd, direct, start, end, stop)

    monkeypatch.setattr(localfs, "window_matches", counting)
    size, digest = await repo.put_stream(KEY, chunks_of(data, 1 << 20), read_back=True,
                                         check=Encoder("none", key).read_back_check())  # fmt: skip
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert await repo.verify(KEY, size, digest) is None
    reader = repo._written[KEY].reader
    assert reader is not None and reader.refused is None and reader.reread == 5
    ours = repo._written[KEY].checkpoints
    assert not [c for c in hashed if any(c is mine for mine in ours)]  # proved by the tags, none hashed again


@pytest.mark.anyio
async def test_a_window_going_bad_while_an_encrypted_dump_is_written_is_found_and_located(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo", window=BIG)
    key, data = _encrypted(4 * BIG)
    temp: list[Path] = []

    async def stream() -> AsyncIterator[bytes]:
        yield data[: BIG + HALF]
        temp.extend((tmp_path / "repo" / "backups" / "b1").glob(".db.dump*"))
        _flip(temp[0], BIG + 100)  # window 1 goes bad on the disk while it is being written
        yield data[BIG + HALF :]

    size, digest = await repo.put_stream(KEY, stream(), read_back=True, check=Encoder("none", key).read_back_check())
    assert digest == hashlib.sha256(data).hexdigest()
    # The tags refuse the re-read bytes; the checkpoints then name the window that changed.
    assert await repo.verify(KEY, size, digest) == (
        f"bytes {BIG}-{2 * BIG} do not read back as written (recorded {size} bytes with SHA-256 {digest[:16]}...)"
    )
    reader = repo._written[KEY].reader
    assert reader is not None and reader.refused is not None and "failed authentication" in reader.refused


@pytest.mark.anyio
async def test_a_stream_that_does_not_authenticate_is_refused_even_when_every_byte_reads_back(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo", window=BIG)
    key, data = _encrypted(3 * BIG)
    cut = data[: len(data) - 1000]  # written as given, yet its last record is missing: a broken writer
    size, digest = await repo.put_stream(KEY, chunks_of(cut, 1 << 20), read_back=True,
                                         check=Encoder("none", key).read_back_check())  # fmt: skip
    problem = await repo.verify(KEY, size, digest)
    assert problem is not None and problem.startswith("the stored file does not authenticate as written: ")
    assert "truncated" in problem


def test_a_filesystem_refusing_direct_reads_is_read_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.preadv

    def refusing(fd: int, buffers: list[memoryview], offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    data = secrets.token_bytes(2 * WINDOW + 5)
    with (tmp_path / "f").open("wb") as handle:
        writer = localfs.HashedWriter(handle, WINDOW, drop_behind=True)
        writer.write(data)
        writer.finish()
    monkeypatch.setattr(os, "preadv", refusing)
    start, middle, end = writer.checkpoints[1:]
    assert localfs.verify_window(tmp_path / "f", start, middle)
    assert localfs.verify_window(tmp_path / "f", middle, end)


def test_a_dump_file_leaves_the_page_cache_one_window_behind_the_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped: list[tuple[int, int]] = []
    monkeypatch.setattr(localfs, "_drop_cached", lambda fd, offset, length: dropped.append((offset, length)))
    with (tmp_path / "f").open("wb") as handle:
        writer = localfs.HashedWriter(handle, window=WINDOW, drop_behind=True)
        for _ in range(7):
            writer.write(b"x" * (WINDOW // 2))
        # Three windows written: the first two are dropped, the third is still being written back.
        assert dropped == [(0, WINDOW), (WINDOW, WINDOW)]
        writer.finish()
    assert dropped == [(0, WINDOW), (WINDOW, WINDOW), (0, 0)]  # and the whole file once it is durable
    assert (tmp_path / "f").read_bytes() == b"x" * (7 * WINDOW // 2)


def _write_dump(path: Path, data: bytes, on_window: localfs.Window | None = None) -> localfs.HashedWriter:
    """`data` written as a dump is (drop-behind, windows of two direct pieces), in uneven chunks."""
    with path.open("wb") as handle:
        writer = localfs.HashedWriter(handle, 2 * localfs.STAGE, drop_behind=True, on_window=on_window)
        for start in range(0, len(data), 1_000_003):
            writer.write(data[start : start + 1_000_003])
        writer.finish()
    return writer


def test_a_dump_goes_to_the_disk_directly_and_each_window_is_there_when_the_read_back_is_told(
    tmp_path: Path,
) -> None:
    path = tmp_path / "f"
    window = 2 * localfs.STAGE
    data = secrets.token_bytes(2 * window + window // 2 + 7)
    seen: list[tuple[int, bool | None]] = []

    def on_window(start: localfs.Checkpoint, end: localfs.Checkpoint) -> None:
        # Read through a descriptor of its own, bypassing the cache where it can: the bytes must be in the file.
        fd, direct = localfs._open_for_reading(path)
        try:
            seen.append((start.offset, localfs.window_matches(fd, direct, start, end)))
        finally:
            os.close(fd)

    writer = _write_dump(path, data, on_window)
    assert writer.direct is False  # the piece buffer is released once the file is whole
    assert path.read_bytes() == data
    assert writer.checkpoints[-1].state.hexdigest() == hashlib.sha256(data).hexdigest()
    assert seen == [(0, True), (window, True), (2 * window, True)]


def test_the_writer_takes_the_direct_path_where_the_filesystem_allows_it(tmp_path: Path) -> None:
    with (tmp_path / "f").open("wb") as handle:
        writer = localfs.HashedWriter(handle, 2 * localfs.STAGE, drop_behind=True)
        assert writer.direct  # ext4 or xfs under the test's temporary directory
        assert fcntl.fcntl(handle.fileno(), fcntl.F_GETFL) & os.O_DIRECT
        writer.finish()
    with (tmp_path / "g").open("wb") as handle:
        assert not localfs.HashedWriter(handle, 2 * localfs.STAGE).direct  # a small file goes through the cache
        assert not localfs.HashedWriter(handle, WINDOW, drop_behind=True).direct  # windows not whole pieces


def test_a_filesystem_refusing_a_direct_write_gets_the_bytes_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.write
    refused: list[int] = []

    def refusing(fd: int, data: memoryview) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data)

    monkeypatch.setattr(os, "write", refusing)
    data = secrets.token_bytes(3 * localfs.STAGE + 11)
    writer = _write_dump(tmp_path / "f", data)
    assert refused and (tmp_path / "f").read_bytes() == data
    assert writer.checkpoints[-1].state.hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")
def test_a_read_back_that_is_waited_for_finishes_at_normal_priority(tmp_path: Path) -> None:
    # At idle priority on a host others keep busy, the verification after the dump could wait indefinitely.
    key, data = _encrypted(2 * BIG + 100)
    path = tmp_path / "f"
    path.write_bytes(data)
    gate = threading.Event()
    policies: list[int] = []
    inner = Authenticate(key)

    class Watching:
        def update(self, piece: memoryview) -> None:
            gate.wait(30)  # until complete() has been called
            policies.append(os.sched_getscheduler(0))
            inner.update(piece)

        def finish(self) -> None:
            inner.finish()

    reader = localfs.ReadBack(path, Watching())
    for start, end in [(0, BIG), (BIG, 2 * BIG), (2 * BIG, len(data))]:
        reader.window(localfs.Checkpoint(start, hashlib.sha256()), localfs.Checkpoint(end, hashlib.sha256()))
    threading.Timer(0.3, gate.set).start()
    assert reader.complete() == {0: (BIG, True), BIG: (2 * BIG, True), 2 * BIG: (len(data), True)}
    assert policies and all(policy == os.SCHED_OTHER for policy in policies)
