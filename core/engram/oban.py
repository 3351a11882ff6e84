"""Enqueueing Engram's EmbedNote jobs straight into `oban_jobs`, set-based.

Rows must be indistinguishable from what `Oban.insert_all` writes for
`Engram.Workers.EmbedNote` (lib/oban/engines/basic.ex inserts `Job.to_map`, which
drops nil fields, so `inserted_at`/`scheduled_at` come from the column defaults).
Oban's free engine enforces uniqueness only in Elixir, so de-duplication against
incomplete jobs is ours: a NOT EXISTS that Engram's partial index on
`(args->>'note_id')` serves with one index probe per note.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from ..errors import ConfigurationError
from ..stores.postgres import quote_ident
from .schema_probe import SchemaProbe

EMBED_WORKER = "Engram.Workers.EmbedNote"
EMBED_QUEUE = "embed"
MAX_ATTEMPTS = 5
# Oban fetches priority ASC; 9 is Engram's backfill priority, behind every live edit (0).
BACKFILL_PRIORITY = 9
# Oban's "incomplete" states; `suspended` only exists from migration 14 on.
INCOMPLETE_STATES = ("available", "scheduled", "executing", "retryable", "suspended")
# The states Engram's partial index (migration 20260702110000) covers. The query must
# spell them exactly like this, as literals, or the planner cannot prove the index applies.
INDEXED_STATES = ("scheduled", "available", "executing", "retryable")
SUPPORTED_VERSIONS = range(11, 15)
REQUIRED_COLUMNS = frozenset(
    {"state", "queue", "worker", "args", "meta", "tags", "errors", "attempt", "max_attempts", "priority"}
)
NOTIFY_PAYLOAD = '{"queue":"embed"}'


@dataclass(frozen=True)
class ObanTarget:
    """The deployed Oban table, as detected: what the SQL below is built for."""

    schema: str
    version: int
    note_index: str | None
    """Name of the partial index on (args->>'note_id') for incomplete EmbedNote jobs, if present."""

    @property
    def table(self) -> str:
        return f"{quote_ident(self.schema)}.oban_jobs"

    @property
    def channel(self) -> str:
        # Oban.Notifiers.Postgres prefixes every channel with the Oban prefix (the schema).
        return f"{self.schema}.oban_insert"

    @property
    def has_suspended(self) -> bool:
        return self.version >= 14

    @property
    def incomplete_states(self) -> tuple[str, ...]:
        return INCOMPLETE_STATES if self.has_suspended else INCOMPLETE_STATES[:4]


async def detect(conn: asyncpg.Connection, probe: SchemaProbe) -> ObanTarget:
    """The Oban table this tool can write to, or a clear refusal."""
    if not probe.has_table("oban_jobs"):
        raise ConfigurationError(
            f"this database has no oban_jobs table in schema {probe.schema}, so EmbedNote jobs cannot be enqueued",
            "point DATABASE_URL at Engram's own database (the one its Oban runs on), after its migrations ran",
        )
    version = probe.oban_version or 0
    if version not in SUPPORTED_VERSIONS:
        raise ConfigurationError(
            f"oban_jobs carries Oban migration version {version or 'unknown'} (its table comment); this tool "
            f"writes jobs for versions {SUPPORTED_VERSIONS.start} to {SUPPORTED_VERSIONS.stop - 1} only",
            "upgrade engram-recovery to a release that knows this Oban version, or let Engram's own "
            "ReconcileEmbeddings sweep re-enqueue the notes",
        )
    missing = REQUIRED_COLUMNS - probe.columns["oban_jobs"]
    if missing:
        raise ConfigurationError(
            f"oban_jobs lacks the column(s) {', '.join(sorted(missing))} that Oban {version} always has",
            "the table is not a standard Oban table; do not write to it with this tool",
        )
    rows = await conn.fetch(
        """
        SELECT i.relname AS name, pg_get_expr(x.indexprs, x.indrelid) AS expr,
               pg_get_expr(x.indpred, x.indrelid) AS pred
        FROM pg_index x
        JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        WHERE n.nspname = $1 AND t.relname = 'oban_jobs' AND x.indisvalid AND x.indexprs IS NOT NULL
        """,
        probe.schema,
    )
    note_index = next(
        (
            r["name"]
            for r in rows
            if "note_id" in (r["expr"] or "")
            and EMBED_WORKER in (r["pred"] or "")
            and all(s in (r["pred"] or "") for s in INDEXED_STATES)
        ),
        None,
    )
    return ObanTarget(schema=probe.schema, version=version, note_index=note_index)


def not_queued(target: ObanTarget, note_id_text: str, *, fenced: bool) -> str:
    """SQL: no incomplete EmbedNote job exists for the note whose id (as text) is `note_id_text`.

    `fenced` keeps each probe a correlated sub-plan (OFFSET 0 stops the planner
    from turning it into a join): one index probe per note whatever the table
    statistics say. Without it a plan chosen while oban_jobs looked empty can
    scan a million-row table once per note.
    """
    fence = " OFFSET 0" if fenced else ""
    states = ", ".join(f"'{s}'" for s in INDEXED_STATES)
    # Without Engram's partial index the GIN index Oban creates on args answers containment.
    gin = "" if target.note_index else f" AND j.args @> jsonb_build_object('note_id', {note_id_text})"
    clause = (
        f"NOT EXISTS (SELECT 1 FROM {target.table} j WHERE j.worker = '{EMBED_WORKER}' "
        f"AND j.state IN ({states}) AND (j.args ->> 'note_id') = {note_id_text}{gin}{fence})"
    )
    if target.has_suspended:
        # Outside the partial index; Oban's (state, queue, ...) index finds the rare suspended jobs.
        clause += (
            f" AND NOT EXISTS (SELECT 1 FROM {target.table} j WHERE j.state = 'suspended' "
            f"AND j.queue = '{EMBED_QUEUE}' AND j.worker = '{EMBED_WORKER}' "
            f"AND (j.args ->> 'note_id') = {note_id_text}{fence})"
        )
    return clause


def pending_note_ids_sql(target: ObanTarget) -> str:
    """SQL: the note ids (text) that have an incomplete EmbedNote job, for one hash join in a count."""
    states = ", ".join(f"'{s}'" for s in target.incomplete_states)
    return (
        f"SELECT DISTINCT j.args ->> 'note_id' AS note_id FROM {target.table} j "
        f"WHERE j.worker = '{EMBED_WORKER}' AND j.state IN ({states})"
    )


def insert_jobs_sql(target: ObanTarget) -> str:
    """SQL taking $1 uuid[]: insert one EmbedNote job per id not already queued; returns the count.

    Exactly the columns `Oban.Job.to_map` sends for `EmbedNote.new(%{note_id: id},
    priority: 9)` via `Oban.insert_all`; timestamps are left to the defaults (UTC).
    """
    return (
        f"WITH ins AS (INSERT INTO {target.table} "
        "(state, queue, worker, args, meta, tags, errors, attempt, max_attempts, priority) "
        f"SELECT 'available', '{EMBED_QUEUE}', '{EMBED_WORKER}', jsonb_build_object('note_id', u.id::text), "
        f"'{{}}'::jsonb, '{{}}'::text[], '{{}}'::jsonb[], 0, {MAX_ATTEMPTS}, {BACKFILL_PRIORITY} "
        f"FROM unnest($1::uuid[]) AS u(id) WHERE {not_queued(target, 'u.id::text', fenced=True)} "
        "ORDER BY u.id RETURNING 1) SELECT count(*) FROM ins"
    )


async def can_analyze(conn: asyncpg.Connection, target: ObanTarget) -> bool:
    """ANALYZE needs the table's owner (or a member of it) or a superuser; others get only a warning."""
    return bool(
        await conn.fetchval(
            "SELECT r.rolsuper OR pg_has_role(current_user, c.relowner, 'USAGE') "
            "FROM pg_class c, pg_roles r WHERE c.oid = $1::regclass AND r.rolname = current_user",
            target.table,
        )
    )


