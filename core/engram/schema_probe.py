"""The schema probe: what this Engram database really has, detected at run time.

Columns come and go between Engram releases, so tools ask the probe instead of
assuming. It also answers whether the connection can see every row: under
FORCE ROW LEVEL SECURITY a role that is neither superuser nor BYPASSRLS silently
sees zero rows, and pg_dump fails on those tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

TABLES_OF_INTEREST = (
    "users",
    "vaults",
    "notes",
    "chunks",
    "attachments",
    "storage_objects",
    "system_canaries",
    "refresh_tokens",
    "device_refresh_tokens",
    "oauth_refresh_tokens",
    "oauth_clients",
    "api_keys",
    "oban_jobs",
    "schema_migrations",
)


@dataclass(frozen=True)
class SchemaProbe:
    server_version: str
    server_major: int
    schema: str
    role: str
    is_superuser: bool
    bypass_rls: bool
    columns: dict[str, frozenset[str]]
    forced_rls: frozenset[str]
    oban_version: int | None
    engram_schema_version: int | None
    estimates: dict[str, int] = field(default_factory=dict)

    @property
    def sees_all_rows(self) -> bool:
        return self.is_superuser or self.bypass_rls or not self.forced_rls

    def has_table(self, table: str) -> bool:
        return table in self.columns

    def has_column(self, table: str, column: str) -> bool:
        return column in self.columns.get(table, frozenset())

    @property
    def looks_like_engram(self) -> bool:
        return all(self.has_table(t) for t in ("users", "vaults", "notes"))


async def probe(conn: asyncpg.Connection) -> SchemaProbe:
    """One round of catalogue queries (no table scans): cheap enough for every status call."""
    row = await conn.fetchrow(
        """
        SELECT current_setting('server_version') AS version,
               current_setting('server_version_num')::int AS version_num,
               current_schema() AS schema,
               r.rolname AS role, r.rolsuper AS superuser, r.rolbypassrls AS bypassrls
        FROM pg_roles r WHERE r.rolname = current_user
        """
    )
    assert row is not None
    schema: str = row["schema"] or "public"
    column_rows = await conn.fetch(
        """
        SELECT c.relname AS table, a.attname AS column
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND c.relname = ANY($2::text[])
        """,
        schema,
        list(TABLES_OF_INTEREST),
    )
    columns: dict[str, set[str]] = {}
    for r in column_rows:
        columns.setdefault(r["table"], set()).add(r["column"])
    meta = await conn.fetch(
        """
        SELECT c.relname AS table, c.relforcerowsecurity AND c.relrowsecurity AS forced,
               greatest(c.reltuples, 0)::bigint AS estimate,
               obj_description(c.oid, 'pg_class') AS comment
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')
        """,
        schema,
    )
    forced = frozenset(r["table"] for r in meta if r["forced"])
    estimates = {r["table"]: int(r["estimate"]) for r in meta if r["table"] in columns}
    oban_version: int | None = None
    for r in meta:
        if r["table"] == "oban_jobs":
            comment = (r["comment"] or "").strip()
            oban_version = int(comment) if comment.isdigit() else 0
    engram_version: int | None = None
    if "schema_migrations" in columns:
        engram_version = await conn.fetchval("SELECT max(version) FROM schema_migrations")
    return SchemaProbe(
        server_version=str(row["version"]).split()[0],
        server_major=int(row["version_num"]) // 10000,
        schema=schema,
        role=str(row["role"]),
        is_superuser=bool(row["superuser"]),
        bypass_rls=bool(row["bypassrls"]),
        columns={t: frozenset(c) for t, c in columns.items()},
        forced_rls=forced,
        oban_version=oban_version,
        engram_schema_version=int(engram_version) if engram_version is not None else None,
        estimates=estimates,
    )
