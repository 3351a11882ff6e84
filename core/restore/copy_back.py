"""The attachments step of a restore: a backup's inventory, from the repository's pool back into a bucket.

Each inventory entry (key, size, ETag, version id, pool key, content checksum) is
put back under its key, checked against the checksum the backup recorded:

- repository on the bucket's endpoint with the same credentials: server-side
  CopyObject, the bytes never pass through here; the new object's ETag (an MD5)
  is compared with the recorded MD5, and an object whose ETag is no MD5 is
  re-read and hashed. A mismatch deletes the object it just wrote;
- otherwise (local repository, other endpoint): the blob is streamed out of the
  pool and hashed on the way; a small one is uploaded only once its checksum is
  proven, a large one is a multipart upload completed only then. A damaged blob
  never lands in the bucket.

Resumable: what to copy is decided from one listing of the bucket (1,000 keys a
request), not a HEAD per object. An object already there with the recorded size
and MD5 (or, in a versioned bucket, whose current version IS the recorded one) is
skipped, so a re-run after a failure copies only what is missing. Per-object
findings (a pool blob missing or damaged) are collected and named in the report,
not raised, so one bad blob does not hide the rest; a store that fails (bucket gone,
credentials, network) stops the run with the count of what is already done.

A STORAGE_BACKEND=database backup has nothing here: its attachment bytes are rows
of the dump. A versioned source is restored to the versions the inventory recorded:
where the bucket's current version is the recorded one, nothing is done; where the
bucket still holds the recorded version under newer ones (or under a delete marker),
that version is copied onto the current object inside the bucket (server-side, no
pool read); otherwise its bytes come from the pool. (A version id itself cannot be
recreated by any S3 API: the restored object is a new version with the recorded bytes.)
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream

from ..errors import RecoveryError, StoreUnreachable
from ..progress import Progress, silent
from ..repository.base import Repository
from ..repository.layout import POOL, inventory_key
from ..repository.manifest import Manifest
from ..repository.pool import InventoryEntry, read_inventory
from ..stores import s3
from ..stores.s3 import S3_ERRORS, S3Location, md5_of_etag
from ..taskgroups import task_group

# Above this a blob is uploaded in parts as it is read; below, checked whole before one PutObject.
SINGLE_PUT = 8 << 20
PART_SIZE = 8 << 20
# Blobs up to this size are read ahead, this many to a worker-thread call.
READ_AHEAD_SIZE = 256 << 10
READ_AHEAD_BATCH = 16
_PROGRESS_EVERY = 0.5


@dataclass(frozen=True)
class Failure:
    key: str
    repo_key: str
    reason: str


@dataclass(frozen=True)
class CopyBackReport:
    objects: int
    bytes: int
    copied_objects: int
    copied_bytes: int
    skipped_objects: int  # already in the bucket as recorded
    failures: list[Failure]
    server_side_copy: bool
    seconds: float
    recorded_versions: int = 0  # entries naming a version of a versioned source
    from_versions: int = 0  # of the copied: from the recorded version still in the bucket (server-side, no pool read)
    nothing_to_do: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class _Present:
    size: int
    etag: str
    version_id: str | None


def already_there(entry: InventoryEntry, present: _Present | None) -> bool | None:
    """Is `entry` in the bucket exactly as recorded? (pure) None: the listing cannot tell, ask the object."""
    if present is None or present.size != entry.size:
        return False
    if entry.version_id is not None and present.version_id == entry.version_id:
        return True  # the recorded version is the current one
    if present.etag == entry.etag:
        return True  # the very upload that was backed up (an MD5 of its bytes, or of its parts)
    recorded = entry.md5 or md5_of_etag(entry.etag)
    if recorded is not None and md5_of_etag(present.etag) is not None:
        return md5_of_etag(present.etag) == recorded
    # A multipart ETag (one we uploaded in parts, say): the checksums we stored with it will tell.
    return None if entry.checksum is not None else False


@dataclass(frozen=True)
class CopyOptions:
    """How a copy-back runs: `versioned`: the inventory came from a versioned bucket, so entries name the
    versions the target may still hold (asked of it); `concurrency`: S3 workers copying side by side."""

    versioned: bool = False
    concurrency: int = 16


async def copy_back(
    repo: Repository, manifest: Manifest, target: S3Location, progress: Progress = silent, *, concurrency: int = 16
) -> CopyBackReport:
    """Put every attachment of `manifest`'s inventory back into `target` (an existing bucket)."""
    info = manifest.attachments
    if info.backend != "s3" or info.in_database_dump or not info.inventory:
        in_dump = info.backend == "database" or info.in_database_dump
        why = ("STORAGE_BACKEND=database: the attachment bytes are rows of the database dump, restored with it"
               if in_dump else "this backup recorded no attachments")  # fmt: skip
        return CopyBackReport(0, 0, 0, 0, 0, [], False, 0.0, nothing_to_do=why)
    options = CopyOptions(versioned=bool(info.source_versioned), concurrency=concurrency)
    return await copy_inventory(repo, inventory_key(manifest.backup_id, info.inventory), target, progress, options)


