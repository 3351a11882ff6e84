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
repository. That is `load_parallel`, now the fallback: `load_split` (the default)
cuts the stream into its tables' blocks and loads N tables at a time instead.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream

from ..stores.pgclient.commands import PgClientCommand, PgRestoreCommand
from ..stores.pgclient.process import Feed, feed_all, run
from ..taskgroups import task_group
from .dumpfile import Block, Head, Splitter, Unsupported, parse_head

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


@dataclass(frozen=True)
class Load:
    """One load of a custom dump's decrypted stream, as its steps share it (instead of six parameters each):
    the target, the pg_restore that loads it, `jobs` tables (and post-data jobs) at a time, the scratch
    file of the dump's head (its folder holds the --use-list files too), the phases' seconds as they end,
    and `loaders` for the fallback `load_parallel`."""

    dsn: str
    pg_restore: str
    jobs: int
    head_file: Path
    timings: dict[str, float]
    loaders: int = 1

    def command(self, **options: Any) -> PgRestoreCommand:
        return restore_into(self.pg_restore, self.dsn, **options)


async def load_parallel(stream: AsyncGenerator[bytes], load: Load) -> tuple[int, str]:
    """Restore a custom dump from its decrypted stream, as the module says; returns (plain bytes, TOC text).

    `loaders` > 1 loads the tables side by side (step 3). Each loader reads the whole stream through
    its pipe, so on a small machine whose cores the server's COPYs already keep busy one loader is
    faster (2 cores: 1.15-1.5x pg_restore -j2 with one, 1.4-1.6x with two, in smoke runs); the bench
    measures both (`--loaders`).
    """
    mark = time.monotonic()
    lister = feed(load.command(list_only=True), keep_stdout=True)
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
        await feed(load.command(sections=("pre-data",))).run(pre_receive)
        load.timings["toc_and_pre_data"] = time.monotonic() - mark
        for number, share in enumerate(shares(lister.stdout.decode(errors="replace"), load.loaders)):
            listing = load.head_file.with_name(f"share-{number}.list")
            await anyio.to_thread.run_sync(listing.write_text, share)
            start(tg, load.command(sections=("data",), use_list=str(listing)))
        for chunk in head:
            for sink in sinks:
                await sink.send(chunk)

    async def pump(tg: anyio.abc.TaskGroup) -> None:
        # One loader starts at once, on the first byte; side-by-side loaders wait for the TOC.
        started = load.loaders <= 1
        if started:
            start(tg, load.command(sections=("pre-data", "data")))
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
    load.timings["decrypt_and_load"] = time.monotonic() - mark
    mark = time.monotonic()
    # Post-data needs only the TOC, at the head of the dump: no scratch copy of the rows at all.
    await anyio.to_thread.run_sync(load.head_file.write_bytes, b"".join(head))
    await run(load.command(jobs=load.jobs, sections=("post-data",), source=str(load.head_file)), FIX,
              "pg_restore (post-data)")  # fmt: skip
    load.timings["post_data"] = time.monotonic() - mark
    return total[0], lister.stdout.decode(errors="replace")


# Small blocks already whole when a loader is free are loaded together, up to this many bytes: one
# pg_restore (and connection) per table would cost more than their rows on a schema of many small tables.
BATCH_BYTES = 8 << 20
# Blocks decrypted ahead of their loaders are held in memory, up to a quarter of the memory available
# (within these bounds); beyond it decryption waits. The more, the sooner the stream reaches the next
# large table for the second loader (1 GiB bed: 2.5 GiB let the stream end at 11 s, 512 MiB at 14 s).
# No scratch file: spooling to disk competed with the server's own writes and cost more than it saved.
MEMORY_BUDGET_MIN, MEMORY_BUDGET_MAX = 256 << 20, 2 << 30
MEMORY_BUDGET: int | None = None  # None: from the memory available when the restore starts


