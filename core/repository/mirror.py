"""Incremental mirror of Engram's S3 attachments bucket into the backup repository.

Blobs go into a pool shared by all recovery points, addressed by the source key
and ETag:

    attachments/pool/<h[:2]>/<h>/<etag>     h = sha256 of the source key

so an unchanged object is copied once in its life, a changed object gets a new
entry beside the old one, and an object deleted at the source stays in the pool
for as long as a kept inventory names it. Each recovery point records its exact
inventory (JSON lines: key, size, etag, version_id, repo_key, and the blob's
content checksum: `sha256` taken from the bytes as they were streamed in, or
`md5`, the source's own ETag where it is one, for blobs copied server-side;
inventories written before checksums have neither and are checked by size only)
under its own folder (core/repository/pool.py, where `collect_garbage`, retention's tool,
removes pool entries no kept inventory references). The mirror itself never deletes anything.

What to copy is decided from listings alone (ListObjectsV2 or ListObjectVersions
on the source, a listing of the pool on the destination, both 1,000 keys a
request and run concurrently): no HEAD per object. A pool entry whose size is
right is still copied again when its content is suspect: an S3 pool entry whose
ETag (an MD5) differs from the source's, a local file modified after the newest
backup finished, or a blob a later verification (backup_status deep) found bad. When the repository is an
S3 bucket on the same endpoint with the same credentials, objects are copied
server-side (CopyObject; UploadPartCopy above 5 GiB) and never pass through this
process; otherwise each object is streamed GET -> repository in 1 MiB chunks.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anyio
from anyio.abc import ObjectReceiveStream
from botocore.exceptions import ResponseStreamingError

from ..errors import IntegrityError, RecoveryError
from ..progress import Progress
from ..stores import s3
from ..stores.s3 import S3_ERRORS, S3Location, md5_of_etag
from ..taskgroups import task_group
from .base import CopyTarget, Repository
from .layout import INVENTORY_NAME, POOL, inventory_key, pool_key
from .pool import InventoryEntry, read_inventory
from .records import scan

STREAM_CHUNK = 1 << 20
# Streamed objects larger than one chunk may be buffered by the repository (an S3
# repository holds up to three 8 MiB parts per upload): only this many at a time,
# so memory stays bounded whatever the worker count and the object sizes.
LARGE_STREAMS = 4
# One CopyObject may copy at most 5 GiB; rclone switches to multipart a little below.
COPY_CUTOFF = 4_995 * (1 << 20)
COPY_PART = 512 * (1 << 20)
_PROGRESS_EVERY = 0.5  # seconds: enough for a progress bar, few enough for an MCP client


@dataclass(frozen=True)
class SourceObject:
    key: str
    size: int
    etag: str
    version_id: str | None = None


@dataclass(frozen=True)
class Copied:
    """What one copy stored: the object as it was copied, and the checksums known of the stored bytes."""

    obj: SourceObject
    sha256: str | None = None
    md5: str | None = None


@dataclass(frozen=True)
class Pooled:
    """A pool entry as its listing shows it."""

    size: int
    etag: str | None = None
    modified: float | None = None  # epoch seconds


@dataclass(frozen=True)
class Known:
    """What earlier runs and verifications tell about the pool."""

    since: float | None = None  # when the newest complete backup finished (epoch seconds)
    checksums: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # repo_key -> (sha256, md5)
    suspects: frozenset[str] = frozenset()  # pool keys a verification found bad since then

    def stale(self, obj: SourceObject, repo_key: str, pooled: Pooled | None) -> bool:
        """Must `obj` (stored at `repo_key`) be copied (again)? Missing, wrong size, or content no longer trusted."""
        if pooled is None or pooled.size != obj.size:
            return True
        if repo_key in self.suspects:
            return True
        expected = md5_of_etag(obj.etag)
        if expected and pooled.etag and md5_of_etag(pooled.etag) and pooled.etag != expected:
            return True  # an S3 pool entry rewritten with other bytes of the same size
        # A local blob rewritten after the newest backup finished (no run writes it after that).
        return self.since is not None and pooled.modified is not None and pooled.modified > self.since


async def known_pool(repo: Repository) -> Known:
    """The newest backup's inventory checksums, its finish time, and the blobs later verifications found bad."""
    state = await scan(repo)
    newest = state.newest
    if newest is None:
        return Known()
    start = newest.started_at or newest.finished_at
    suspects = frozenset(b for v in state.verifications if v.at >= start for b in v.bad_blobs)
    checksums: dict[str, tuple[str | None, str | None]] = {}
    key = inventory_key(newest.backup_id)
    if await repo.exists(key):
        async for entry in read_inventory(repo, key):
            checksums[entry.repo_key] = (entry.sha256, entry.md5)
    return Known(since=newest.finished_at.timestamp(), checksums=checksums, suspects=suspects)