async def copy_inventory(
    repo: Repository, inventory: str, target: S3Location, progress: Progress = silent,
    options: CopyOptions = CopyOptions(),
) -> CopyBackReport:  # fmt: skip
    """Put every entry of the inventory stored at repository key `inventory` back into `target`."""
    started = time.monotonic()
    entries = [e async for e in read_inventory(repo, inventory)]
    source = repo.s3_endpoint()
    server_side = source is not None and s3.same_account(source, target)
    async with _Session(repo, target, server_side, options.concurrency) as session:
        pooled, present = await session.survey(options.versioned)
        failures: list[Failure] = []
        for e in entries:
            size = pooled.get(e.repo_key)
            if session.has_version(e):
                continue  # the bucket still holds the recorded version: restored from there, not from the pool
            if size is None:
                failures.append(Failure(e.key, e.repo_key, "missing from the repository's pool; not restored"))
            elif size != e.size:
                failures.append(Failure(e.key, e.repo_key, f"{size} bytes in the pool, {e.size} recorded"))
        bad = {f.key for f in failures}
        verdicts = {e.key: already_there(e, present.get(e.key)) for e in entries if e.key not in bad}
        await session.ask_objects(entries, verdicts)
        todo = [e for e in entries if e.key not in bad and not verdicts[e.key]]
        skipped = len(entries) - len(todo) - len(bad)
        await progress(0, len(todo), f"restoring {len(todo)} of {len(entries)} attachments ({skipped} already there)")
        copied = await session.copy_all(todo, progress, failures)
    return CopyBackReport(
        objects=len(entries), bytes=sum(e.size for e in entries), copied_objects=len(copied),
        copied_bytes=sum(e.size for e in copied), skipped_objects=skipped, failures=failures,
        server_side_copy=server_side, seconds=round(time.monotonic() - started, 3),
        recorded_versions=sum(e.version_id is not None for e in entries),
        from_versions=sum(session.has_version(e) for e in copied),
    )  # fmt: skip


