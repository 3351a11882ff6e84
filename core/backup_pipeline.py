"""The streaming pipeline: pg_dump -> zstd -> AES-GCM chunks -> repository, in flat memory.

Three stages overlap: one task reads pg_dump's stdout into 1 MiB blocks (a
bounded queue between them, so memory stays a few MiB whatever the database
size); compression and encryption run in a worker thread (zstd and OpenSSL
release the GIL), while the repository writes the previous block. pg_dump is
therefore never waiting on us for long: wall time stays close to the dump's own.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.to_thread

from .backup_crypto import Encryptor
from .compression import Codec, Compression, compressor
from .pgdump import Running
from .repository import Repository
from .taskgroups import task_group

BLOCK = 1 << 20
QUEUE_BLOCKS = 4
PROGRESS_EVERY = 0.5

Report = Callable[[int], Awaitable[None]]


class Transform:
    """Compression then (optionally) encryption of one stream."""

    def __init__(self, compression: Compression, key: bytes | None, level: int | None = None) -> None:
        self._codec: Codec = compressor(compression, level)
        self._encryptor = Encryptor(key) if key is not None else None
        self.plain_bytes = 0

    def update(self, data: bytes) -> bytes:
        self.plain_bytes += len(data)
        out = self._codec.update(data)
        return self._encryptor.update(out) if self._encryptor is not None else out

    def finish(self) -> bytes:
        out = self._codec.finish()
        if self._encryptor is None:
            return out
        return self._encryptor.update(out) + self._encryptor.finish()


@dataclass(frozen=True)
class Stored:
    key: str
    size: int
    sha256: str
    plain_size: int
    seconds: float


async def dump_to_repository(
    running: Running, repo: Repository, key: str, transform: Transform, report: Report
) -> Stored:
    """Stream `running`'s stdout through `transform` into `key`; the object exists only if pg_dump succeeded."""
    started = time.monotonic()
    send, receive = anyio.create_memory_object_stream[bytes](max_buffer_size=QUEUE_BLOCKS)

    async def read() -> None:
        async with send:
            buffer = bytearray()
            while True:
                try:
                    # Whatever is buffered, up to a block: fewer hops than the default 64 KiB reads.
                    chunk = await running.stdout.receive(BLOCK)
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    break
                buffer += chunk
                if len(buffer) >= BLOCK:
                    await send.send(bytes(buffer))
                    buffer.clear()
            if buffer:
                await send.send(bytes(buffer))

    async def transformed() -> AsyncIterator[bytes]:
        last = time.monotonic()
        async with receive:
            async for block in receive:
                out = await anyio.to_thread.run_sync(transform.update, block)
                if out:
                    yield out
                if time.monotonic() - last >= PROGRESS_EVERY:
                    last = time.monotonic()
                    await report(transform.plain_bytes)
        # Raising here, before the last bytes, makes the repository abandon the object: a failed
        # pg_dump never leaves a complete-looking artifact.
        await running.finished()
        yield await anyio.to_thread.run_sync(transform.finish)

    async with task_group() as tg:
        tg.start_soon(read)
        size, digest = await repo.put_stream(key, transformed())
    await report(transform.plain_bytes)
    return Stored(key, size, digest, transform.plain_bytes, time.monotonic() - started)


async def file_to_repository(
    chunks: AsyncIterator[bytes], repo: Repository, key: str, transform: Transform
) -> Stored:
    """One file of a directory-format dump, through the same transform."""
    started = time.monotonic()

    async def transformed() -> AsyncIterator[bytes]:
        async for block in chunks:
            out = await anyio.to_thread.run_sync(transform.update, block)
            if out:
                yield out
        yield await anyio.to_thread.run_sync(transform.finish)

    size, digest = await repo.put_stream(key, transformed())
    return Stored(key, size, digest, transform.plain_bytes, time.monotonic() - started)