@dataclass(frozen=True)
class MirrorReport:
    objects: int
    bytes: int
    copied_objects: int
    copied_bytes: int
    skipped_objects: int
    inventory_name: str | None  # None for a dry run, which writes nothing
    inventory_sha256: str | None
    inventory_size: int
    versioned: bool
    seconds: float
    server_side_copy: bool
    vanished_objects: int = 0  # listed, then deleted at the source before they could be copied
    dry_run: bool = False
    keys: frozenset[str] = frozenset()  # the source keys this recovery point holds
    recopied_objects: int = 0  # in the pool at the right size, copied again because their content was suspect


@dataclass(frozen=True)
class MirrorOptions:
    """How a mirror runs: a dry run only counts what it would copy; `concurrency` S3 workers copy; `prefixes`:
    only the objects under these key prefixes (None: the whole bucket); `inventory`: the repository key to write
    the inventory at (None: this backup's, `inventory_key(backup_id)`)."""

    dry_run: bool = False
    concurrency: int = 16
    prefixes: Sequence[str] | None = None
    inventory: str | None = None


DEFAULT_OPTIONS = MirrorOptions()


async def mirror_attachments(
    source: S3Location, repo: Repository, backup_id: str, progress: Progress, options: MirrorOptions = DEFAULT_OPTIONS
) -> MirrorReport:
    """Copy new and changed objects of `source` into the pool and write this backup's inventory (see MirrorOptions
    for a dry run, the worker count, a mirror of only some prefixes and another inventory key)."""
    dry_run, concurrency, inventory = options.dry_run, options.concurrency, options.inventory
    started = time.monotonic()
    target = repo.copy_target(source)
    server_side = target is not None
    known = await known_pool(repo)
    async with _Session(source, target, concurrency) as session:
        versioned, objects, present = await session.survey(repo, options.prefixes)
        todo: list[SourceObject] = []
        recopied = 0
        for o in objects:
            repo_key = pool_key(o.key, o.etag)
            pooled = present.get(repo_key)
            if known.stale(o, repo_key, pooled):
                todo.append(o)
                recopied += pooled is not None
        total_bytes = sum(o.size for o in objects)
        todo_bytes = sum(o.size for o in todo)
        if dry_run:
            return MirrorReport(
                objects=len(objects), bytes=total_bytes, copied_objects=len(todo), copied_bytes=todo_bytes,
                skipped_objects=len(objects) - len(todo), inventory_name=None, inventory_sha256=None,
                inventory_size=0, versioned=versioned, seconds=time.monotonic() - started,
                server_side_copy=server_side, dry_run=True, keys=frozenset(o.key for o in objects),
                recopied_objects=recopied,
            )  # fmt: skip
        await progress(0, len(todo), f"mirroring {len(todo)} of {len(objects)} attachments ({todo_bytes} bytes)")
        copied = await session.copy_all(repo, todo, progress, concurrency)
    entries: list[InventoryEntry] = []
    vanished = 0
    for obj in objects:
        done = copied.get(obj.key, Copied(obj))
        if done is None:
            vanished += 1
            continue
        current, repo_key = done.obj, pool_key(done.obj.key, done.obj.etag)
        sha256, md5 = (done.sha256, done.md5) if obj.key in copied else known.checksums.get(repo_key, (None, None))
        entries.append(InventoryEntry(current.key, current.size, current.etag, current.version_id, repo_key,
                                      sha256, md5 or md5_of_etag(current.etag)))  # fmt: skip
    inventory_size, inventory_sha256 = await repo.put_stream(inventory or inventory_key(backup_id), _lines(entries))
    copied_now = [c.obj for c in copied.values() if c is not None]
    return MirrorReport(
        objects=len(entries), bytes=sum(e.size for e in entries), copied_objects=len(copied_now),
        copied_bytes=sum(c.size for c in copied_now), skipped_objects=len(objects) - len(todo),
        inventory_name=INVENTORY_NAME, inventory_sha256=inventory_sha256, inventory_size=inventory_size,
        versioned=versioned, seconds=time.monotonic() - started, server_side_copy=server_side,
        vanished_objects=vanished, keys=frozenset(e.key for e in entries), recopied_objects=recopied,
    )  # fmt: skip


async def _lines(entries: list[InventoryEntry]) -> AsyncIterator[bytes]:
    for start in range(0, len(entries), 1000):
        yield "".join(f"{entry.to_json()}\n" for entry in entries[start : start + 1000]).encode("utf-8")


