"""pg_restore processes fed from one decrypted stream, and the parallel load built on them.

A custom dump written by pg_dump to a pipe (as run_backup writes it) is read
front to back: its table of contents comes first, then each table's rows. So
one decryption can feed several stock pg_restore processes at once:

1. `pg_restore --list` reads the head of the stream and stops: the TOC;
2. `pg_restore --section=pre-data`, fed that same head, creates the tables;
3. `jobs` loaders, `pg_restore --section=data --use-list=<their share>`, each read
   the whole stream (the head replayed, then the rest as it is decrypted) and load
   only their share of the tables, so the big tables load side by side, while the
   same bytes also go to a scratch file;
4. `pg_restore --jobs=N --section=post-data` on that file builds the indexes and
   constraints in parallel.

Decryption, the file and the loading all run at the same time; nothing reads the
dump twice from the repository.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import anyio.abc
import anyio.to_thread

from .errors import ConfigurationError, RecoveryError, scrub
from .pgdump import PgDumpCommand, split_dsn
from .taskgroups import task_group

STDERR_KEEP = 16 << 10
DEPTH = 4  # chunks in flight between two stages: enough to overlap them, little memory
_FIX = "the dump could not be restored with stock tools: see the message; drop and recreate the target database " \
       "before trying again"  # fmt: skip


def env_for(dsn: str) -> dict[str, str]:
    env = PgDumpCommand("", dsn).env
    env["PGAPPNAME"] = "engram-recovery restore"
    return env


async def run(argv: list[str], dsn: str, what: str) -> str:
    """Run a client binary to the end; its stdout, or the RecoveryError its stderr explains."""
    done = await anyio.run_process(argv, env=env_for(dsn), check=False)
    if done.returncode != 0:
        text = scrub(done.stderr.decode(errors="replace").strip()[-STDERR_KEEP:])
        raise RecoveryError(f"{what} failed (exit {done.returncode}): {text or 'no message'}", _FIX)
    return done.stdout.decode(errors="replace")


def restore_argv(pg_restore: str, dsn: str, *extra: str) -> list[str]:
    url, _password = split_dsn(dsn)
    return [pg_restore, "--no-password", "--exit-on-error", f"--dbname={url}", *extra]


class Feed:
    """A client binary reading our bytes on stdin. It may stop reading early (a --list, a loader whose
    share is done): the rest is then consumed and dropped, so a tee feeding it never stalls."""

    def __init__(self, argv: list[str], dsn: str, *, keep_stdout: bool = False) -> None:
        self.argv, self.dsn, self.keep_stdout = argv, dsn, keep_stdout
        self.stderr = bytearray()
        self.stdout = bytearray()
        self.exited = anyio.Event()

    async def run(self, receive: anyio.abc.ObjectReceiveStream[bytes]) -> None:
        try:
            process = await anyio.open_process(self.argv, env=env_for(self.dsn), stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        except OSError as exc:
            raise ConfigurationError(f"cannot start {self.argv[0]}: {exc.strerror}",
                                     "check ENGRAM_RECOVERY_PG_RESTORE") from exc  # fmt: skip
        async with process, receive:
            assert process.stdin is not None and process.stderr is not None and process.stdout is not None
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
                    async for chunk in receive:
                        await process.stdin.send(chunk)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass  # it stopped reading: its exit code says whether that was right
                finally:
                    await process.stdin.aclose()
            code = await process.wait()
            self.exited.set()
            async for _chunk in receive:
                pass  # keep the tee moving for the other consumers
        if code != 0:
            name = self.argv[0].rsplit("/", 1)[-1]
            text = scrub(self.stderr.decode(errors="replace").strip())
            raise RecoveryError(f"{name} failed (exit {code}): {text or 'no message'}", _FIX)


async def tee(stream: AsyncIterator[bytes], sinks: Sequence[anyio.abc.ObjectSendStream[bytes]]) -> int:
    total = 0
    try:
        async for chunk in stream:
            total += len(chunk)
            for sink in sinks:
                await sink.send(chunk)
    finally:
        for sink in sinks:
            await sink.aclose()
    return total


async def to_file(path: Path, receive: anyio.abc.ObjectReceiveStream[bytes]) -> None:
    handle: BinaryIO = await anyio.to_thread.run_sync(path.open, "wb")
    try:
        async with receive:
            async for chunk in receive:
                await anyio.to_thread.run_sync(handle.write, chunk)
    finally:
        handle.close()  # not in a thread: a cancelled task must still close it


def shares(toc: str, jobs: int) -> list[str]:
    """`jobs` --use-list files: the first has every entry but the other loaders' table data, the others
    their table data only (dealt in TOC order). Fewer when there are fewer tables with rows."""
    lines = [line for line in toc.splitlines() if line.strip() and not line.startswith(";")]
    data = [line for line in lines if _desc(line).startswith("TABLE DATA ")]
    n = max(1, min(jobs, len(data)))
    dealt = [data[k::n] for k in range(n)]
    others = {line for share in dealt[1:] for line in share}
    return ["\n".join(line for line in lines if line not in others) + "\n"] + ["\n".join(s) + "\n" for s in dealt[1:]]


def _desc(line: str) -> str:
    parts = line.split("; ", 1)[1].split(" ", 2) if "; " in line else []
    return parts[2] if len(parts) == 3 else ""


async def load_parallel(
    stream: AsyncIterator[bytes], dsn: str, pg_restore: str, jobs: int, plain: Path, timings: dict[str, float],
    loaders: int = 1,
) -> tuple[int, str]:
    """Restore a custom dump from its decrypted stream, as the module says; returns (plain bytes, TOC text).

    `loaders` > 1 loads the tables side by side (step 3). Each loader reads the whole stream through
    its pipe, so on a small machine whose cores the server's COPYs already keep busy one loader is
    faster (2 cores: 1.15-1.2x pg_restore -j2 with one, 1.4-1.6x with two, in smoke runs); the bench
    measures both (`--loaders`).
    """
    if loaders <= 1:
        loaded = await _load_one(stream, dsn, pg_restore, plain, timings)
        return loaded, await _post_data(dsn, pg_restore, jobs, plain, timings, with_toc=True)
    mark = time.monotonic()
    lister = Feed([pg_restore, "--list"], dsn, keep_stdout=True)
    # Unbuffered: the head kept for replay is then little more than what the TOC took.
    list_send, list_receive = anyio.create_memory_object_stream[bytes](0)
    file_send, file_receive = anyio.create_memory_object_stream[bytes](DEPTH)
    head: list[bytes] = []
    sinks: list[anyio.abc.ObjectSendStream[bytes]] = [file_send]
    total = [0]

    async def start_loaders(tg: anyio.abc.TaskGroup) -> None:
        """The TOC is known: create the tables from the head, then start the loaders and replay the head."""
        await list_send.aclose()
        await lister.exited.wait()
        toc = lister.stdout.decode(errors="replace")
        pre_send, pre_receive = anyio.create_memory_object_stream[bytes](len(head) + 1)
        for chunk in head:
            pre_send.send_nowait(chunk)
        pre_send.close()
        await Feed(restore_argv(pg_restore, dsn, "--section=pre-data"), dsn).run(pre_receive)
        timings["toc_and_pre_data"] = time.monotonic() - mark
        for number, share in enumerate(shares(toc, loaders)):
            listing = plain.with_name(f"share-{number}.list")
            await anyio.to_thread.run_sync(listing.write_text, share)
            send, receive = anyio.create_memory_object_stream[bytes](DEPTH)
            sinks.append(send)
            loader = Feed(restore_argv(pg_restore, dsn, "--section=data", f"--use-list={listing}"), dsn)
            tg.start_soon(loader.run, receive)
        for chunk in head:
            for sink in sinks:
                await sink.send(chunk)
        head.clear()

    async def pump(tg: anyio.abc.TaskGroup) -> None:
        started = False
        try:
            async for chunk in stream:
                total[0] += len(chunk)
                if started:
                    for sink in sinks:
                        await sink.send(chunk)
                    continue
                head.append(chunk)
                if not lister.exited.is_set():
                    await list_send.send(chunk)
                if lister.exited.is_set():
                    await start_loaders(tg)
                    started = True
            if not started:  # a dump shorter than its reading of the TOC took
                await start_loaders(tg)
        finally:
            list_send.close()
            for sink in sinks:
                await sink.aclose()

    async with task_group() as tg:
        tg.start_soon(lister.run, list_receive)
        tg.start_soon(to_file, plain, file_receive)
        tg.start_soon(pump, tg)
    timings["decrypt_and_load"] = time.monotonic() - mark
    await _post_data(dsn, pg_restore, jobs, plain, timings, with_toc=False)
    return total[0], lister.stdout.decode(errors="replace")


async def _load_one(
    stream: AsyncIterator[bytes], dsn: str, pg_restore: str, plain: Path, timings: dict[str, float]
) -> int:
    """One loader, `--section=pre-data --section=data`, fed from the first byte; the same bytes to the file."""
    mark = time.monotonic()
    loader = Feed(restore_argv(pg_restore, dsn, "--section=pre-data", "--section=data"), dsn)
    load_send, load_receive = anyio.create_memory_object_stream[bytes](DEPTH)
    file_send, file_receive = anyio.create_memory_object_stream[bytes](DEPTH)
    total = [0]

    async def feed() -> None:
        total[0] = await tee(stream, [load_send, file_send])

    async with task_group() as tg:
        tg.start_soon(loader.run, load_receive)
        tg.start_soon(to_file, plain, file_receive)
        tg.start_soon(feed)
    timings["decrypt_and_load"] = time.monotonic() - mark
    return total[0]


async def _post_data(
    dsn: str, pg_restore: str, jobs: int, plain: Path, timings: dict[str, float], *, with_toc: bool
) -> str:
    """Indexes and constraints with --jobs from the file; the TOC read from it meanwhile when asked for."""
    mark = time.monotonic()
    toc = [""]

    async def listing() -> None:
        toc[0] = await run([pg_restore, "--list", str(plain)], dsn, "pg_restore --list")

    async with task_group() as tg:
        if with_toc:
            tg.start_soon(listing)
        tg.start_soon(run, restore_argv(pg_restore, dsn, f"--jobs={jobs}", "--section=post-data", str(plain)), dsn,
                      "pg_restore (post-data)")  # fmt: skip
    timings["post_data"] = time.monotonic() - mark
    return toc[0]
