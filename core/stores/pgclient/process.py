"""The one place that runs PostgreSQL's client binaries, built by commands.py's command family.

Three ways to run one, by what flows through it, each keeping the tail of its
stderr for our error: `spawn`/`Running` (stdout read by async code: pg_dump of a
directory), `PipedProcess` (stdout read by a worker thread in large blocks: the
streaming pg_dump), `Feed` (our bytes on stdin, stdout optionally kept: pg_restore
and psql fed a decrypted dump, `feed_all` over an async iterator), and `run`
(a client to its end on local files: pg_restore of a directory, --list of a file).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
from anyio.abc import ByteReceiveStream, Process

from ...errors import ConfigurationError, RecoveryError, scrub
from ...taskgroups import task_group
from .commands import DumpFormat, PgClientCommand, PgDumpCommand, PgRestoreCommand, split_dsn

__all__ = ["STDERR_KEEP", "CalledProcessError", "DumpFormat", "Feed", "PgDumpCommand", "PgRestoreCommand",
           "PipedProcess", "Running", "feed_all", "run", "spawn", "split_dsn"]  # fmt: skip

# Re-exported for callers that need to run the binaries synchronously in a thread.
CalledProcessError = subprocess.CalledProcessError


STDERR_KEEP = 16 << 10  # the tail of a client's stderr we keep: its final error is what an operator needs


class Running:
    """A started client binary: read `stdout`, then `await finished()` (raises with its stderr on failure)."""

    def __init__(self, process: Process, name: str) -> None:
        self.process = process
        self.name = name
        self.stderr = bytearray()

    @property
    def stdout(self) -> ByteReceiveStream:
        assert self.process.stdout is not None
        return self.process.stdout

    async def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk
            # Keep the tail only: the final error is what an operator needs.
            del self.stderr[:-STDERR_KEEP]

    def error_text(self) -> str:
        return scrub(self.stderr.decode(errors="replace").strip())

    async def finished(self) -> None:
        code = await self.process.wait()
        if code != 0:
            raise RecoveryError(
                f"{self.name} failed (exit code {code}): {self.error_text() or 'no message'}",
                "see pg_dump's message above; nothing was kept of this run",
            )


@asynccontextmanager
async def spawn(command: PgClientCommand) -> AsyncIterator[Running]:
    """Start the command with stdout piped; on leaving early (error, cancellation) the process is killed."""
    argv = command.argv
    try:
        process = await anyio.open_process(argv, env=command.env, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise ConfigurationError(f"cannot start {argv[0]}: {exc.strerror}", "check ENGRAM_RECOVERY_PG_DUMP") from exc
    running = Running(process, command.name)
    try:
        async with task_group() as tg:
            tg.start_soon(running._drain_stderr)
            try:
                yield running
            finally:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                with anyio.CancelScope(shield=True):
                    await process.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()


# --- the streaming dump's process, read by a worker thread ---------------------------------------

# Linux lets an unprivileged process grow a pipe to 1 MiB (/proc/sys/fs/pipe-max-size).
_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
# A read that returns less than this waits COALESCE_PAUSE for more before reading again.
COALESCE_BYTES = 256 << 10
COALESCE_PAUSE = 0.001


class PipedProcess:
    """A client binary whose stdout a worker thread reads in large, coalesced blocks.

    pg_dump's stdio writes 4 KiB at a time into a pipe (glibc sizes the buffer by the
    pipe's st_blksize): ~340,000 writes for a 2 GiB dump. A reader that is faster
    than pg_dump is woken by nearly every one of them, and each wake-up costs both
    processes a context switch. So `blocks` reads the raw pipe and, after a short
    read, pauses a millisecond (pg_dump fills at most a few hundred KiB of the
    1 MiB pipe meanwhile, so it never blocks on us) instead of going straight back
    to sleep on the next 4 KiB: about 9,000 reads instead of 220,000, and half the
    reader's CPU (docs/benchmarks.md, run_backup).
    """

    def __init__(self, command: PgClientCommand) -> None:
        self.name = command.name
        argv = command.argv
        try:
            self.process = subprocess.Popen(
                argv, env=command.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot start {argv[0]}: {exc.strerror}", "check ENGRAM_RECOVERY_PG_DUMP"
            ) from exc
        assert self.process.stdout is not None and self.process.stderr is not None
        self.stdout = self.process.stdout
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.stdout.fileno(), _F_SETPIPE_SZ, PIPE_SIZE)
        self.stderr = bytearray()

    def _readinto(self, view: memoryview) -> int:
        """Fill `view` from stdout, coalescing pg_dump's small writes; the count (0: the end)."""
        filled, size = 0, len(view)
        while filled < size:
            # Straight from the pipe into the block: this does its own batching.
            count = os.readv(self.stdout.fileno(), [view[filled:]])
            if not count:
                break
            filled += count
            if filled >= COALESCE_BYTES:
                break
            time.sleep(COALESCE_PAUSE)
        return filled

    def blocks(self, size: int, ahead: int) -> Iterator[memoryview]:
        """Blocking: stdout in blocks of at most `size` bytes, read up to `ahead` blocks ahead by a thread.

        The thread keeps the pipe drained while the caller works on a block, so pg_dump (and the server
        backend feeding it) never waits on a full 1 MiB pipe whenever the caller is slow or descheduled
        for a moment: on 2 cores those stalls left a core idle. The `ahead` buffers are reused (no 1 MiB
        allocated and zeroed per block: 2 GiB of memset for a 2 GiB dump), so each block is valid until
        the next.
        """
        free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        full: queue.SimpleQueue[tuple[bytearray, int] | BaseException] = queue.SimpleQueue()
        for _ in range(ahead):
            free.put(bytearray(size))

        def read_ahead() -> None:
            try:
                while (buffer := free.get()) is not None:
                    with memoryview(buffer) as view:
                        count = self._readinto(view)
                    full.put((buffer, count))
                    if not count:
                        return
            except OSError as exc:  # handed to the caller, in its thread
                full.put(exc)

        reader = threading.Thread(target=read_ahead, name=f"{self.name} read-ahead", daemon=True)
        reader.start()
        try:
            while True:
                item = full.get()
                if isinstance(item, BaseException):
                    raise item
                buffer, count = item
                if not count:
                    return
                with memoryview(buffer) as view:
                    yield view[:count]
                free.put(buffer)
        finally:
            free.put(None)  # a reader waiting for a buffer ends; one reading ends at the pipe's end (or kill)

    def drain_stderr(self) -> None:
        """Blocking: keep the tail of stderr (run in a thread so pg_dump never blocks on it)."""
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr += line
            del self.stderr[:-STDERR_KEEP]

    def finished(self) -> None:
        """Blocking: wait for the exit; raise with the scrubbed stderr on failure."""
        code = self.process.wait()
        if code != 0:
            message = scrub(self.stderr.decode(errors="replace").strip()) or "no message"
            raise RecoveryError(
                f"{self.name} failed (exit code {code}): {message}",
                "see pg_dump's message above; nothing was kept of this run",
            )

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    def close(self) -> None:
        self.kill()
        self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


