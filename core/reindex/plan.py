"""What a reindex selects and how it sizes its batches: SQL text and pure arithmetic, no I/O.

Every statement walks `notes` by primary key (keyset pagination), so each batch
is one index range scan however large the table, and only notes a re-embed can
use are touched: `kind = 'note'` where that column exists, not deleted, in a
vault that is not deleted (FACTS.md, "Re-embedding through Oban").
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal

from ..engram.oban import ObanTarget, not_queued, pending_note_ids_sql
from ..engram.schema_probe import SchemaProbe
from ..errors import ConfigurationError

Mode = Literal["all", "missing", "stale"]
# Below every uuid PostgreSQL or Engram generates (uuidv7 and v4 are never all zero),
# so `id > NIL` starts a keyset walk at the first note.
NIL = uuid.UUID(int=0)
# AES-GCM appends a 16-byte tag to every ciphertext; ~4 bytes of text per embedding token.
GCM_TAG_BYTES = 16
BYTES_PER_TOKEN = 4
NOTE_COLUMNS = frozenset(
    {"id", "user_id", "vault_id", "content_hash", "embed_hash", "deleted_at", "content_ciphertext"}
)


@dataclass(frozen=True)
class BatchPolicy:
    """Batches are sized by time: Engram's own writes to notes wait at most one batch.

    The target sits well below the ~1 s ceiling because a batch that follows a checkpoint
    pays full-page writes on every page it touches: measured at 1M notes, such batches
    took up to 5x their predecessor.
    """

    target_seconds: float = 0.3
    initial: int = 1_000
    minimum: int = 100
    maximum: int = 100_000

    def next_size(self, size: int, seconds: float) -> int:
        """The next batch's size from how long this one took; at most doubles, at most halves."""
        if seconds <= 0:
            return min(self.maximum, size * 2)
        factor = min(2.0, max(0.5, self.target_seconds / seconds))
        return max(self.minimum, min(self.maximum, int(size * factor)))


@dataclass(frozen=True)
class Scope:
    user_id: uuid.UUID | None = None
    vault_id: uuid.UUID | None = None


@dataclass(frozen=True)
class NoteTable:
    schema: str
    has_kind: bool
    has_retry_after: bool
    has_dense_hash: bool

    @classmethod
    def detect(cls, probe: SchemaProbe) -> NoteTable:
        missing = NOTE_COLUMNS - probe.columns.get("notes", frozenset())
        if not probe.has_table("vaults") or missing:
            raise ConfigurationError(
                "this database does not look like Engram's: notes/vaults are missing"
                + (f" (notes lacks {', '.join(sorted(missing))})" if missing and probe.has_table("notes") else ""),
                "point DATABASE_URL at Engram's database",
            )
        return cls(
            schema=probe.schema,
            has_kind=probe.has_column("notes", "kind"),
            has_retry_after=probe.has_column("notes", "embed_retry_after"),
            has_dense_hash=probe.has_column("notes", "dense_indexed_hash"),
        )

    def t(self, table: str) -> str:
        return '"' + self.schema.replace('"', '""') + '".' + table

    @property
    def reset_columns(self) -> list[str]:
        """What EmbedNote's skip test and the reconcile sweep read: all must be cleared for a real re-embed."""
        cols = ["embed_hash"]
        if self.has_retry_after:
            cols.append("embed_retry_after")
        if self.has_dense_hash:
            cols.append("dense_indexed_hash")
        return cols


def parse_uuid(value: str | None, what: str) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        raise ConfigurationError(
            f"{what} {value!r} is not a uuid", f"pass the {what} as a uuid such as 0190b1a0-7c1e-7d3a-9f00-1a2b3c4d5e6f"
        ) from None


