"""pg_restore processes fed from one decrypted stream, and the parallel load built on them.

A custom dump written by pg_dump to a pipe (as run_backup writes it) is read
front to back: its table of contents comes first, then each table's rows. So
one decryption can feed several stock pg_restore processes at once:

1. `pg_restore --list` reads the head of the stream and stops: the TOC;
2. `pg_restore --section=pre-data`, fed that same head, creates the tables;
3. the rows: by default one `pg_restore --section=pre-data --section=data` fed
   from the first byte (steps 2 and 3 in one, no waiting for the TOC); with
   `loaders` > 1, that many `pg_restore --section=data --use-list=<their share>`,
   each reading the whole stream (the head replayed, then the rest as it is
   decrypted) and loading only its share of the tables, side by side;
4. `pg_restore --jobs=N --section=post-data` builds the indexes and constraints in
   parallel from a file holding only the head: post-data needs the TOC, never the
   rows (a pipe-written dump has no data offsets for it to seek anyway), so no
   scratch copy of the dump is written at all.

Decryption and loading run at the same time; nothing reads the dump twice from the
repository.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from ..stores.pgclient.commands import PgClientCommand, PgRestoreCommand
from ..stores.pgclient.process import Feed, run
from ..taskgroups import task_group

DEPTH = 4  # chunks in flight between two stages: enough to overlap them, little memory
FIX = "the dump could not be restored with stock tools: see the message; drop and recreate the target database " \
      "before trying again"  # fmt: skip
APPLICATION = "engram-recovery restore"


def restore_into(pg_restore: str, dsn: str, **options: Any) -> PgRestoreCommand:
    """pg_restore into the restore's target, named as ours in pg_stat_activity."""
    return PgRestoreCommand(pg_restore, dsn, application=APPLICATION, **options)


def feed(command: PgClientCommand, *, keep_stdout: bool = False) -> Feed:
    return Feed(command, FIX, keep_stdout=keep_stdout)


async def tee(stream: AsyncGenerator[bytes], sinks: Sequence[anyio.abc.ObjectSendStream[bytes]]) -> int:
    """Each chunk of `stream` to every sink; the stream is closed in this task, however it ends."""
    total = 0
    try:
        async with aclosing(stream):
            async for chunk in stream:
                total += len(chunk)
                for sink in sinks:
                    await sink.send(chunk)
    finally:
        for sink in sinks:
            await sink.aclose()
    return total


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
    stream: AsyncGenerator[bytes], dsn: str, pg_restore: str, jobs: int, head_file: Path, timings: dict[str, float],
    loaders: int = 1,
) -> tuple[int, str]:
    """Restore a custom dump from its decrypted stream, as the module says; returns (plain bytes, TOC text).

    `loaders` > 1 loads the tables side by side (step 3). Each loader reads the whole stream through
    its pipe, so on a small machine whose cores the server's COPYs already keep busy one loader is
    faster (2 cores: 1.15-1.5x pg_restore -j2 with one, 1.4-1.6x with two, in smoke runs); the bench
    measures both (`--loaders`).
    """
    mark = time.monotonic()
    lister = feed(restore_into(pg_restore, dsn, list_only=True), keep_stdout=True)
    # Unbuffered: the head kept is then little more than what the TOC took.
    list_send, list_receive = anyio.create_memory_object_stream[bytes](0)
    head: list[bytes] = []
    sinks: list[anyio.abc.ObjectSendStream[bytes]] = []
    total = [0]

    def start(tg: anyio.abc.TaskGroup, command: PgClientCommand) -> anyio.abc.ObjectSendStream[bytes]:
        send, receive = anyio.create_memory_object_stream[bytes](DEPTH)
        tg.start_soon(feed(command).run, receive)
        sinks.append(send)
        return send

    async def start_shares(tg: anyio.abc.TaskGroup) -> None:
        """The TOC is known: create the tables from the head, then start the loaders and replay the head."""
        await list_send.aclose()
        await lister.exited.wait()
        pre_send, pre_receive = anyio.create_memory_object_stream[bytes](len(head) + 1)
        for chunk in head:
            pre_send.send_nowait(chunk)
        pre_send.close()
        await feed(restore_into(pg_restore, dsn, sections=("pre-data",))).run(pre_receive)
        timings["toc_and_pre_data"] = time.monotonic() - mark
        for number, share in enumerate(shares(lister.stdout.decode(errors="replace"), loaders)):
            listing = head_file.with_name(f"share-{number}.list")
            await anyio.to_thread.run_sync(listing.write_text, share)
            start(tg, restore_into(pg_restore, dsn, sections=("data",), use_list=str(listing)))
        for chunk in head:
            for sink in sinks:
                await sink.send(chunk)

    async def pump(tg: anyio.abc.TaskGroup) -> None:
        # One loader starts at once, on the first byte; side-by-side loaders wait for the TOC.
        started = loaders <= 1
        if started:
            start(tg, restore_into(pg_restore, dsn, sections=("pre-data", "data")))
        try:
            async with aclosing(stream):  # closed in this task, which iterates it (its pipeline has a task group)
                async for chunk in stream:
                    total[0] += len(chunk)
                    if not started:  # side-by-side loaders: all is kept until the TOC is known, then replayed
                        head.append(chunk)
                        if not lister.exited.is_set():
                            await list_send.send(chunk)
                        if lister.exited.is_set():
                            await start_shares(tg)
                            started = True
                        continue
                    if not lister.exited.is_set():  # one loader: the head is kept for the TOC's sake only
                        head.append(chunk)
                        await list_send.send(chunk)
                    for sink in sinks:
                        await sink.send(chunk)
            if not started:  # a dump shorter than its reading of the TOC took
                await start_shares(tg)
        finally:
            list_send.close()
            for sink in sinks:
                await sink.aclose()

    async with task_group() as tg:
        tg.start_soon(lister.run, list_receive)
        tg.start_soon(pump, tg)
    timings["decrypt_and_load"] = time.monotonic() - mark
    mark = time.monotonic()
    # Post-data needs only the TOC, at the head of the dump: no scratch copy of the rows at all.
    await anyio.to_thread.run_sync(head_file.write_bytes, b"".join(head))
    await run(restore_into(pg_restore, dsn, jobs=jobs, sections=("post-data",), source=str(head_file)), FIX,
              "pg_restore (post-data)")  # fmt: skip
    timings["post_data"] = time.monotonic() - mark
    return total[0], lister.stdout.decode(errors="replace")
