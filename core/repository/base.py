"""The backup repository: where recovery points live.

Its keys (a local directory, or the same keys under an s3://bucket/prefix) come from layout.py.

Every write is atomic: a local file is written under a temporary name in the
same directory, fsynced and renamed; an S3 object is one PutObject or a
multipart upload completed only after its last part. A reader therefore never
sees a half-written object under its final key.

Use a repository as an async context manager (`async with open_repository(s) as
repo:`), which opens and closes the S3 client once for all operations.
"""

from __future__ import annotations

import builtins
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

from .layout import check_key

if TYPE_CHECKING:
    # Only a type here: importing the S3 store loads aioboto3, which a local repository never needs.
    from ..stores.s3 import S3Location

READ_CHUNK = 1 << 20
# Threads that re-read one local file's windows at once: the cores, up to 4 (reading is from the page cache).
VERIFY_THREADS = max(1, min(4, os.cpu_count() or 1))


class StreamCheck(Protocol):
    """Proves that bytes re-read in order are the ones written, more cheaply than hashing them again.

    A backup's encrypted dump authenticates itself: every AES-GCM record carries a tag over
    its bytes, its index and the file's header, so re-reading the file through the
    decryptor proves each byte as written (a forged or damaged record fails) at a quarter of
    SHA-256's cost (docs/benchmarks.md, run_backup). `update` and `finish` raise
    IntegrityError on a mismatch.
    """

    def update(self, data: memoryview) -> None: ...

    def finish(self) -> None: ...


@dataclass(frozen=True)
class CopyTarget:
    """Where a server-side copy from another bucket lands: this repository's bucket and key prefix."""

    location: S3Location
    bucket: str
    prefix: str

    def s3_key(self, key: str) -> str:
        """The object key in the bucket for a repository key (for server-side CopyObject)."""
        return self.prefix + check_key(key)


def mismatch(actual_size: int, actual_sha256: str, size: int, sha256: str) -> str | None:
    """The one wording of an artifact that does not read back as recorded (None when it does): what was stored
    against what the manifest recorded. Callers add what it means for them (a backup's storage, a restore's choice)."""
    if (actual_size, actual_sha256.lower()) == (size, sha256.lower()):
        return None
    return (f"stored {actual_size} bytes with SHA-256 {actual_sha256[:16]}..., recorded {size} bytes with "
            f"{sha256[:16]}...")  # fmt: skip


class Repository(ABC):
    """What every repository can do. Callers ask it (the capabilities below), never switch on its type."""

    """The primitives run_backup, the attachments mirror and the restore tools share."""

    location: str

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def unusable(self) -> str | None:
        """Why this repository cannot be read at all, known before connecting (None: nothing known)."""
        return None

    def local_file(self, key: str) -> Path | None:
        """The file holding `key`, for readers faster on a local file than on a stream (None: not a file)."""
        return None

    def copy_target(self, source: S3Location) -> CopyTarget | None:
        """Where objects of `source` can be copied server-side into this repository (None: they cannot)."""
        return None

    def s3_endpoint(self) -> S3Location | None:
        """The S3 endpoint and bucket holding this repository (None: the repository is not in S3)."""
        return None

    def s3_object(self, key: str) -> tuple[S3Location, str] | None:
        """The endpoint and object key holding `key`, for a server-side copy out of the repository
        (None: the repository is not in S3)."""
        return None

    @asynccontextmanager
    async def lock(self, busy_hint: str) -> AsyncIterator[None]:
        """Held while a backup writes and prunes: keeps a second writer of the same storage out
        (`Busy`, with `busy_hint`, when one holds it). Nothing to hold where storage serialises itself."""
        yield

    async def purge(self, prefix: str) -> None:
        """Delete every key under `prefix`, and whatever else an interrupted write left there."""
        await self.delete([key async for key, _size in self.list(prefix)])

    @abstractmethod
    async def check_writable(self) -> None:
        """Fail now, with the fix named, if a backup could not be written (missing, read-only, bad credentials)."""

    @abstractmethod
    async def put_stream(
        self, key: str, chunks: AsyncIterator[bytes], *, read_back: bool = False, check: StreamCheck | None = None
    ) -> tuple[int, str]:
        """Store the stream under `key` atomically; return (size, sha256 hex) of the stored bytes.

        `read_back`: `verify` will be asked about this object (a backup's dump). A store that can
        re-read the object while it is still being written does so, and `verify` re-reads only the
        rest (the local directory); the others ignore it. `check`, given with `read_back`, proves
        the re-read bytes instead of hashing them again (an encrypted dump authenticates itself).
        """

    async def put_bytes(self, key: str, data: bytes) -> tuple[int, str]:
        async def one() -> AsyncIterator[bytes]:
            yield data

        return await self.put_stream(key, one())

    @abstractmethod
    def get_stream(self, key: str, chunk_size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """The stored bytes of `key`, in chunks (StoreUnreachable if it does not exist)."""

    async def get_bytes(self, key: str) -> bytes:
        return b"".join([chunk async for chunk in self.get_stream(key)])

    @abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        """(key, size) of every stored object whose key starts with `prefix`, temporary files excluded."""

    @abstractmethod
    async def delete(self, keys: Iterable[str]) -> int:
        """Delete these keys (missing ones are ignored); return how many were asked for."""

    async def sha256(self, key: str) -> tuple[int, str]:
        """Re-read `key` and hash it."""
        digest = hashlib.sha256()
        size = 0
        async for chunk in self.get_stream(key):
            digest.update(chunk)
            size += len(chunk)
        return size, digest.hexdigest()

    async def checksum(self, key: str, algorithm: str) -> tuple[int, str]:
        """Re-read `key` and hash it with `algorithm` ('sha256' or 'md5')."""
        digest = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
        size = 0
        async for chunk in self.get_stream(key):
            digest.update(chunk)
            size += len(chunk)
        return size, digest.hexdigest()

    async def list_modified(self, prefix: str) -> AsyncIterator[tuple[str, int, float | None]]:
        """As `list`, with each object's modification time (epoch seconds) where the store keeps one cheaply."""
        async for key, size in self.list(prefix):
            yield key, size, None

    async def verify(self, key: str, size: int, sha256: str) -> str | None:
        """Re-read every byte of `key`: None when it is exactly `size` bytes hashing to `sha256`, else what differs.

        The verification step of a backup. StoreUnreachable when `key` cannot be read at all.
        """
        actual_size, actual = await self.sha256(key)
        return mismatch(actual_size, actual, size, sha256)

    async def sweep_temporary(self) -> builtins.list[str]:
        """Remove what interrupted writes left behind (temporary files, open multipart uploads); return their keys."""
        return []