async def notify_insert(conn: asyncpg.Connection, target: ObanTarget) -> None:
    """Wake Oban's producers for the embed queue (delivered when the transaction commits)."""
    await conn.execute("SELECT pg_notify($1, $2)", target.channel, NOTIFY_PAYLOAD)


@dataclass(frozen=True)
class Backlog:
    by_state: dict[str, int]
    discarded: int

    @property
    def total(self) -> int:
        return sum(self.by_state.values())


async def embed_backlog(conn: asyncpg.Connection, target: ObanTarget) -> Backlog:
    """EmbedNote jobs still to run, by state; each state is one range of Oban's state index."""
    # Literal states (not a text[] parameter) so each is a range of Oban's (state, queue, ...) index.
    states = ", ".join(f"'{s}'" for s in (*target.incomplete_states, "discarded"))
    rows = await conn.fetch(
        f"SELECT state::text AS state, count(*) AS n FROM {target.table} "
        f"WHERE state IN ({states}) AND queue = $1 AND worker = $2 GROUP BY state",
        EMBED_QUEUE,
        EMBED_WORKER,
    )
    counts = {r["state"]: int(r["n"]) for r in rows}
    by_state = {s: counts.get(s, 0) for s in target.incomplete_states}
    return Backlog(by_state=by_state, discarded=counts.get("discarded", 0))


