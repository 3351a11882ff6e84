"""A backup repository in an S3-compatible bucket (s3://bucket/prefix): SeaweedFS, MinIO, AWS S3.

Atomicity comes from S3 itself: an object appears under its key only when its
PutObject or its multipart upload's CompleteMultipartUpload succeeds, so an
interrupted upload is aborted (or, if the process dies, left as an invisible
incomplete upload that the bucket's lifecycle rules or the next sweep remove).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import secrets
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import anyio

from ..errors import ConfigurationError, StoreUnreachable
from ..settings import Settings
from ..stores import s3
from ..stores.s3 import S3_ERRORS, S3Location
from ..taskgroups import task_group
from .base import READ_CHUNK, CopyTarget, Repository, StreamCheck
from .layout import check_key

# S3 wants parts of at least 5 MiB (except the last); 8 MiB keeps memory low and requests few.
PART_SIZE = 8 << 20
# Parts in flight at once: upload overlaps with producing the next part, memory stays ~3 parts.
PARTS_IN_FLIGHT = 2





@dataclass(frozen=True)
class _Upload:
    """One multipart upload, as its part uploads share it: the parts land in `parts` by number, and each
    releases `limiter` (the bound on parts in flight) when it is done."""

    key: str
    upload_id: str
    parts: list[dict[str, Any]]
    limiter: anyio.Semaphore

class S3Repository(Repository):
    def __init__(self, location: S3Location, prefix: str) -> None:
        self.s3_location = location
        self.bucket = location.bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.location = f"s3://{location.bucket}/{self.prefix}" + (
            f" at {location.endpoint}" if location.endpoint else ""
        )
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Repository:
        parts = urlsplit(settings.repository)
        if not parts.netloc:
            raise ConfigurationError(
                f"ENGRAM_RECOVERY_REPOSITORY={settings.repository!r} names no bucket",
                "write it as s3://bucket or s3://bucket/prefix",
            )
        secret = settings.repository_secret_access_key
        assert settings.repository_access_key_id and secret  # enforced by Settings
        location = S3Location(
            endpoint=settings.repository_endpoint,
            access_key_id=settings.repository_access_key_id,
            secret_access_key=secret.get_secret_value(),
            region=settings.repository_region,
            bucket=parts.netloc,
        )
        return cls(location, parts.path)

    def copy_target(self, source: S3Location) -> CopyTarget | None:
        if not s3.same_account(source, self.s3_location):
            return None
        return CopyTarget(self.s3_location, self.bucket, self.prefix)

    def s3_endpoint(self) -> S3Location | None:
        return self.s3_location

    def s3_object(self, key: str) -> tuple[S3Location, str] | None:
        return self.s3_location, self.s3_key(key)

    def s3_key(self, key: str) -> str:
        """The object key in the bucket for a repository key (for server-side CopyObject)."""
        return self.prefix + check_key(key)

    async def __aenter__(self) -> Self:
        self._stack = contextlib.AsyncExitStack()
        try:
            self._client = await self._stack.enter_async_context(s3.client(self.s3_location))
        except S3_ERRORS as exc:
            await self._stack.aclose()
            raise s3.translate(exc, "connect", self.s3_location) from exc
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._stack is not None:
            await self._stack.aclose()
        self._stack = None
        self._client = None

    @property
    def client(self) -> Any:
        if self._client is None:
            raise RuntimeError("use the S3 repository inside `async with`")
        return self._client

    def _fail(self, exc: Exception, what: str) -> Exception:
        return s3.translate(exc, what, self.s3_location)

    async def check_writable(self) -> None:
        probe = f".write-check-{secrets.token_hex(4)}"
        try:
            await self.client.head_bucket(Bucket=self.bucket)
            await self.client.put_object(Bucket=self.bucket, Key=self.s3_key(probe), Body=b"ok")
            await self.client.delete_object(Bucket=self.bucket, Key=self.s3_key(probe))
        except S3_ERRORS as exc:
            raise self._fail(exc, "write to the backup repository") from exc

    async def put_stream(
        self, key: str, chunks: AsyncIterator[bytes], *, read_back: bool = False, check: StreamCheck | None = None
    ) -> tuple[int, str]:
        object_key = self.s3_key(key)
        digest = hashlib.sha256()
        size = 0
        buffer = bytearray()
        upload_id: str | None = None
        upload: _Upload | None = None
        parts: list[dict[str, Any]] = []
        try:
            async with task_group() as tg:
                limiter = anyio.Semaphore(PARTS_IN_FLIGHT)
                async for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    buffer += chunk
                    if len(buffer) >= PART_SIZE:
                        if upload is None:
                            answer = await self.client.create_multipart_upload(Bucket=self.bucket, Key=object_key)
                            upload_id = str(answer["UploadId"])
                            upload = _Upload(object_key, upload_id, parts, limiter)
                        part = bytes(buffer)
                        buffer.clear()
                        await limiter.acquire()  # back-pressure: at most PARTS_IN_FLIGHT parts buffered
                        parts.append({})
                        tg.start_soon(self._upload_part, upload, len(parts), part)
                if upload is not None and buffer:
                    await limiter.acquire()
                    parts.append({})
                    tg.start_soon(self._upload_part, upload, len(parts), bytes(buffer))
            if upload_id is None:
                await self.client.put_object(Bucket=self.bucket, Key=object_key, Body=bytes(buffer))
            else:
                await self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=object_key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
                upload_id = None
        except S3_ERRORS as exc:
            raise self._fail(exc, f"write {key}") from exc
        finally:
            if upload_id is not None:
                # Shielded so a cancelled run still aborts: the parts never become a visible object.
                with anyio.CancelScope(shield=True), contextlib.suppress(*S3_ERRORS):
                    await self.client.abort_multipart_upload(Bucket=self.bucket, Key=object_key, UploadId=upload_id)
        return size, digest.hexdigest()

    async def _upload_part(self, upload: _Upload, number: int, data: bytes) -> None:
        try:
            answer = await self.client.upload_part(
                Bucket=self.bucket, Key=upload.key, UploadId=upload.upload_id, PartNumber=number, Body=data
            )
            upload.parts[number - 1] = {"PartNumber": number, "ETag": answer["ETag"]}
        finally:
            upload.limiter.release()

    async def get_stream(self, key: str, chunk_size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        try:
            answer = await self.client.get_object(Bucket=self.bucket, Key=self.s3_key(key))
        except S3_ERRORS as exc:
            if s3.error_code(exc) in s3.MISSING:
                raise StoreUnreachable(
                    f"{key} is missing from the backup repository {self.location}",
                    "the backup is damaged or was pruned: choose another recovery point",
                ) from exc
            raise self._fail(exc, f"read {key}") from exc
        body = answer["Body"]
        try:
            async for chunk in body.iter_chunks(chunk_size):
                yield chunk
        except S3_ERRORS as exc:
            raise self._fail(exc, f"read {key}") from exc
        finally:
            body.close()

    async def exists(self, key: str) -> bool:
        try:
            await self.client.head_object(Bucket=self.bucket, Key=self.s3_key(key))
        except S3_ERRORS as exc:
            if s3.error_code(exc) in s3.MISSING:
                return False
            raise self._fail(exc, f"look for {key}") from exc
        return True

    async def list(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        try:
            async for item in s3.list_objects(self.client, self.bucket, self.prefix + prefix):
                yield item.key[len(self.prefix):], item.size
        except S3_ERRORS as exc:
            raise self._fail(exc, "list the backup repository") from exc

    async def delete(self, keys: Iterable[str]) -> int:
        wanted = [self.s3_key(k) for k in keys]
        try:
            for start in range(0, len(wanted), 1000):
                batch = wanted[start : start + 1000]
                answer = await self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
                if answer.get("Errors"):
                    first = answer["Errors"][0]
                    raise StoreUnreachable(
                        f"S3 refused to delete {first.get('Key')}: {first.get('Code')}",
                        "check that the repository credentials may delete objects",
                    )
        except S3_ERRORS as exc:
            raise self._fail(exc, "delete old backups") from exc
        return len(wanted)

    async def sweep_temporary(self) -> builtins.list[str]:
        """Abort multipart uploads an interrupted run left open under this prefix."""
        swept: builtins.list[str] = []
        try:
            answer = await self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix)
            for upload in answer.get("Uploads", ()):
                await self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                swept.append(str(upload["Key"])[len(self.prefix):])
        except S3_ERRORS as exc:
            raise self._fail(exc, "clean up interrupted uploads") from exc
        return swept