class _Session:
    """The S3 clients of one copy-back, opened once and shared by every worker."""

    def __init__(self, repo: Repository, target: S3Location, server_side: bool, concurrency: int) -> None:
        self.repo, self.target, self.server_side, self.concurrency = repo, target, server_side, max(1, concurrency)
        self._dst: Any = None
        self._copier: s3.Copier | None = None
        self._versions: set[tuple[str, str]] = set()  # (key, version id) the bucket holds, when it is versioned
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> _Session:
        self._dst = await self._stack.enter_async_context(s3.bulk_client(self.target, self.concurrency))
        if self.target.endpoint:  # for copies from the pool, and from a version to the current object
            self._copier = await self._stack.enter_async_context(s3.Copier(self.target, self.concurrency))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def survey(self, versioned: bool) -> tuple[dict[str, int], dict[str, _Present]]:
        """The pool's blobs and the bucket's objects, listed at the same time."""
        pooled: dict[str, int] = {}
        present: dict[str, _Present] = {}

        async def pool() -> None:
            pooled.update({key: size async for key, size in self.repo.list(POOL)})

        async def bucket() -> None:
            try:
                if versioned and await s3.versioning_status(self._dst, self.target.bucket) != "Disabled":
                    await self._list_versions(present)
                else:
                    async for o in s3.list_objects(self._dst, self.target.bucket):
                        present[o.key] = _Present(o.size, o.etag, None)
            except S3_ERRORS as exc:
                raise s3.translate(exc, "list the bucket to restore into", self.target) from exc

        async with task_group() as tg:
            tg.start_soon(pool)
            tg.start_soon(bucket)
        return pooled, present

    async def _list_versions(self, present: dict[str, _Present]) -> None:
        """Every version in the bucket (one request per 1,000); the current one of each key that is not deleted."""
        paginator = self._dst.get_paginator("list_object_versions")
        async for page in paginator.paginate(Bucket=self.target.bucket):
            for item in page.get("Versions", ()):
                version = str(item.get("VersionId") or "null")
                self._versions.add((item["Key"], version))
                if item.get("IsLatest"):
                    present[item["Key"]] = _Present(int(item["Size"]), str(item.get("ETag", "")).strip('"'), version)

    async def ask_objects(self, entries: list[InventoryEntry], verdicts: dict[str, bool | None]) -> None:
        """Settle the undecided verdicts with a HEAD each: the checksums a copy-back stored on the object."""
        limiter = anyio.CapacityLimiter(self.concurrency)

        async def one(entry: InventoryEntry) -> None:
            async with limiter:
                try:
                    answer = await self._dst.head_object(Bucket=self.target.bucket, Key=entry.key)
                except S3_ERRORS as exc:
                    raise s3.translate(exc, f"read {entry.key!r}", self.target) from exc
            stored = answer.get("Metadata", {})
            verdicts[entry.key] = entry.checksum is not None and stored.get(entry.checksum[0]) == entry.checksum[1]

        async with task_group() as tg:
            for entry in entries:
                if entry.key in verdicts and verdicts[entry.key] is None:
                    tg.start_soon(one, entry)

    def has_version(self, entry: InventoryEntry) -> bool:
        return entry.version_id is not None and (entry.key, entry.version_id) in self._versions

    async def copy_all(
        self, todo: list[InventoryEntry], progress: Progress, failures: list[Failure]
    ) -> list[InventoryEntry]:
        copied: list[InventoryEntry] = []
        reported = [time.monotonic()]
        send, receive = anyio.create_memory_object_stream[tuple[InventoryEntry, _Read | None]](self.concurrency)

        async def worker(queue: ObjectReceiveStream[tuple[InventoryEntry, _Read | None]]) -> None:
            async with queue:
                async for entry, read in queue:
                    try:
                        problem = await self._copy_one(entry, read)
                    except S3_ERRORS as exc:
                        raise self._stopped(exc, entry, len(copied), len(todo)) from exc
                    except StoreUnreachable as exc:
                        raise StoreUnreachable(f"{exc.message}; {len(copied)} of {len(todo)} attachments were "
                                               "restored before this", exc.hint) from exc  # fmt: skip
                    if problem is None:
                        copied.append(entry)
                    else:
                        failures.append(Failure(entry.key, entry.repo_key, problem))
                    if time.monotonic() - reported[0] >= _PROGRESS_EVERY:
                        reported[0] = time.monotonic()
                        await progress(len(copied), len(todo), f"restored {len(copied)} attachments")

        async with task_group() as tg:
            for _ in range(min(self.concurrency, max(1, len(todo)))):
                tg.start_soon(worker, receive.clone())
            receive.close()
            async with send:
                for start in range(0, len(todo), READ_AHEAD_BATCH):
                    batch = todo[start : start + READ_AHEAD_BATCH]
                    reads: list[_Read | None] = [None] * len(batch)
                    if any(self._read_ahead_worthy(e) for e in batch):  # none when every copy is server-side
                        reads = await anyio.to_thread.run_sync(self._read_ahead, batch)
                    for entry, read in zip(batch, reads, strict=True):
                        await send.send((entry, read))
        await progress(len(copied), len(todo), f"restored {len(copied)} attachments")
        return copied

    def _read_ahead(self, batch: list[InventoryEntry]) -> list[_Read | None]:
        """The small local pool files of `batch` read and hashed in one worker-thread call (runs in a thread):
        a hop to a thread per blob costs more than reading a 64 KiB file. None for the rest, read as they go."""
        reads: list[_Read | None] = []
        for entry in batch:
            local = self.repo.local_file(entry.repo_key) if self._read_ahead_worthy(entry) else None
            reads.append(_read_hashed(local, _needs_md5(entry)) if local is not None else None)
        return reads

    def _read_ahead_worthy(self, entry: InventoryEntry) -> bool:
        return entry.size <= min(READ_AHEAD_SIZE, SINGLE_PUT) and self._streams(entry)

    def _streams(self, entry: InventoryEntry) -> bool:
        """Does `entry` go up by PutObject from the pool's bytes (not server-side, not from a version)?"""
        return not self.has_version(entry) and not (self.server_side and (entry.checksum is None or entry.md5))

    def _stopped(self, exc: Exception, entry: InventoryEntry, done: int, total: int) -> RecoveryError:
        error = s3.translate(exc, f"restore {entry.key!r}", self.target)
        return type(error)(f"{error.message}; {done} of {total} attachments were restored before this",
                           f"{error.hint}; then run the restore again: what is already there is skipped")  # fmt: skip

    async def _copy_one(self, entry: InventoryEntry, read: _Read | None) -> str | None:
        """Copy one blob (`read`: its bytes and hashes, read ahead); None when it landed as recorded, else why it
        was refused (nothing left behind)."""
        if self.has_version(entry):
            return await self._from_version(entry)
        if not self._streams(entry):
            return await self._server_side(entry)
        return await self._stream(entry, read)

    async def _server_side(self, entry: InventoryEntry) -> str | None:
        where = self.repo.s3_object(entry.repo_key)
        assert where is not None  # what server_side means: the pool is in S3, on the target's endpoint
        location, source_key = where
        if self._copier is not None:
            etag = await self._copier.copy(s3.CopySource(location.bucket, source_key), self.target.bucket, entry.key)
        else:
            answer = await self._dst.copy_object(Bucket=self.target.bucket, Key=entry.key,
                                                 CopySource={"Bucket": location.bucket, "Key": source_key})  # fmt: skip
            etag = str(answer.get("CopyObjectResult", {}).get("ETag", "")).strip('"') or None
        return await self._check_copy(entry, etag)

    async def _check_copy(self, entry: InventoryEntry, etag: str | None) -> str | None:
        """The object a server-side copy just wrote, against the recorded MD5; deleted when it differs."""
        expected = entry.md5 or md5_of_etag(entry.etag)
        if expected is None:
            return None  # an older inventory: its size was checked against the pool listing
        actual = md5_of_etag(etag or "")
        if actual is None:  # not an MD5 (encrypted at rest, or an unusual server): read it back
            actual = await self._hash_target(entry.key)
        if actual != expected:
            await self._dst.delete_object(Bucket=self.target.bucket, Key=entry.key)
            return f"content differs from the backup (md5 {actual[:12]}..., recorded {expected[:12]}...)"
        return None

    async def _from_version(self, entry: InventoryEntry) -> str | None:
        """The recorded version, copied onto the current object inside the bucket: the server's own bytes."""
        assert entry.version_id is not None
        bucket = self.target.bucket
        if self._copier is not None:
            etag = await self._copier.copy(s3.CopySource(bucket, entry.key, entry.version_id), bucket, entry.key)
        else:
            answer = await self._dst.copy_object(Bucket=bucket, Key=entry.key, CopySource={
                "Bucket": bucket, "Key": entry.key, "VersionId": entry.version_id})  # fmt: skip
            etag = str(answer.get("CopyObjectResult", {}).get("ETag", "")).strip('"') or None
        return await self._check_copy(entry, etag)

    async def _hash_target(self, key: str) -> str:
        answer = await self._dst.get_object(Bucket=self.target.bucket, Key=key)
        digest = hashlib.md5(usedforsecurity=False)
        async with answer["Body"] as body:
            async for chunk in body.iter_chunks(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    async def _stream(self, entry: InventoryEntry, read: _Read | None) -> str | None:
        """The pool's blob, checked against the recorded checksum before it goes up (`read`: read ahead)."""
        if entry.size > SINGLE_PUT:
            return await self._stream_parts(entry)
        if read is None:
            read = await self._read_whole(entry)
        data, sha256, md5 = read
        problem = _compare(entry, len(data), sha256, md5)
        if problem is not None:
            return problem
        # The checksum just verified goes with the request, so the server too refuses other bytes: as
        # x-amz-checksum-sha256, or as Content-MD5 where no SHA-256 was recorded.
        if self._copier is not None:
            await self._copier.put(self.target.bucket, entry.key, data, sha256=sha256, md5=md5)
        else:
            sums = {"ContentMD5": s3.base64_digest(md5)} if md5 else {}
            await self._dst.put_object(Bucket=self.target.bucket, Key=entry.key, Body=data,
                                       ChecksumSHA256=s3.base64_digest(sha256), **sums)  # fmt: skip
        return None

    async def _read_whole(self, entry: InventoryEntry) -> _Read:
        """A blob of up to SINGLE_PUT bytes, read and hashed: from its local file in one worker-thread call, else
        (or when that file cannot be read: the stream then names the failure) from the repository's stream."""
        local = self.repo.local_file(entry.repo_key)
        read = await anyio.to_thread.run_sync(_read_hashed, local, _needs_md5(entry)) if local is not None else None
        if read is not None:
            return read
        whole = bytearray()
        async for chunk in self.repo.get_stream(entry.repo_key):
            whole += chunk
        return _hashed(bytes(whole), _needs_md5(entry))

    async def _stream_parts(self, entry: InventoryEntry) -> str | None:
        sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False) if _needs_md5(entry) else None
        # The recorded checksums go with the object: its multipart ETag is no MD5, and a re-run asks them instead.
        # Completed only once the bytes match them, so they never describe other bytes.
        stored = {name: value for name, value in (("sha256", entry.sha256), ("md5", entry.md5)) if value}
        upload = await self._dst.create_multipart_upload(Bucket=self.target.bucket, Key=entry.key, Metadata=stored)
        upload_id, size, pending = upload["UploadId"], 0, bytearray()
        parts: list[dict[str, Any]] = []
        try:
            async for chunk in self.repo.get_stream(entry.repo_key):
                sha256.update(chunk)
                if md5 is not None:
                    md5.update(chunk)
                size += len(chunk)
                pending += chunk
                if len(pending) >= PART_SIZE:
                    parts.append(await self._part(entry.key, upload_id, len(parts) + 1, bytes(pending)))
                    pending.clear()
            problem = _compare(entry, size, sha256.hexdigest(), md5.hexdigest() if md5 is not None else None)
            if problem is not None:
                raise _Refused(problem)
            if pending or not parts:
                parts.append(await self._part(entry.key, upload_id, len(parts) + 1, bytes(pending)))
            await self._dst.complete_multipart_upload(Bucket=self.target.bucket, Key=entry.key, UploadId=upload_id,
                                                      MultipartUpload={"Parts": parts})  # fmt: skip
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                try:
                    await self._dst.abort_multipart_upload(Bucket=self.target.bucket, Key=entry.key,
                                                           UploadId=upload_id)  # fmt: skip
                except S3_ERRORS:
                    pass  # the original failure is the one to report; a lifecycle rule reaps leftovers
            if isinstance(exc, _Refused):
                return exc.problem
            raise
        return None

    async def _part(self, key: str, upload_id: str, number: int, body: bytes) -> dict[str, Any]:
        answer = await self._dst.upload_part(Bucket=self.target.bucket, Key=key, UploadId=upload_id,
                                             PartNumber=number, Body=body)  # fmt: skip
        return {"ETag": answer["ETag"], "PartNumber": number}


