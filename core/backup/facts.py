"""What a recovery point records about the database, all read at one consistent moment.

`exported_snapshot` opens a REPEATABLE READ transaction and exports its
snapshot; pg_dump is started with `--snapshot`, so the WAL position, the row
counts, the canary and the dump itself all describe the same instant, even
while Engram keeps writing.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

import anyio
import asyncpg

from ..engram import crypto as engram_crypto
from ..engram.canary import read_canary
from ..engram.keys import MasterKeys
from ..engram.oban import EMBED_WORKER, INCOMPLETE_STATES
from ..engram.schema_probe import SchemaProbe
from ..repository.manifest import CanaryInfo, ObanInfo
from ..stores import postgres
from ..stores.postgres import PostgresError

# The tables whose exact row counts go into the manifest (those this database has).
COUNTED_TABLES = (
    "users", "vaults", "notes", "chunks", "attachments", "storage_objects", "system_canaries",
    "refresh_tokens", "device_refresh_tokens", "oauth_refresh_tokens", "oauth_clients", "api_keys", "oban_jobs",
)


@dataclass
class Snapshot:
    conn: asyncpg.Connection
    snapshot_id: str
    wal_lsn: str | None
    taken_at: datetime


@asynccontextmanager
async def exported_snapshot(dsn: str) -> AsyncIterator[Snapshot]:
    """A transaction whose snapshot pg_dump can import; it stays open until the dump is done."""
    conn = await postgres.connect(dsn)
    try:
        try:
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            row = await conn.fetchrow(
                "SELECT pg_export_snapshot() AS snapshot, now() AS at, "
                "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text AS lsn"
            )
        except PostgresError as exc:
            raise postgres.describe(exc) from exc
        assert row is not None
        yield Snapshot(conn=conn, snapshot_id=str(row["snapshot"]), wal_lsn=row["lsn"], taken_at=row["at"])
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await conn.close(timeout=2)


@dataclass
class DatabaseFacts:
    engram_schema_version: int | None = None
    row_counts: dict[str, int] = field(default_factory=dict)
    roles_referenced: list[str] = field(default_factory=list)
    owner: str | None = None
    object_owners: list[str] = field(default_factory=list)
    extensions: list[str] = field(default_factory=list)
    row_security_tables: list[str] = field(default_factory=list)
    size_bytes: int | None = None
    canary: CanaryInfo = field(default_factory=lambda: CanaryInfo(present=False))
    oban: ObanInfo = field(default_factory=ObanInfo)
    warnings: list[str] = field(default_factory=list)
    # Live attachment rows (not deleted, with a storage key): their keys, for the S3 backend to compare with
    # the bucket; for the database backend, those with no storage_objects row (count, first keys).
    live_attachment_keys: list[str] | None = None
    lacking_in_database: tuple[int, list[str]] | None = None


async def quick_facts(conn: asyncpg.Connection, probe: SchemaProbe, keys: MasterKeys) -> DatabaseFacts:
    """Cheap facts (no table scans): read first, so a problem is known before the dump starts."""
    facts = DatabaseFacts()
    try:
        facts.size_bytes = await conn.fetchval("SELECT pg_database_size(current_database())")
        if probe.has_table("schema_migrations"):
            version = await conn.fetchval("SELECT max(version) FROM schema_migrations")
            facts.engram_schema_version = int(version) if version is not None else None
        facts.roles_referenced = sorted(
            r["role"]
            for r in await conn.fetch(
                """
                SELECT DISTINCT pg_get_userbyid(c.relowner) AS role FROM pg_class c
                JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1
                UNION
                SELECT DISTINCT pg_get_userbyid(a.grantee) FROM pg_class c
                JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a
                WHERE n.nspname = $1 AND a.grantee <> 0
                """,
                probe.schema,
            )
        )
        # What restoring needs from its role: the owner to give the new database, extensions (some need a
        # superuser), and tables under row-level security (their rows restore only with BYPASSRLS).
        facts.owner = await conn.fetchval(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
        )
        facts.object_owners = [r["o"] for r in await conn.fetch(
            "SELECT DISTINCT pg_get_userbyid(c.relowner) AS o FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = $1 ORDER BY 1", probe.schema)]  # fmt: skip
        facts.extensions = [r["e"] for r in await conn.fetch(
            "SELECT extname AS e FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1")]  # fmt: skip
        facts.row_security_tables = [r["t"] for r in await conn.fetch(
            "SELECT c.relname AS t FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND c.relrowsecurity ORDER BY 1", probe.schema)]  # fmt: skip
        if probe.has_table("system_canaries"):
            facts.canary = await _canary(conn, keys)
    except PostgresError as exc:
        raise postgres.describe(exc) from exc
    if not facts.canary.present:
        facts.warnings.append(
            "system_canaries is empty: this recovery point cannot prove which master key it needs, and Engram "
            "would adopt any key at its next boot; boot Engram once with the right key so it writes a canary"
        )
    elif facts.canary.matches_configured_key is False:
        facts.warnings.append(
            "ENCRYPTION_MASTER_KEY does not unwrap this database's canary: the key configured here is not the "
            "one Engram uses; the backup is still taken, but keep the right key with it"
        )
    return facts


async def _canary(conn: asyncpg.Connection, keys: MasterKeys) -> CanaryInfo:
    canary = await read_canary(conn)
    if canary is None:
        return CanaryInfo(present=False)
    wrapped, sha = canary.wrapped_dek, canary.dek_sha256
    matches: bool | None = None
    if keys.current_set:  # set but malformed: it does not match
        try:
            matches = keys.current is not None and engram_crypto.check_canary(keys.current, wrapped, sha) == "match"
        except engram_crypto.EngramCryptoError:
            matches = False
    try:
        wrap = str(engram_crypto.wrap_format(wrapped))
    except engram_crypto.EngramCryptoError:
        wrap = "unknown"
    return CanaryInfo(
        present=True,
        id=canary.id,
        wrapped_dek_b64=base64.b64encode(wrapped).decode(),
        dek_sha256_hex=sha.hex(),
        wrap_format=wrap,
        inserted_at=canary.inserted_at,
        matches_configured_key=matches,
    )


LIVE_ATTACHMENTS = "deleted_at IS NULL AND storage_key IS NOT NULL"
LACKING_SHOWN = 20


async def counted_facts(
    conn: asyncpg.Connection, probe: SchemaProbe, facts: DatabaseFacts, *, blobs_in_database: bool = True
) -> None:
    """Exact row counts, the Oban backlog and live attachments without a blob, inside the snapshot (beside pg_dump)."""
    try:
        for table in COUNTED_TABLES:
            if probe.has_table(table):
                facts.row_counts[table] = int(await conn.fetchval(f'SELECT count(*) FROM "{table}"'))
        # A soft-deleted row without a blob is normal (Engram deletes those blobs); a live one is a lost file.
        if probe.has_column("attachments", "storage_key") and probe.has_column("attachments", "deleted_at"):
            if not blobs_in_database:
                facts.live_attachment_keys = [r["k"] for r in await conn.fetch(
                    f"SELECT storage_key AS k FROM attachments WHERE {LIVE_ATTACHMENTS}")]  # fmt: skip
            elif probe.has_table("storage_objects"):
                lacking = (f"FROM attachments a WHERE a.{LIVE_ATTACHMENTS.replace(' AND ', ' AND a.')} AND NOT "
                           "EXISTS (SELECT 1 FROM storage_objects o WHERE o.storage_key = a.storage_key)")  # fmt: skip
                count = int(await conn.fetchval(f"SELECT count(*) {lacking}"))
                sql = f"SELECT a.storage_key AS k {lacking} ORDER BY 1 LIMIT {LACKING_SHOWN}"
                first = [r["k"] for r in await conn.fetch(sql)] if count else []
                facts.lacking_in_database = (count, first)
        if probe.has_table("oban_jobs"):
            rows = await conn.fetch(
                "SELECT state::text AS state, count(*) AS n, "
                "count(*) FILTER (WHERE worker = $1) AS embed FROM oban_jobs GROUP BY state",
                EMBED_WORKER,
            )
            facts.oban = ObanInfo(
                by_state={r["state"]: int(r["n"]) for r in rows},
                embed_backlog=sum(int(r["embed"]) for r in rows if r["state"] in INCOMPLETE_STATES),
            )
    except PostgresError as exc:
        raise postgres.describe(exc) from exc
