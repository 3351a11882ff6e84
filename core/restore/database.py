"""The database step of a restore: a backup's dump into an empty database with stock pg_restore, then proved.

How the bytes reach pg_restore depends on what the dump and the machine allow:

- custom format, parallel (the default): the artifact is decrypted and
  decompressed ONCE, in a worker thread while the next chunks are read (read and decode overlap).
  The stream is cut into its tables' data blocks as it arrives
  (core/restore/dumpfile.py; blocks ahead of their loaders held in memory, within
  a budget) and stock pg_restore processes load N tables at a time, each table's
  own indexes built as soon as its rows are in, the rest by `pg_restore --jobs=N
  --section=post-data` from the dump's head: the schedule of `pg_restore --jobs=N`
  on a file. Scratch space holds only the head. An archive whose head is not
  understood goes the older way: one pg_restore loads the rows while decryption
  is still running, then post-data with --jobs=N (core/restore/feed.py);
- custom or plain format, streamed (one job, or not even room for the TOC in scratch
  space): one pass, decrypted straight into pg_restore's (psql's) stdin, all in one
  transaction;
- directory format: its files decrypted into scratch space two at a time, then
  `pg_restore --jobs=N` on the directory (a directory cannot be streamed).

Then the restored database is checked against the backup (core/schema_check.py):
every table, constraint and index the dump's table of contents names exists, and
every row count equals the manifest's `row_counts`; the TOC is read from the same
file or stream, never by a second decryption.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio
import anyio.to_thread

from ..artifact import extract as backup_extract
from ..artifact.compression import Decompressor, decompressor
from ..artifact.encryption import Decryptor
from ..errors import ConfigurationError, IntegrityError, UnsafeOperation
from ..progress import Progress, silent
from ..repository.base import READ_CHUNK, Repository
from ..repository.layout import artifact_key, backup_prefix
from ..repository.manifest import Artifact, Manifest
from ..stores import postgres
from ..stores.pgclient.commands import RestoreClients, stdin_restore
from ..stores.pgclient.process import Feed, feed_all, run
from ..taskgroups import task_group
from .drill import STOCK_FIX
from .feed import APPLICATION, FIX, Load, feed, load_split, restore_into, tee
from .schema_check import SchemaCheck, TocEntry, check_restored, parse_toc

# Scratch space must hold the plain dump with this much to spare (filesystems misreport, others write too).
SPACE_MARGIN = 1.1
# What the parallel path writes: the dump's head (its table of contents), generously counted.
HEAD_ROOM = 64 << 20
_PIPELINE_DEPTH = 4  # chunks in flight between two stages: enough to overlap them, little memory

Mode = Literal["parallel", "streamed", "directory"]


@dataclass(frozen=True)
class Choice:
    mode: Mode
    jobs: int
    why: str


def choose_mode(manifest: Manifest, jobs: int, free_bytes: int | None, *, prefixed: bool = False) -> Choice:
    """How to feed pg_restore (pure): parallel where format, jobs and scratch space allow it, else streamed.

    `prefixed`: the clients run through ENGRAM_RECOVERY_PG_CLIENT_PREFIX (in a container, say), where they
    cannot read the files of this machine, so only a dump arriving on stdin can be restored through them.
    """
    fmt = manifest.database.dump_format
    if prefixed:
        if fmt == "directory":
            raise ConfigurationError(
                "a directory-format dump cannot be restored through ENGRAM_RECOVERY_PG_CLIENT_PREFIX: pg_restore "
                "reads its files where the prefix runs it, not here",
                "unset the prefix (the bundled pg_restore is used), or restore a custom-format backup",
            )
        return Choice("streamed", 1, "pg_restore runs through ENGRAM_RECOVERY_PG_CLIENT_PREFIX, away from this "
                                     "machine's files: streamed into it in one transaction")  # fmt: skip
    need = plain_size(manifest)
    room = free_bytes is not None and (need is None or free_bytes >= need * SPACE_MARGIN)
    if fmt == "directory":
        if not room:
            raise ConfigurationError(
                f"a directory dump must be decrypted to scratch space first: it needs about {need} bytes and "
                f"{free_bytes} are free",
                "free space there or point TMPDIR at a file system with room (a directory dump cannot be streamed)",
            )
        return Choice("directory", max(1, jobs), "directory format: decrypted to scratch, then pg_restore --jobs")
    if fmt == "plain":
        return Choice("streamed", 1, "plain format: psql reads it on stdin (no parallel restore of a plain dump)")
    if jobs <= 1:
        return Choice("streamed", 1, "one job asked: streamed into pg_restore in one transaction")
    head = min(need, HEAD_ROOM) if need is not None else HEAD_ROOM
    if free_bytes is None or free_bytes < head:
        return Choice("streamed", 1, f"scratch space short ({free_bytes} bytes free, {head} wanted for the dump's "
                                     "table of contents): streamed into pg_restore in one transaction")  # fmt: skip
    return Choice(
        "parallel",
        jobs,
        f"custom format: tables loaded {jobs} at a time while decrypting, each "
        f"table's indexes built once its rows are in, post-data with --jobs={jobs}",
    )


async def refuse_non_empty(dsn: str) -> None:
    """A restore goes into an empty database only: pg_restore over existing objects fails half-way or mixes rows."""
    async with postgres.connection(dsn) as conn:
        found = await conn.fetch(
            "SELECT n.nspname || '.' || c.relname AS name FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') AND n.nspname NOT LIKE 'pg_temp%' "
            "AND n.nspname NOT LIKE 'pg_toast_temp%' AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') "
            "ORDER BY 1 LIMIT 6")  # fmt: skip
        database = await conn.fetchval("SELECT current_database()")
    if found:
        names = ", ".join(r["name"] for r in found[:5]) + (", ..." if len(found) > 5 else "")
        raise UnsafeOperation(f"the database {database} is not empty ({names}): nothing was restored into it",
                              "restore into a new, empty database (CREATE DATABASE ... TEMPLATE template0), or drop "
                              "and recreate this one if that is what the plan chose")  # fmt: skip


def _free_space(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def plain_size(manifest: Manifest) -> int | None:
    dumps = [a for a in manifest.artifacts if a.kind == "database"]
    sizes = [a.plain_size for a in dumps]
    if sizes and all(s is not None for s in sizes):
        return sum(s for s in sizes if s is not None)
    return manifest.database.dump_bytes


@dataclass(frozen=True)
class DatabaseRestore:
    mode: Mode
    jobs: int
    why: str
    stored_bytes: int
    plain_bytes: int
    check: SchemaCheck
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds


@dataclass(frozen=True)
class DumpRestore:
    """One restore of a backup's dump, as its steps share it: `manifest`'s dump from `repo`, opened with
    `backup_key`, into the (empty) database at `dsn` with `clients` (through their prefix: streamed only),
    `jobs` tables at a time where the dump allows it, scratch files under `scratch` (None: TMPDIR);
    `loaders`: side-by-side loaders of the fallback load (feed.load_parallel); `verified`: see below."""

    repo: Repository
    manifest: Manifest
    backup_key: bytes | None
    dsn: str
    clients: RestoreClients
    jobs: int = 2
    scratch: Path | None = None
    progress: Progress = silent
    loaders: int = 1
    # The artifact's SHA-256 was checked against the manifest just before (restore_drill's verify step): the
    # stream is not hashed a second time. Its records are still authenticated, its end still checked.
    verified: bool = False


async def restore_database(ctx: DumpRestore) -> DatabaseRestore:
    """Restore the dump of `ctx` into the (empty) database at its `dsn`, then check it against the backup."""
    started = time.monotonic()
    manifest, dsn, progress = ctx.manifest, ctx.dsn, ctx.progress
    folder = Path(ctx.scratch or tempfile.gettempdir())
    free = await anyio.to_thread.run_sync(_free_space, folder)
    choice = choose_mode(manifest, ctx.jobs, free, prefixed=bool(ctx.clients.prefix))
    dumps = [a for a in manifest.artifacts if a.kind == "database"]
    if not dumps or (len(dumps) != 1 and choice.mode != "directory"):
        raise IntegrityError(f"the manifest of {manifest.backup_id} lists {len(dumps)} database dump artifacts",
                             "choose another recovery point")  # fmt: skip
    await refuse_non_empty(dsn)
    prefix = backup_prefix(manifest.backup_id)
    timings: dict[str, float] = {}
    await progress(0, 2, f"restoring the database: {choice.why}")
    with tempfile.TemporaryDirectory(prefix="engram-restore-", dir=folder if free is not None else None) as work:
        plain = Path(work) / "dump"
        if choice.mode == "directory":
            plain_bytes, toc = await _directory(ctx, choice.jobs, plain, timings)
        elif choice.mode == "parallel":
            stream = plaintext(ctx.repo, prefix + dumps[0].name, dumps[0], ctx.backup_key, hashed=not ctx.verified)
            load = Load(dsn, ctx.clients.pg_restore, choice.jobs, Path(work) / "head.dump", timings, ctx.loaders)
            plain_bytes, toc_text = await load_split(stream, load)
            toc = parse_toc(toc_text)
        else:
            stream = plaintext(ctx.repo, prefix + dumps[0].name, dumps[0], ctx.backup_key, hashed=not ctx.verified)
            plain_bytes, toc = await _streamed(stream, ctx, timings)
    await progress(1, 2, f"restored {plain_bytes} bytes of dump; checking tables, constraints, indexes and row counts")
    mark = time.monotonic()
    check = await check_restored(dsn, manifest, toc)
    await progress(2, 2, check.summary)
    timings["verify"] = time.monotonic() - mark
    timings["total"] = time.monotonic() - started
    return DatabaseRestore(choice.mode, choice.jobs, choice.why, sum(a.size for a in dumps), plain_bytes, check,
                           {k: round(v, 3) for k, v in timings.items()})  # fmt: skip


class _Decode:
    """One stored chunk's decryption, then decompression into the codec's pieces (passed on as they are:
    joining them would copy every byte of the dump once more), in one worker-thread call."""

    def __init__(self, decryptor: Decryptor | None, codec: Decompressor) -> None:
        self.decryptor, self.codec = decryptor, codec

    def __call__(self, chunk: bytes) -> list[bytes]:
        plain = self.decryptor.update(chunk) if self.decryptor is not None else chunk
        return self.codec.pieces(plain) if plain else []

    def finish(self) -> list[bytes]:
        if self.decryptor is not None:
            self.decryptor.finish()
        tail = self.codec.finish()
        return [tail] if tail else []


async def plaintext(
    repo: Repository, key: str, artifact: Artifact, backup_key: bytes | None, *, hashed: bool = True
) -> AsyncGenerator[bytes]:
    """The artifact as pg_dump wrote it: read (and, `hashed`, checked against the manifest's SHA-256) ahead
    while each chunk is decrypted and decompressed."""
    if artifact.encryption is not None and backup_key is None:
        raise ConfigurationError(
            f"{artifact.name} is encrypted but ENGRAM_RECOVERY_BACKUP_KEY is not set",
            "set ENGRAM_RECOVERY_BACKUP_KEY or ENGRAM_RECOVERY_BACKUP_KEY_FILE to the backup key",
        )
    decode = _Decode(Decryptor(backup_key) if artifact.encryption is not None and backup_key is not None else None,
                     decompressor(artifact.compression))  # fmt: skip
    raw_send, raw_receive = anyio.create_memory_object_stream[bytes](_PIPELINE_DEPTH)
    out_send, out_receive = anyio.create_memory_object_stream[bytes](_PIPELINE_DEPTH * 4)
    digest, stored = hashlib.sha256(), [0]

    async def read() -> None:
        async with raw_send:
            async for chunk in repo.get_stream(key, READ_CHUNK * 4):
                stored[0] += len(chunk)
                if hashed:
                    # In a thread (hashlib lets go of the GIL): the check overlaps decoding instead of adding to it.
                    await anyio.to_thread.run_sync(digest.update, chunk)
                await raw_send.send(chunk)

    # Decryption and decompression take one worker-thread call per stored chunk, not one each: on a
    # machine whose cores the server's COPYs keep busy, each hand-off between threads is CPU the
    # server does not get, and the decoding is far ahead of the loaders anyway.
    async def decode_all() -> None:
        async with out_send, raw_receive:
            async for chunk in raw_receive:
                for piece in await anyio.to_thread.run_sync(decode, chunk):
                    await out_send.send(piece)
            for piece in await anyio.to_thread.run_sync(decode.finish):  # raises on a truncated artifact
                await out_send.send(piece)

    async with task_group() as tg:
        tg.start_soon(read)
        tg.start_soon(decode_all)
        async with out_receive:
            async for data in out_receive:
                yield data
    if (stored[0], digest.hexdigest() if hashed else artifact.sha256) != (artifact.size, artifact.sha256):
        # An unencrypted artifact has no authentication of its own: this is what catches its alteration.
        actual = digest.hexdigest()
        raise IntegrityError(f"{artifact.name} is not what the backup stored ({stored[0]} bytes, SHA-256 "
                             f"{actual[:16]}..., recorded {artifact.size} bytes, {artifact.sha256[:16]}...)",
                             "the target database holds a restore of an altered dump: drop it, then restore another "
                             "recovery point or another copy of the repository")  # fmt: skip


async def _streamed(
    stream: AsyncGenerator[bytes], ctx: DumpRestore, timings: dict[str, float]
) -> tuple[int, list[TocEntry]]:
    """One pass into stdin, through the clients' prefix."""
    mark = time.monotonic()
    manifest, dsn, clients = ctx.manifest, ctx.dsn, ctx.clients
    command = stdin_restore(manifest.database.dump_format, clients, dsn, application=APPLICATION)
    if manifest.database.dump_format == "plain":
        async with aclosing(stream):  # psql may stop reading early: the decryption pipeline ends here too
            total = await feed_all(Feed(command, STOCK_FIX, drain=False), stream)
        timings["decrypt_and_restore"] = time.monotonic() - mark
        return total, []
    # The TOC is at the head of a custom dump: `pg_restore --list` reads it from the same stream and stops.
    lister = feed(restore_into(clients.pg_restore, dsn, list_only=True, prefix=clients.prefix), keep_stdout=True)
    list_send, list_receive = anyio.create_memory_object_stream[bytes](_PIPELINE_DEPTH)
    load_send, load_receive = anyio.create_memory_object_stream[bytes](_PIPELINE_DEPTH)
    fed = [0]

    async def restore() -> None:
        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in load_receive:
                yield chunk

        # Closed here, in the task that reads it, however feed_all ends (it may stop reading early).
        async with load_receive:
            fed[0] = await feed_all(Feed(command, STOCK_FIX, drain=False), chunks())

    async with task_group() as tg:
        tg.start_soon(lister.run, list_receive)
        tg.start_soon(restore)
        tg.start_soon(tee, stream, [load_send, list_send])
    timings["decrypt_and_restore"] = time.monotonic() - mark
    return fed[0], parse_toc(lister.stdout.decode(errors="replace"))


async def _directory(ctx: DumpRestore, jobs: int, plain: Path, timings: dict[str, float]) -> tuple[int, list[TocEntry]]:
    """The directory's files decrypted into `plain`, `jobs` at a time (at most one a core), then pg_restore."""
    repo, manifest, dsn, pg_restore = ctx.repo, ctx.manifest, ctx.dsn, ctx.clients.pg_restore
    mark = time.monotonic()
    await anyio.to_thread.run_sync(lambda: plain.mkdir(parents=True))
    limiter = anyio.CapacityLimiter(max(1, min(jobs, os.cpu_count() or 1)))
    total = [0]

    async def one(artifact: Artifact) -> None:
        async with limiter:
            target = plain / backup_extract.plain_name(artifact.name.split("/", 1)[1])
            done = await backup_extract.extract(repo.get_stream(artifact_key(manifest.backup_id, artifact.name)),
                                                ctx.backup_key, target, artifact.sha256)  # fmt: skip
            total[0] += done.plain_bytes

    async with task_group() as tg:
        for name in manifest.database.dump_artifacts:
            artifact = manifest.artifact(name)
            assert artifact is not None
            tg.start_soon(one, artifact)
    timings["decrypt"] = time.monotonic() - mark
    mark = time.monotonic()
    await run(restore_into(pg_restore, dsn, jobs=jobs, source=str(plain)), FIX, "pg_restore")
    timings["restore"] = time.monotonic() - mark
    toc = await run(restore_into(pg_restore, dsn, list_only=True, source=str(plain)), FIX, "pg_restore --list")
    return total[0], parse_toc(toc)