# --- clients fed on stdin (pg_restore, psql), and clients run to their end ---------------------------

_RESTORE_HINT = "check ENGRAM_RECOVERY_PG_RESTORE"


def _failure(name: str, code: int, stderr: bytes | bytearray, fix: str) -> RecoveryError:
    text = scrub(bytes(stderr).decode(errors="replace").strip()[-STDERR_KEEP:])
    return RecoveryError(f"{name} failed (exit {code}): {text or 'no message'}", fix)


async def run(command: PgClientCommand, fix: str, what: str | None = None) -> str:
    """Run a client binary to the end; its stdout, or the RecoveryError its stderr explains (`what` names it)."""
    done = await anyio.run_process(command.argv, env=command.env, check=False)
    if done.returncode != 0:
        raise _failure(what or command.name, done.returncode, done.stderr, fix)
    return done.stdout.decode(errors="replace")


class Feed:
    """A client binary reading our bytes on stdin. It may stop reading early (a --list, a loader whose share is
    done): with `drain`, the rest is then consumed and dropped, so a tee feeding it never stalls."""

    def __init__(self, command: PgClientCommand, fix: str, *, keep_stdout: bool = False, drain: bool = True) -> None:
        self.command, self.fix, self.keep_stdout, self.drain = command, fix, keep_stdout, drain
        self.stderr = bytearray()
        self.stdout = bytearray()
        self.exited = anyio.Event()

    async def run(self, receive: anyio.abc.ObjectReceiveStream[bytes]) -> None:
        async with receive:  # closed even when cancelled before the process starts
            await self._run(receive)

    async def _run(self, receive: anyio.abc.ObjectReceiveStream[bytes]) -> None:
        argv = self.command.argv
        read_end, write_end = _stdin_pipe()
        try:
            try:
                process = await anyio.open_process(argv, env=self.command.env, stdin=read_end,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
            except OSError as exc:
                raise ConfigurationError(f"cannot start {argv[0]}: {exc.strerror}", _RESTORE_HINT) from exc
            finally:
                os.close(read_end)  # the child holds its own copy: its EOF comes when we close ours
            async with process:
                assert process.stderr is not None and process.stdout is not None
                err, out = process.stderr, process.stdout

                async def drain(stream: Any, into: bytearray, keep: bool) -> None:
                    async for part in stream:
                        into.extend(part)
                        if not keep:
                            del into[:-STDERR_KEEP]

                async with task_group() as tg:
                    tg.start_soon(drain, err, self.stderr, False)
                    tg.start_soon(drain, out, self.stdout, self.keep_stdout)
                    try:
                        pause = _pause(write_end)
                        async for chunk in receive:
                            await _write_all(write_end, chunk, pause)
                    except (BrokenPipeError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass  # it stopped reading: its exit code says whether that was right
                    finally:
                        os.close(write_end)
                        write_end = -1
                code = await process.wait()
                self.exited.set()
                if self.drain:
                    async for _chunk in receive:
                        pass  # keep the tee moving for the other consumers
        finally:
            if write_end >= 0:
                os.close(write_end)
        if code != 0:
            raise _failure(self.command.name, code, self.stderr, self.fix)


# A client's stdin is our own pipe, grown to PIPE_SIZE where Linux allows, written without asyncio's stream
# buffer: its transport copied every chunk it could not write at once into a buffer of its own, and woke us
# for each page pg_restore read. After a write finds a large pipe full, we wait until it is writable and
# then WRITE_PAUSE more, so one write refills the space pg_restore has read meanwhile (it still holds most
# of the 1 MiB then, so it never waits for us); with a small pipe there is no pause.
_F_GETPIPE_SZ = 1032
WRITE_PAUSE = 0.001


def _stdin_pipe() -> tuple[int, int]:
    """(read end for the child, our non-blocking write end); both close on exec, as os.pipe makes them."""
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
    os.set_blocking(write_end, False)
    return read_end, write_end


def _pause(fd: int) -> float:
    try:
        size = fcntl.fcntl(fd, _F_GETPIPE_SZ)
    except OSError:
        return 0.0
    return WRITE_PAUSE if size >= PIPE_SIZE else 0.0


async def _write_all(fd: int, data: bytes, pause: float) -> None:
    """Every byte of `data` into the non-blocking pipe `fd` (BrokenPipeError: the reader is gone)."""
    with memoryview(data) as view:
        pos, slept = 0, False
        while pos < len(view):
            try:
                pos += os.write(fd, view[pos:])
                slept = False
            except BlockingIOError:
                if pause and not slept:
                    # A large pipe has room again after the pause (pg_restore reads far less than 1 MiB in it):
                    # retried without asking the event loop to watch the pipe, a register, a wake-up and an
                    # unregister for each of the thousands of times a restore finds a pipe full.
                    slept = True
                    await anyio.sleep(pause)
                    continue
                await anyio.wait_writable(fd)
                if pause:
                    await anyio.sleep(pause)


async def feed_all(feed: Feed, chunks: AsyncIterator[bytes]) -> int:
    """Feed `chunks` to one client until it ends or stops reading; the bytes fed. A failing source kills the
    client and raises its own error; a failing client raises the RecoveryError its stderr explains."""
    send, receive = anyio.create_memory_object_stream[bytes](4)
    fed = 0
    async with task_group() as tg:
        tg.start_soon(feed.run, receive)
        async with send:
            try:
                async for chunk in chunks:
                    await send.send(chunk)
                    fed += len(chunk)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the client stopped reading: its exit code says whether that was right
    return fed
