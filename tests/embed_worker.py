"""TEST-ONLY stand-in for Engram's Oban producer and its EmbedNote worker. Not part of the product.

It does what the Engram app would do with the jobs reindex_qdrant enqueues, so a
test can prove the rebuild really rebuilds: claim available `embed` jobs the way
Oban's Basic engine fetches them (priority order, FOR UPDATE SKIP LOCKED, state
executing, attempt + 1), skip a note whose embed_hash equals its content_hash
(EmbedNote's idempotency check), otherwise decrypt the note with its user's real
DEK, embed it with a deterministic local function, replace its chunks (fresh
random point ids) and points, stamp embed_hash, and complete the job.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from qdrant_client import AsyncQdrantClient, models

from engram_recovery.core.engram import crypto as ec
from engram_recovery.core.stores import qdrant

CHUNK_CHARS = 400


def embed(text: str, dims: int) -> list[float]:
    """A deterministic unit vector per text: enough to prove points carry the note's content."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [((digest[i % len(digest)] + i) % 97) / 97.0 + 0.01 for i in range(dims)]
    norm = sum(v * v for v in raw) ** 0.5
    return [v / norm for v in raw]


def keyword_vector(text: str) -> models.SparseVector:
    counts: dict[int, float] = {}
    for word in text.lower().split():
        index = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "big")
        counts[index] = counts.get(index, 0.0) + 1.0
    return models.SparseVector(indices=list(counts), values=list(counts.values()))


@dataclass
class Worker:
    dsn: str
    """A superuser DSN: the real worker runs with skip_tenant_check."""
    client: AsyncQdrantClient
    collection: str
    dims: int
    deks: dict[uuid.UUID, bytes]
    executed: list[tuple[int, uuid.UUID, str]] = field(default_factory=list)
    """(job id, note id, outcome) for every job this worker ran, in order."""

    async def drain(self, batch: int = 50) -> int:
        """Run jobs until no available embed job is left; returns how many ran."""
        conn = await asyncpg.connect(self.dsn)
        ran = 0
        try:
            while jobs := await self._claim(conn, batch):
                for job_id, args in jobs:
                    outcome = await self._perform(conn, uuid.UUID(args["note_id"]))
                    await conn.execute(
                        "UPDATE oban_jobs SET state = 'completed', completed_at = timezone('UTC', now()) "
                        "WHERE id = $1",
                        job_id,
                    )
                    self.executed.append((job_id, uuid.UUID(args["note_id"]), outcome))
                    ran += 1
        finally:
            await conn.close()
        return ran

    async def embed_notes(self, note_ids: list[uuid.UUID]) -> list[str]:
        """Embed notes now, outside Oban (to build the 'before the loss' state)."""
        conn = await asyncpg.connect(self.dsn)
        try:
            return [await self._perform(conn, note_id) for note_id in note_ids]
        finally:
            await conn.close()

    async def _claim(self, conn: asyncpg.Connection, limit: int) -> list[tuple[int, dict[str, Any]]]:
        rows = await conn.fetch(
            """
            WITH subset AS MATERIALIZED (
                SELECT id FROM oban_jobs WHERE state = 'available' AND queue = 'embed'
                ORDER BY priority, scheduled_at, id LIMIT $1 FOR UPDATE SKIP LOCKED)
            UPDATE oban_jobs j SET state = 'executing', attempted_at = timezone('UTC', now()),
                   attempted_by = ARRAY['test-node', 'stand-in'], attempt = j.attempt + 1
            FROM subset WHERE j.id = subset.id AND j.attempt < j.max_attempts
            RETURNING j.id, j.args::text AS args
            """,
            limit,
        )
        return sorted(((r["id"], json.loads(r["args"])) for r in rows), key=lambda r: r[0])

    async def _perform(self, conn: asyncpg.Connection, note_id: uuid.UUID) -> str:
        note = await conn.fetchrow(
            "SELECT n.*, v.deleted_at AS vault_deleted_at FROM notes n JOIN vaults v ON v.id = n.vault_id "
            "WHERE n.id = $1",
            note_id,
        )
        if note is None or note["deleted_at"] is not None or note["vault_deleted_at"] is not None:
            return "discarded"
        if note.get("kind", "note") != "note":
            return "discarded"
        if note["embed_hash"] is not None and note["embed_hash"] == note["content_hash"]:
            return "skipped"
        content = ec.FieldCipher(self.deks[note["user_id"]]).decrypt(
            bytes(note["content_ciphertext"]), bytes(note["content_nonce"]),
            ec.RowField("notes", "content", note_id, note["dek_version"]),
        )
        text = content.decode()
        pieces = [text[i : i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)] or [""]
        old = [str(r[0]) for r in await conn.fetch("SELECT qdrant_point_id FROM chunks WHERE note_id = $1", note_id)]
        if old and await self.client.collection_exists(self.collection):
            await qdrant.delete_points(self.client, self.collection, old)
        if not await self.client.collection_exists(self.collection):
            # Engram creates the collection lazily on the first embed.
            await qdrant.recreate_collection(self.client, self.collection, self.dims)
        points: list[models.PointStruct] = []
        rows: list[tuple[Any, ...]] = []
        now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
        for position, piece in enumerate(pieces):
            point_id = uuid.uuid4()
            start = position * CHUNK_CHARS
            rows.append((uuid.uuid4(), note_id, note["user_id"], note["vault_id"], position, start,
                         start + len(piece), point_id, now))  # fmt: skip
            points.append(
                models.PointStruct(
                    id=str(point_id),
                    vector={qdrant.DENSE_VECTOR: embed(piece, self.dims), qdrant.SPARSE_VECTOR: keyword_vector(piece)},
                    payload={"user_id": str(note["user_id"]), "vault_id": str(note["vault_id"])},
                )
            )
        await self.client.upsert(self.collection, points=points, wait=True)
        async with conn.transaction():
            await conn.execute("DELETE FROM chunks WHERE note_id = $1", note_id)
            await conn.executemany(
                "INSERT INTO chunks (id, note_id, user_id, vault_id, position, char_start, char_end, "
                "qdrant_point_id, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                rows,
            )
            # EmbedNote's optimistic stamp: only if the content did not change meanwhile.
            # EmbedNote also clears a poison cooldown on success.
            retry = ", embed_retry_after = NULL" if "embed_retry_after" in note.keys() else ""
            await conn.execute(
                f"UPDATE notes SET embed_hash = content_hash{retry} WHERE id = $1 AND content_hash = $2",
                note_id,
                note["content_hash"],
            )
        return "embedded"