def memory_budget() -> int:
    if MEMORY_BUDGET is not None:
        return MEMORY_BUDGET
    import psutil  # here: only a restore needs it

    available = int(psutil.virtual_memory().available)
    return max(MEMORY_BUDGET_MIN, min(MEMORY_BUDGET_MAX, available // 4))


async def load_split(stream: AsyncGenerator[bytes], load: Load) -> tuple[int, str]:
    """Restore a custom dump from its decrypted stream with its tables loaded `jobs` at a time, as
    `pg_restore --jobs` loads them from a file; returns (plain bytes, TOC text).

    The stream is cut into its data blocks (core/restore/dumpfile.py), held in memory as they arrive
    (up to MEMORY_BUDGET ahead of the loaders), so the next table's loader can start while the current
    one still loads: each loader is a stock `pg_restore --section=data --use-list=<its blocks>` fed the
    head and its blocks. When a load ends, its tables' own indexes and constraints are built in the
    free slots (loads first); `pg_restore --jobs --section=post-data` builds the rest. Scratch space
    holds the head only. A head this cannot read falls back to `load_parallel` on the same stream.
    """
    mark = time.monotonic()
    # Read in a task of its own: the decryption pipeline is a generator with a task group, which must be
    # iterated by one task only, while the head is read here and the blocks by the pump below.
    send, receive = anyio.create_memory_object_stream[bytes](DEPTH)
    out: list[tuple[int, str]] = []

    async def split() -> None:
        async with receive:
            out.append(await _split(receive, load, mark))

    async with task_group() as tg:
        tg.start_soon(tee, stream, [send])
        tg.start_soon(split)
    return out[0]


async def _split(receive: MemoryObjectReceiveStream[bytes], load: Load, mark: float) -> tuple[int, str]:
    buffered = bytearray()
    head: Head | None = None
    try:
        async for chunk in receive:
            buffered += chunk
            head = parse_head(buffered)
            if head is not None:
                break
    except Unsupported:
        head = None
    if head is None:
        return await load_parallel(_chain(bytes(buffered), receive), load)
    await anyio.to_thread.run_sync(load.head_file.write_bytes, bytes(buffered[: head.size]))
    return await _load_blocks(receive, bytes(buffered[head.size :]), head, load, mark)


async def _chain(first: bytes, rest: anyio.abc.ObjectReceiveStream[bytes]) -> AsyncGenerator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


async def _load_blocks(
    stream: MemoryObjectReceiveStream[bytes], first: bytes, head: Head, ctx: Load, mark: float
) -> tuple[int, str]:
    """`first`: what followed the head in the bytes read so far."""
    jobs, head_file, timings = ctx.jobs, ctx.head_file, ctx.timings
    head_bytes = await anyio.to_thread.run_sync(head_file.read_bytes)
    folder = head_file.parent
    splitter = Splitter(head)
    state = _Watch(head.size)
    budget = await anyio.to_thread.run_sync(memory_budget)
    pre_data_done = anyio.Event()
    slots = anyio.Semaphore(max(1, jobs))
    toc: list[str] = []
    built: set[int] = set()  # post-data entries already restored beside the loads
    builds: list[list[int]] = []  # post-data entries ready to build, a pg_restore each
    small: list[int] = []
    running = [0]  # loads and builds under way

    async def pump() -> None:
        try:
            if first:
                state.total += len(first)
                state.held += await anyio.to_thread.run_sync(splitter.feed, first)
                state.ping()
            async for chunk in stream:
                while state.held > budget:  # the loaders are behind: decryption waits for them
                    wake = state.changed
                    await wake.wait()
                # The chunks already waiting are cut in the same worker-thread call: one hand-off, not one each.
                batch = [chunk, *_ready(stream)]
                state.total += sum(len(c) for c in batch)
                state.held += await anyio.to_thread.run_sync(_feed_all, splitter, batch)
                state.ping()
            splitter.finish()
        finally:
            state.done = True
            state.ping()

    async def pre_data() -> None:
        async def listing() -> None:
            toc.append(await run(ctx.command(list_only=True, source=str(head_file)), FIX,
                                 "pg_restore --list"))  # fmt: skip

        async with task_group() as tg:
            tg.start_soon(listing)
            await run(ctx.command(sections=("pre-data",), source=str(head_file)), FIX,
                      "pg_restore (pre-data)")  # fmt: skip
        timings["toc_and_pre_data"] = time.monotonic() - mark
        pre_data_done.set()

    async def sequences() -> None:
        """The data-section entries without a block (sequence values, large-object metadata): from the head
        alone, beside the loaders (a few statements: not worth one of their slots)."""
        await pre_data_done.wait()
        rest = folder / "rest.list"
        blocks = set(head.data_ids)
        await anyio.to_thread.run_sync(rest.write_text, "".join(f"{i};\n" for i in head.entries if i not in blocks))
        await run(ctx.command(sections=("data",), use_list=str(rest), source=str(head_file)), FIX,
                  "pg_restore (data)")  # fmt: skip

    async def blocks_of(batch: list[Block]) -> AsyncIterator[bytes]:
        yield head_bytes
        for block in batch:
            taken = 0
            while True:
                wake = state.changed
                if taken < len(block.parts):
                    data, block.parts[taken] = block.parts[taken], b""  # let go of it once sent
                    taken += 1
                    state.held -= len(data)
                    state.ping()
                    yield data
                elif block.complete:
                    break
                else:
                    await wake.wait()

    async def load(batch: list[Block], number: int) -> None:
        try:
            listing = folder / f"load-{number}.list"
            await anyio.to_thread.run_sync(listing.write_text, "".join(f"{b.dump_id};\n" for b in batch))
            command = ctx.command(sections=("data",), use_list=str(listing))
            await feed_all(Feed(command, FIX, drain=False), blocks_of(batch))
            # Its tables' own indexes and constraints can be built now, while other tables still load: a
            # large table's one by one (free slots then build them side by side), small tables' together.
            for block in batch:
                early = head.early_post_data(block.dump_id)
                if block.written >= BATCH_BYTES:
                    builds.extend([i] for i in early)
                elif early:
                    small.extend(early)
            if small:
                builds.append(small[:])
                small.clear()
        finally:
            running[0] -= 1
            slots.release()
            state.ping()

    async def build(entries: list[int], number: int) -> None:
        try:
            listing = folder / f"post-{number}.list"
            await anyio.to_thread.run_sync(listing.write_text, "".join(f"{i};\n" for i in entries))
            await run(ctx.command(sections=("post-data",), use_list=str(listing),
                                   source=str(head_file)), FIX, "pg_restore (post-data)")  # fmt: skip
            built.update(entries)
        finally:
            running[0] -= 1
            slots.release()
            state.ping()

    async def schedule(tg: anyio.abc.TaskGroup) -> None:
        """Loads first (in stream order), then the builds their ends made ready; `jobs` of them at a time."""
        await pre_data_done.wait()
        taken, number = 0, 0
        while True:
            wake = state.changed
            if taken < len(splitter.blocks):
                await slots.acquire()
                batch, size = [splitter.blocks[taken]], splitter.blocks[taken].written
                taken += 1
                while batch[-1].complete and taken < len(splitter.blocks) and size < BATCH_BYTES:
                    batch.append(splitter.blocks[taken])
                    size += splitter.blocks[taken].written
                    taken += 1
                number, running[0] = number + 1, running[0] + 1
                timings.setdefault("first_load", time.monotonic() - mark)
                tg.start_soon(load, batch, number)
            elif builds:
                await slots.acquire()
                number, running[0] = number + 1, running[0] + 1
                tg.start_soon(build, builds.pop(0), number)
            elif state.done and not running[0]:
                return
            else:
                await wake.wait()

    async with task_group() as tg:
        tg.start_soon(pump)
        tg.start_soon(pre_data)
        tg.start_soon(sequences)
        tg.start_soon(schedule, tg)
    timings["decrypt_and_load"] = time.monotonic() - mark
    mark = time.monotonic()
    rest = folder / "post.list"  # every entry but those built already, in TOC order (--section picks post-data)
    await anyio.to_thread.run_sync(rest.write_text, "".join(f"{i};\n" for i in head.entries if i not in built))
    await run(ctx.command(jobs=jobs, sections=("post-data",), use_list=str(rest),
                           source=str(head_file)), FIX, "pg_restore (post-data)")  # fmt: skip
    timings["post_data"] = time.monotonic() - mark
    return state.total, toc[0]


def _ready(stream: MemoryObjectReceiveStream[bytes], most: int = 16) -> list[bytes]:
    """The chunks `stream` holds already (at most `most`), taken without waiting."""
    out: list[bytes] = []
    while len(out) < most:
        try:
            out.append(stream.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            break
    return out


def _feed_all(splitter: Splitter, chunks: list[bytes]) -> int:
    return sum(splitter.feed(chunk) for chunk in chunks)


class _Watch:
    """What the pump has done so far; `changed` is set (and replaced) each time it writes more."""

    def __init__(self, total: int) -> None:
        self.changed, self.done, self.total = anyio.Event(), False, total
        self.held = 0  # bytes of blocks in memory, not yet sent to their loader

    def ping(self) -> None:
        old, self.changed = self.changed, anyio.Event()
        old.set()