_Read = tuple[bytes, str, str | None]  # a blob's bytes, its SHA-256 and, where `_needs_md5`, its MD5 (hex)


def _needs_md5(entry: InventoryEntry) -> bool:
    """An entry with no SHA-256 recorded is checked by its MD5 (and sent with it); with one, MD5 is not needed."""
    return entry.sha256 is None


def _hashed(data: bytes, md5: bool) -> _Read:
    return data, hashlib.sha256(data).hexdigest(), hashlib.md5(data, usedforsecurity=False).hexdigest() if md5 else None


def _read_hashed(path: Path, md5: bool) -> _Read | None:
    """A small pool file read and hashed in the calling (worker) thread: a copy-back of thousands of small
    blobs from a local repository spends more on hops to threads than on reading. None when it cannot
    be read: the caller's stream then raises the repository's own error."""
    try:
        with path.open("rb") as handle:
            # One past its size (and past the limit): a grown file is refused by its size. Not a plain read of
            # SINGLE_PUT + 1, which allocates (and faults in) 8 MiB to return 64 KiB: 50 us a blob instead of 8.
            data = handle.read(min(os.fstat(handle.fileno()).st_size, SINGLE_PUT) + 1)
    except OSError:
        return None
    return _hashed(data, md5)


class _Refused(Exception):
    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _compare(entry: InventoryEntry, size: int, sha256: str, md5: str | None) -> str | None:
    if size != entry.size:
        return f"{size} bytes in the pool, {entry.size} recorded; not restored"
    if entry.sha256 is not None and sha256 != entry.sha256:
        return f"content differs from the backup (sha256 {sha256[:12]}..., recorded {entry.sha256[:12]}...)"
    if entry.sha256 is None and entry.md5 is not None and md5 != entry.md5:
        return f"content differs from the backup (md5 {(md5 or '')[:12]}..., recorded {entry.md5[:12]}...)"
    return None