@dataclass(frozen=True)
class Statements:
    """The SQL of one run; parameters: $1 = lower bound (exclusive), $2 = upper bound (inclusive) or limit."""

    bound: str
    update: str
    queued_untouched: str
    chunks: str
    unembedded: str
    count: str
    count_missing: str

    @classmethod
    def build(cls, notes: NoteTable, target: ObanTarget, scope: Scope, mode: Mode, tenant: bool) -> Statements:
        # Scope ids are validated uuids, so they can be inlined: the text of each statement stays
        # fixed for the run and PostgreSQL plans it once.
        scope_sql = ""
        chunk_scope = ""
        if scope.user_id is not None:
            scope_sql += f" AND n.user_id = '{scope.user_id}'"
            chunk_scope += f" AND c.user_id = '{scope.user_id}'"
        if scope.vault_id is not None:
            scope_sql += f" AND n.vault_id = '{scope.vault_id}'"
            chunk_scope += f" AND c.vault_id = '{scope.vault_id}'"
        if tenant:
            # Row-level security filters to the tenant anyway; saying it lets the planner use user indexes.
            scope_sql += " AND n.user_id = current_setting('app.current_tenant', true)::uuid"
        eligible = (
            f" AND n.deleted_at IS NULL AND EXISTS (SELECT 1 FROM {notes.t('vaults')} v "
            "WHERE v.id = n.vault_id AND v.deleted_at IS NULL)"
        )
        if notes.has_kind:
            eligible += " AND n.kind = 'note'"
        mode_sql = {
            "all": "",
            "stale": " AND (n.embed_hash IS NULL OR n.embed_hash <> n.content_hash)",
            "missing": " AND n.id = ANY($3::uuid[])",
        }[mode]
        sets = ", ".join(f"{c} = NULL" for c in notes.reset_columns)
        where = f"n.id > $1 AND n.id <= $2{scope_sql}{eligible}{mode_sql}"
        # A pending EmbedNote job skips a note whose embed_hash equals its content_hash (FACTS.md): such notes
        # are reset too, but get no second job. Checked first, so a fresh note costs no probe in the WHERE.
        dirty = "(" + " OR ".join(f"n.{c} IS NOT NULL" for c in notes.reset_columns) + ")"
        free = not_queued(target, "n.id::text", fenced=True)
        token_bytes = f"greatest(coalesce(octet_length(n.content_ciphertext), 0) - {GCM_TAG_BYTES}, 0)"
        count_select = (
            "SELECT n.user_id, n.vault_id, count(*) FILTER (WHERE q.note_id IS NULL) AS would, "
            "count(*) FILTER (WHERE q.note_id IS NOT NULL) AS queued, "
            f"coalesce(sum({token_bytes}) FILTER (WHERE q.note_id IS NULL), 0)::bigint AS bytes "
            f"FROM {notes.t('notes')} n LEFT JOIN ({pending_note_ids_sql(target)}) q ON q.note_id = n.id::text "
        )
        return cls(
            bound=(
                # PostgreSQL before 16 has no max(uuid); the inner LIMIT bounds the sort.
                f"SELECT b.id FROM (SELECT n.id FROM {notes.t('notes')} n WHERE n.id > $1{scope_sql} "
                "ORDER BY n.id LIMIT $2) b ORDER BY b.id DESC LIMIT 1"
            ),
            update=(
                f"UPDATE {notes.t('notes')} n SET {sets} WHERE {where} AND ({dirty} OR {free}) "
                f"RETURNING n.id, n.user_id, n.vault_id, {token_bytes} AS bytes, NOT ({free}) AS queued"
            ),
            # What `update` leaves alone: notes already queued whose embed state is already clear.
            queued_untouched=(
                f"SELECT n.user_id, n.vault_id, count(*) AS n FROM {notes.t('notes')} n WHERE {where} "
                f"AND NOT {dirty} AND NOT ({free}) GROUP BY n.user_id, n.vault_id"
            ),
            chunks=(
                f"SELECT c.note_id, c.qdrant_point_id FROM {notes.t('chunks')} c "
                f"WHERE c.note_id > $1 AND c.note_id <= $2{chunk_scope}"
            ),
            # Never embedded: no chunk at all, so no point to find missing in Qdrant either.
            unembedded=(
                f"SELECT n.id FROM {notes.t('notes')} n WHERE n.id > $1 AND n.id <= $2{scope_sql}{eligible} "
                f"AND n.embed_hash IS NULL AND NOT EXISTS (SELECT 1 FROM {notes.t('chunks')} c WHERE c.note_id = n.id)"
            ),
            count=(
                f"{count_select} WHERE TRUE{scope_sql}{eligible}{mode_sql if mode != 'missing' else ''} "
                "GROUP BY n.user_id, n.vault_id ORDER BY n.user_id, n.vault_id"
            ),
            count_missing=(
                f"{count_select} WHERE n.id = ANY($1::uuid[]){scope_sql}{eligible} "
                "GROUP BY n.user_id, n.vault_id ORDER BY n.user_id, n.vault_id"
            ),
        )


def estimated_tokens(content_bytes: int) -> int:
    """Embedding tokens of this much ciphertext: an estimate (ciphertext length tracks plaintext length)."""
    return content_bytes // BYTES_PER_TOKEN