class _Session:
    """The S3 clients of one mirror run, opened once and shared by every worker."""

    def __init__(self, source: S3Location, target: CopyTarget | None, concurrency: int) -> None:
        self.source = source
        self.target = target
        self.concurrency = concurrency
        self._large = anyio.CapacityLimiter(LARGE_STREAMS)
        self._src: Any = None
        self._dst: Any = None
        self._copier: s3.Copier | None = None
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> _Session:
        self._src = await self._stack.enter_async_context(s3.bulk_client(self.source, self.concurrency))
        if self.target is not None:
            # Our own client for the destination, with a pool as large as the worker count;
            # server-side copies and the pool listing both go to the destination endpoint.
            destination = self.target.location
            self._dst = await self._stack.enter_async_context(s3.bulk_client(destination, self.concurrency))
            if destination.endpoint:
                self._copier = await self._stack.enter_async_context(s3.Copier(destination, self.concurrency))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def survey(
        self, repo: Repository, prefixes: Sequence[str] | None = None
    ) -> tuple[bool, list[SourceObject], dict[str, Pooled]]:
        """List the source bucket (or only `prefixes` of it) and the pool at the same time."""
        objects: list[SourceObject] = []
        present: dict[str, Pooled] = {}
        versioned = False

        async def list_source() -> None:
            nonlocal versioned
            versioned = await self._versioned()
            src, bucket = self._src, self.source.bucket
            try:
                for prefix in ("",) if prefixes is None else prefixes:
                    listing = (s3.list_latest_versions(src, bucket, prefix) if versioned
                               else s3.list_objects(src, bucket, prefix))  # fmt: skip
                    objects.extend(
                        [SourceObject(o.key, o.size, o.etag, getattr(o, "version_id", None)) async for o in listing]
                    )
            except S3_ERRORS as exc:
                raise s3.translate(exc, "list the attachments", self.source) from exc

        async def list_pool() -> None:
            if self.target is None:
                present.update({key: Pooled(size, modified=at) async for key, size, at in repo.list_modified(POOL)})
                return
            strip = len(self.target.prefix)
            try:
                async for item in s3.list_objects(self._dst, self.target.bucket, self.target.prefix + POOL):
                    present[item.key[strip:]] = Pooled(item.size, etag=item.etag)
            except S3_ERRORS as exc:
                raise s3.translate(exc, "list the backup repository", self.target.location) from exc

        async with task_group() as tg:
            tg.start_soon(list_source)
            tg.start_soon(list_pool)
        return versioned, objects, present

    async def _versioned(self) -> bool:
        try:
            status = await s3.versioning_status(self._src, self.source.bucket)
        except S3_ERRORS as exc:
            if s3.error_code(exc) == "AccessDenied":
                # A key scoped to objects may not read bucket settings; the listing still works.
                return False
            raise s3.translate(exc, "read its versioning status", self.source) from exc
        # A suspended bucket still holds versioned objects: keep recording their ids.
        return status in ("Enabled", "Suspended")

    async def copy_all(
        self, repo: Repository, todo: list[SourceObject], progress: Progress, concurrency: int
    ) -> dict[str, Copied | None]:
        """Copy `todo` with `concurrency` workers; the result maps each key to what was copied (None: vanished)."""
        done: dict[str, Copied | None] = {}
        counters = {"objects": 0, "bytes": 0, "reported": time.monotonic()}
        send, receive = anyio.create_memory_object_stream[SourceObject](max(1, concurrency))

        async def worker(queue: ObjectReceiveStream[SourceObject]) -> None:
            async with queue:
                async for obj in queue:
                    result = await self._copy_one(repo, obj)
                    done[obj.key] = result
                    counters["objects"] += 1
                    counters["bytes"] += result.obj.size if result else 0
                    now = time.monotonic()
                    if now - counters["reported"] >= _PROGRESS_EVERY:
                        counters["reported"] = now
                        await progress(counters["objects"], len(todo), f"copied {counters['bytes']} bytes")

        async with task_group() as tg:
            for _ in range(max(1, min(concurrency, len(todo)))):
                tg.start_soon(worker, receive.clone())
            receive.close()
            async with send:
                for obj in todo:
                    await send.send(obj)
        await progress(len(todo), len(todo), f"copied {counters['bytes']} bytes")
        return done

    async def _copy_one(self, repo: Repository, obj: SourceObject) -> Copied | None:
        """Copy one object; re-read its listing entry once per change that races us."""
        for _attempt in range(3):
            try:
                if self._dst is not None:
                    await self._server_side(obj)
                    # The bytes never pass through here: the server's own checksum (an MD5 ETag) stands for them.
                    return Copied(obj, md5=md5_of_etag(obj.etag))
                async with self._large if obj.size > STREAM_CHUNK else contextlib.nullcontext():
                    sha256, md5 = await self._stream(repo, obj)
                return Copied(obj, sha256=sha256, md5=md5)
            except S3_ERRORS as exc:
                code = s3.error_code(exc)
                if code in s3.MISSING or code == "NoSuchVersion":
                    return None  # deleted since it was listed: not part of this recovery point
                if code not in ("PreconditionFailed", "412") or obj.version_id is not None:
                    raise s3.translate(exc, f"copy {obj.key!r}", self._blame(exc)) from exc
            # Overwritten since it was listed: take the current object, not a mix of both.
            fresh = await self._head(obj.key)
            if fresh is None:
                return None
            obj = fresh
        raise RecoveryError(
            f"the attachment {obj.key!r} kept changing while it was being copied",
            "run the backup again when Engram is quieter",
        )

    def _blame(self, exc: Exception) -> S3Location:
        # A server-side copy can fail on either bucket; S3 names the missing one only in the message.
        if self.target is None or (self.source.bucket in str(exc) and self.target.bucket not in str(exc)):
            return self.source
        return self.target.location

    async def _head(self, key: str) -> SourceObject | None:
        try:
            info = await s3.head(self._src, self.source.bucket, key)
        except S3_ERRORS as exc:
            raise s3.translate(exc, f"read {key!r}", self.source) from exc
        return None if info is None else SourceObject(info.key, info.size, info.etag)

    def _source_ref(self, obj: SourceObject) -> dict[str, str]:
        ref = {"Bucket": self.source.bucket, "Key": obj.key}
        if obj.version_id is not None:
            ref["VersionId"] = obj.version_id
        return ref

    def _precondition(self, obj: SourceObject, name: str) -> dict[str, str]:
        # A version id already pins the bytes; otherwise insist on the ETag we listed.
        return {} if obj.version_id is not None or not obj.etag else {name: f'"{obj.etag}"'}

    async def _server_side(self, obj: SourceObject) -> None:
        assert self.target is not None
        bucket, key = self.target.bucket, self.target.s3_key(pool_key(obj.key, obj.etag))
        # What CopyObject is given; UploadPartCopy takes the same, part by part.
        request = {"Bucket": bucket, "Key": key, "CopySource": self._source_ref(obj),
                   **self._precondition(obj, "CopySourceIfMatch")}  # fmt: skip
        if obj.size > COPY_CUTOFF:
            await s3.multipart_copy(self._dst, request, obj.size, COPY_PART)
        elif self._copier is not None:
            if_match = obj.etag if obj.version_id is None and obj.etag else None
            await self._copier.copy(s3.CopySource(self.source.bucket, obj.key, obj.version_id, if_match), bucket, key)
        else:
            await self._dst.copy_object(**request)

    async def _stream(self, repo: Repository, obj: SourceObject) -> tuple[str, str]:
        """Stream one object into the pool; return the SHA-256 and MD5 of the bytes stored (taken on the way)."""
        extra = self._precondition(obj, "IfMatch")
        if obj.version_id is not None:
            extra["VersionId"] = obj.version_id
        answer = await self._src.get_object(Bucket=self.source.bucket, Key=obj.key, **extra)
        body = answer["Body"]
        # A single-part ETag is the MD5 of the bytes (unless SSE-KMS or SSE-C encrypted them).
        md5_etag = len(obj.etag) == 32 and answer.get("ServerSideEncryption") != "aws:kms"
        md5_etag = md5_etag and not answer.get("SSECustomerAlgorithm")

        md5 = hashlib.md5(usedforsecurity=False)

        async def chunks() -> AsyncIterator[bytes]:
            size = 0
            try:
                async for chunk in body.iter_chunks(STREAM_CHUNK):
                    md5.update(chunk)
                    size += len(chunk)
                    yield chunk
            except aiohttp.ClientError as exc:
                # A body cut off mid-way, which aiobotocore passes through unwrapped. Not an OSError:
                # the repository would take that for its own failure.
                raise ResponseStreamingError(error=exc) from exc
            # Checked before the repository commits the entry, which this failure aborts: a damaged
            # transfer never sits in the pool, not even for a moment, under a name that says complete.
            if size != obj.size or (md5_etag and md5.hexdigest() != obj.etag):
                raise IntegrityError(
                    f"the attachment {obj.key!r} arrived damaged ({size} of {obj.size} bytes, or an MD5 "
                    "that does not match its ETag); nothing was stored for it",
                    "run the backup again; if it recurs, check the S3 server, its disks and the network",
                )

        try:
            # The repository hashes what it stores (SHA-256) as it writes: the content checksum costs no extra read.
            _size, sha256 = await repo.put_stream(pool_key(obj.key, obj.etag), chunks())
        finally:
            body.close()
        return sha256, md5.hexdigest()
