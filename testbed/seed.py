"""Fill an Engram-shaped database with realistic rows, encrypted with real keys.

Every ciphertext is what Engram itself would write: per-user random DEKs wrapped
v2 under the master key, AAD-bound row fields (``dek_version`` 2), per-user
content hashes, a boot canary. Recovery tools are then tested against Engram's
real formats, and a test can prove a restore by decrypting what it restored.

The seeder adapts to the schema variant it finds (columns are detected, not
assumed) and streams notes through COPY in batches generated in a worker thread,
so a million notes take minutes and memory stays flat.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import anyio
import anyio.to_thread
import asyncpg

# Absolute on purpose: `mypy tests` checks tests/testbed/ as a package named `testbed`, which
# resolves to this directory, and a `..core` import would then climb above the top level.
from engram_recovery.core.engram import crypto as ec
from engram_recovery.core.taskgroups import task_group

from ._bulk import (
    ATTACHMENT_COLUMNS,
    CHUNK_COLUMNS,
    NOTE_COLUMNS,
    STORAGE_COLUMNS,
    AttachmentSample,
    Batch,
    BulkFactory,
    NoteSample,
)
from ._tables import (
    columns_of,
    copy_rows,
    write_canaries,
    write_oban_jobs,
    write_tokens,
    write_users,
    write_vaults,
)

__all__ = ["AttachmentSample", "NoteSample", "ProgressFn", "SeedReport", "seed"]

ProgressFn = Callable[[float, float | None, str | None], Awaitable[None]]
_SEEDED_TABLES = (
    *("users", "vaults", "notes", "chunks", "attachments", "storage_objects", "oauth_clients", "refresh_tokens"),
    *("device_refresh_tokens", "oauth_refresh_tokens", "api_keys", "api_key_vaults", "oban_jobs", "system_canaries"),
)


@dataclass
class SeedReport:
    """What was written, and the secrets a test needs to check it (never log this)."""

    user_ids: list[uuid.UUID]
    deks: dict[uuid.UUID, bytes]
    vault_ids: dict[uuid.UUID, list[uuid.UUID]]
    deleted_vault_ids: list[uuid.UUID]
    counts: dict[str, int] = field(default_factory=dict)
    notes_per_user: dict[uuid.UUID, int] = field(default_factory=dict)
    live_notes: int = 0
    deleted_notes: int = 0
    folder_markers: int = 0
    eligible_notes: int = 0
    """Notes a reindex must embed: kind 'note', not deleted, in a live vault."""
    pending_embeds: int = 0
    """Eligible notes whose embed_hash is NULL or stale, i.e. not skipped by EmbedNote today."""
    canary_dek_sha256: bytes | None = None
    sample_notes: list[NoteSample] = field(default_factory=list)
    sample_attachments: list[AttachmentSample] = field(default_factory=list)
    attachment_objects: list[tuple[str, bytes]] = field(default_factory=list)
    """For storage="s3": (key, encrypted bytes) the caller must upload."""
    embed_job_note_ids: list[uuid.UUID] = field(default_factory=list)
    """Notes with an incomplete EmbedNote job (available/scheduled/executing/retryable)."""
    seconds: float = 0.0


async def seed(
    conn: asyncpg.Connection,
    *,
    master_key: bytes,
    users: int,
    vaults_per_user: int,
    notes: int,
    attachments: int,
    attachment_size: int = 4096,
    storage: Literal["database", "s3"] = "database",
    deleted_fraction: float = 0.05,
    folder_fraction: float = 0.05,
    with_canary: bool = True,
    retired_canaries: int = 1,
    embedded: bool = True,
    seed: int = 0,
    progress: ProgressFn | None = None,
    note_size: int = 1200,
    batch_size: int = 20_000,
) -> SeedReport:
    """Write users, vaults, ``notes`` notes (folder markers and soft-deleted ones included) and the rest.

    ``conn`` must see every row (superuser or BYPASSRLS). ``note_size`` is the
    mean body size in bytes; bodies vary from a quarter to 1.75 times it.
    ``retired_canaries`` older canary rows wrapped under a long-gone master key
    sit below the current one, as after a key rotation: only the newest counts.
    """
    _check_arguments(master_key, users, vaults_per_user, notes, attachments, storage, note_size, batch_size)
    started = time.perf_counter()
    columns = await columns_of(conn)
    if not {"users", "vaults", "notes"} <= columns.keys():
        raise ValueError("no Engram schema in this database; run create_engram_schema first")
    can_see_all = await conn.fetchval("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user")
    if not can_see_all:
        raise ValueError("seeding writes every tenant's rows: connect as a superuser or a BYPASSRLS role")
    rng = random.Random(seed)
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    counts = {t: 0 for t in _SEEDED_TABLES if t in columns}
    async with conn.transaction():
        superuser = await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        if superuser:
            # The rows are consistent by construction (the tests check it), so the per-row
            # foreign-key triggers are skipped: at a million notes they cost more than the data.
            await conn.execute("SET LOCAL session_replication_role = replica")
        rebuild = await _drop_secondary_indexes(conn, ("notes", "chunks", "attachments"))
        keys = await write_users(conn, rng, master_key, users, now, columns, counts)
        vaults = await write_vaults(conn, rng, keys, vaults_per_user, now, columns, counts)
        report = SeedReport(
            user_ids=[k.user_id for k in keys],
            deks={k.user_id: k.dek for k in keys},
            vault_ids={k.user_id: [v.id for v in vaults if v.user is k] for k in keys},
            deleted_vault_ids=[v.id for v in vaults if v.deleted],
        )
        factory = BulkFactory(
            rng=rng,
            vaults=vaults,
            now=now,
            note_size=note_size,
            deleted_fraction=deleted_fraction,
            folder_fraction=folder_fraction,
            embedded=embedded,
            note_columns=columns["notes"],
            sample_every=max(1, notes // 16),
        )
        writer = _Writer(conn, columns, counts, storage, now, report)
        await _pipeline(lambda n: factory.notes(n), notes, batch_size, writer.write, progress, "notes")
        await _pipeline(
            lambda n: factory.attachments(n, attachment_size),
            attachments,
            max(1, min(batch_size, (64 << 20) // max(1, attachment_size))),
            writer.write,
            progress,
            "attachments",
        )
        await write_tokens(conn, rng, keys, vaults, now, columns, counts)
        report.embed_job_note_ids = await write_oban_jobs(conn, factory.tally.unembedded_note_ids, now, columns, counts)
        if with_canary and "system_canaries" in columns:
            report.canary_dek_sha256 = await write_canaries(
                conn, rng, master_key, retired_canaries, now, columns, counts
            )
        # Building an index once over all rows is far cheaper than updating it row by row.
        for statement in rebuild:
            await conn.execute(statement)
        if "change_seq" in columns["vaults"]:
            await conn.executemany("UPDATE public.vaults SET change_seq = $2 WHERE id = $1", list(factory.seq.items()))
        # In case the caller's own transaction encloses this one.
        await conn.execute("SET LOCAL session_replication_role = DEFAULT")
    # Fresh statistics, so estimates (and the plans a tool's queries get) match the data.
    await conn.execute("ANALYZE " + ", ".join(f"public.{t}" for t in counts))
    tally = factory.tally
    report.counts = counts
    report.notes_per_user = dict(tally.notes_per_user)
    report.live_notes = tally.live_notes
    report.deleted_notes = tally.deleted_notes
    report.folder_markers = tally.folders
    report.eligible_notes = tally.eligible_notes
    report.pending_embeds = tally.pending_embeds
    report.sample_notes = factory.note_samples
    report.sample_attachments = factory.attachment_samples
    report.seconds = time.perf_counter() - started
    return report


def _check_arguments(
    master_key: bytes,
    users: int,
    vaults_per_user: int,
    notes: int,
    attachments: int,
    storage: str,
    note_size: int,
    batch_size: int,
) -> None:
    if len(master_key) != ec.KEY_BYTES:
        raise ValueError(f"the master key must be {ec.KEY_BYTES} raw bytes (decode the base64 first)")
    if users < 1 or vaults_per_user < 1:
        raise ValueError("a seed needs at least one user with one vault")
    if notes < 0 or attachments < 0 or note_size < 16 or batch_size < 1:
        raise ValueError("notes and attachments must be >= 0, note_size >= 16 and batch_size >= 1")
    if storage not in ("database", "s3"):
        raise ValueError(f"storage must be 'database' or 's3', not {storage!r}")


async def _pipeline(
    produce: Callable[[int], Batch],
    total: int,
    batch_size: int,
    write: Callable[[Batch], Awaitable[None]],
    progress: ProgressFn | None,
    label: str,
) -> None:
    """Generate the next batch in a thread while the previous one is being COPYed."""
    send, receive = anyio.create_memory_object_stream[Batch](1)

    async def producer() -> None:
        async with send:
            made = 0
            while made < total:
                size = min(batch_size, total - made)
                await send.send(await anyio.to_thread.run_sync(produce, size))
                made += size

    async with task_group() as tg:
        tg.start_soon(producer)
        done = 0
        async with receive:
            async for batch in receive:
                await write(batch)
                done += batch.size
                if progress is not None:
                    await progress(done, total, f"seeding {label}")


@dataclass
class _Writer:
    conn: asyncpg.Connection
    columns: dict[str, set[str]]
    counts: dict[str, int]
    storage: str
    now: datetime
    report: SeedReport

    async def write(self, batch: Batch) -> None:
        conn, columns, counts = self.conn, self.columns, self.counts
        await copy_rows(conn, "notes", NOTE_COLUMNS, batch.notes, columns, counts)
        await copy_rows(conn, "chunks", CHUNK_COLUMNS, batch.chunks, columns, counts)
        await copy_rows(conn, "attachments", ATTACHMENT_COLUMNS, batch.attachments, columns, counts)
        if self.storage == "s3":
            self.report.attachment_objects.extend(batch.objects)
        else:
            rows = ((key, data, len(data), self.now) for key, data in batch.objects)
            await copy_rows(conn, "storage_objects", STORAGE_COLUMNS, rows, columns, counts)


async def _drop_secondary_indexes(conn: asyncpg.Connection, tables: Sequence[str]) -> list[str]:
    """Drop the indexes of ``tables`` that back no constraint; returns the statements recreating them."""
    rows = await conn.fetch(
        """
        SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS definition
        FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
        WHERE t.relnamespace = 'public'::regnamespace AND t.relname = ANY($1::text[])
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
        """,
        list(tables),
    )
    for r in rows:
        await conn.execute(f"DROP INDEX {r['name']}")
    return [r["definition"] for r in rows]
