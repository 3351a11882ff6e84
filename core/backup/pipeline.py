"""The streaming pipeline: pg_dump -> zstd -> AES-GCM chunks -> repository, in flat memory.

Two stages overlap: a worker thread reads pg_dump's stdout in 1 MiB blocks and
compresses and encrypts them (zstd and OpenSSL release the GIL); a bounded
queue hands the results to the event loop, which writes them to the repository
(and hashes them) while the thread works on the next block. Memory stays a few
MiB whatever the database size, and pg_dump is never waiting on us for long:
wall time stays close to the dump's own. The repository is asked to re-read what
it stores while the dump runs (`read_back`: a local directory does, by windows),
so the verification after the dump has little left to read.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.from_thread
import anyio.to_thread

from ..artifact.codec import Encoder
from ..errors import RecoveryError
from ..repository.base import Repository
from ..stores.pgclient.commands import PgClientCommand
from ..stores.pgclient.process import PipedProcess
from ..taskgroups import task_group

BLOCK = 1 << 20
# Both stages buffer enough to ride out the other's stalls (a direct write waiting on the disk, the
# compressing thread descheduled). With 4 finished blocks and no read-ahead, pg_dump found its 1 MiB pipe
# full on most reads and the cores idled ~1 s of the ~4.6 s a dump of the bench bed takes; with 8 of each,
# less (~0.6 s), for ~0.15 s less wall time and ~12 MiB more memory (docs/benchmarks.md, run_backup).
QUEUE_BLOCKS = 8
# Blocks of pg_dump's output read ahead of the compressor (8 MiB), by a thread that keeps the pipe drained.
READ_AHEAD = 8
PROGRESS_EVERY = 0.5

Report = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class Stored:
    key: str
    size: int
    sha256: str
    plain_size: int
    seconds: float


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_tuned = False


def recycle_large_buffers() -> None:
    """Keep the pipeline's 1 MiB buffers in the heap (glibc), instead of mapping and unmapping each one.

    Measured on the 1.3 GiB bench database: ~975,000 page faults and 6 s of system time per backup
    without this, ~40,000 and 3.4 s with it. A no-op where there is no glibc `mallopt`.
    """
    global _tuned
    if _tuned:
        return
    _tuned = True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 64 << 20)
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)


@dataclass
class _Outcome:
    ok: bool = False
    error: BaseException | None = None


async def dump_to_repository(
    command: PgClientCommand, repo: Repository, key: str, transform: Encoder, report: Report
) -> Stored:
    """Stream the command's stdout through `transform` into `key`; the object exists only if it succeeded."""
    started = time.monotonic()
    recycle_large_buffers()
    process = await anyio.to_thread.run_sync(PipedProcess, command)
    send, receive = anyio.create_memory_object_stream[bytes](max_buffer_size=QUEUE_BLOCKS)
    outcome = _Outcome()

    def produce() -> None:
        # One worker thread does the byte work: large blocking reads, zstd and AES-GCM (both release
        # the GIL), so the event loop only hands finished blocks to the repository.
        try:
            for block in process.blocks(BLOCK, READ_AHEAD):
                out = transform.update(block)
                if out:
                    anyio.from_thread.run(send.send, out)
            process.finished()
            anyio.from_thread.run(send.send, transform.finish())
            outcome.ok = True
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the consumer is gone (failed or cancelled): it reports why
        except Exception as exc:  # handed to the consumer, which raises it in the event loop
            outcome.error = exc
        finally:
            anyio.from_thread.run_sync(send.close)

    async def consume() -> AsyncIterator[bytes]:
        last = time.monotonic()
        async with receive:
            async for block in receive:
                yield block
                if time.monotonic() - last >= PROGRESS_EVERY:
                    last = time.monotonic()
                    await report(transform.plain_bytes)
        # Raised before the stream ends normally, so the repository abandons the object: a failed
        # pg_dump never leaves a complete-looking artifact.
        if outcome.error is not None:
            raise outcome.error
        if not outcome.ok:
            raise RecoveryError(f"{process.name} stopped before the end of its output", "run the backup again")

    try:
        async with task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, process.drain_stderr)
            tg.start_soon(anyio.to_thread.run_sync, produce)
            try:
                size, digest = await repo.put_stream(key, consume(), read_back=True,
                                                     check=transform.read_back_check())
            finally:
                if not outcome.ok:
                    # Unblocks the reader thread (EOF) so the task group can end.
                    process.kill()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(process.close)
    await report(transform.plain_bytes)
    return Stored(key, size, digest, transform.plain_bytes, time.monotonic() - started)


async def file_to_repository(
    chunks: AsyncIterator[bytes], repo: Repository, key: str, transform: Encoder
) -> Stored:
    """One file of a directory-format dump, through the same transform."""
    started = time.monotonic()

    async def transformed() -> AsyncIterator[bytes]:
        async for block in chunks:
            out = await anyio.to_thread.run_sync(transform.update, block)
            if out:
                yield out
        yield await anyio.to_thread.run_sync(transform.finish)

    size, digest = await repo.put_stream(key, transformed(), read_back=True, check=transform.read_back_check())
    return Stored(key, size, digest, transform.plain_bytes, time.monotonic() - started)
