"""An Engram-shaped schema, at a chosen release, with Engram's roles and row-level security.

Three variants, so tools can be tested against schemas they must detect rather
than assume:

* ``"older"``: Engram's 2026-06-02 baseline plus the 2026-06-03/04 migrations; no
  ``notes.kind``, ``seq``, ``embed_retry_after``, ``parse_status``,
  ``dense_indexed_hash`` nor ``vaults.change_seq``.
* ``"0.18.1"``: every migration shipped in release 0.18.1 (up to 20260816070000), Engram's
  newest release; the default.
* ``"synthetic-next"``: NOT upstream Engram. 0.18.1 plus three made-up migrations
  (20260827000000..20260831030000): ``notes.dense_indexed_hash`` and two indexes, which
  no Engram release has. It stands for a future release that adds columns, so the
  tools prove they detect columns (and reset ``dense_indexed_hash`` where it exists)
  rather than assume a schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from typing import Final, Literal, get_args

import asyncpg

from engram_recovery.core.stores.postgres import quote_ident

Variant = Literal["older", "0.18.1", "synthetic-next"]
VARIANTS: Final[tuple[Variant, ...]] = get_args(Variant)
DEFAULT_VARIANT: Final[Variant] = "0.18.1"

# Engram's runtime role (lib/engram/release.ex creates it NOINHERIT LOGIN, without
# BYPASSRLS): under FORCE ROW LEVEL SECURITY it sees only the current tenant's rows.
APP_ROLE: Final = "engram_app"
# Owns the tables, like the RDS master `engram_admin` that runs prod migrations:
# neither superuser nor BYPASSRLS, so FORCE ROW LEVEL SECURITY hides rows even from it.
OWNER_ROLE: Final = "engram_owner"
# Like the self-host compose user `engram`: a superuser, which sees every row.
SUPER_ROLE: Final = "engram_super"
# What an operator would create for backups: read-only, with BYPASSRLS.
BACKUP_ROLE: Final = "engram_backup"

_ROLE_ATTRIBUTES: Final[dict[str, dict[str, bool]]] = {
    APP_ROLE: {"rolcanlogin": True, "rolinherit": False, "rolsuper": False, "rolbypassrls": False},
    OWNER_ROLE: {"rolcanlogin": True, "rolsuper": False, "rolbypassrls": False, "rolcreatedb": True},
    SUPER_ROLE: {"rolcanlogin": True, "rolsuper": True},
    BACKUP_ROLE: {"rolcanlogin": True, "rolsuper": False, "rolbypassrls": True},
}
_ATTRIBUTE_KEYWORDS: Final = {
    "rolcanlogin": ("LOGIN", "NOLOGIN"),
    "rolinherit": ("INHERIT", "NOINHERIT"),
    "rolsuper": ("SUPERUSER", "NOSUPERUSER"),
    "rolbypassrls": ("BYPASSRLS", "NOBYPASSRLS"),
    "rolcreatedb": ("CREATEDB", "NOCREATEDB"),
}


@dataclass(frozen=True)
class _Step:
    sql_files: tuple[str, ...]
    versions: tuple[int, ...]
    rls_tables: tuple[str, ...]


_BASELINE = _Step(
    sql_files=("engram_baseline.sql", "oban_v14.sql"),
    versions=(20260602000000, 20260603000000, 20260603000010, 20260604000000, 20260604010000, 20260604020000),
    rls_tables=("api_keys", "attachments", "chunks", "notes", "user_agreements", "vaults", "onboarding_actions"),
)
_RELEASE_0_18_1 = _Step(
    sql_files=("engram_0_18_1.sql",),
    versions=(
        *(20260605000353, 20260605014232, 20260605014354, 20260606082209, 20260607072745, 20260612100000),
        *(20260615120000, 20260616120000, 20260616130000, 20260621012202, 20260624000000, 20260625130000),
        *(20260625140000, 20260629230000, 20260629240000, 20260629250000, 20260702110000, 20260702120000),
        *(20260702130000, 20260702140000, 20260702150000, 20260702150100, 20260703100000, 20260703213751),
        *(20260705120000, 20260706210000, 20260710190000, 20260712120000, 20260730180000, 20260731021500),
        *(20260802020000, 20260802021000, 20260804025327, 20260804025328, 20260804025329, 20260805230858),
        *(20260815060000, 20260816070000),
    ),
    rls_tables=("crdt_update_log", "note_links", "vault_index_states", "vault_index_update_log"),
)
_SYNTHETIC_NEXT = _Step(
    sql_files=("engram_synthetic_next.sql",),
    versions=(20260827000000, 20260828000000, 20260831030000),
    rls_tables=(),
)
_STEPS: Final[dict[Variant, tuple[_Step, ...]]] = {
    "older": (_BASELINE,),
    "0.18.1": (_BASELINE, _RELEASE_0_18_1),
    "synthetic-next": (_BASELINE, _RELEASE_0_18_1, _SYNTHETIC_NEXT),
}


def migration_versions(variant: Variant = DEFAULT_VARIANT) -> tuple[int, ...]:
    """The ``schema_migrations`` rows a database at ``variant`` holds, oldest first."""
    return tuple(v for step in _steps(variant) for v in step.versions)


def rls_tables(variant: Variant = DEFAULT_VARIANT) -> tuple[str, ...]:
    """Tables with ENABLE + FORCE ROW LEVEL SECURITY and a tenant policy at ``variant``."""
    return tuple(t for step in _steps(variant) for t in step.rls_tables)


async def create_engram_schema(conn: asyncpg.Connection, *, variant: Variant = DEFAULT_VARIANT) -> None:
    """Create Engram's tables in ``public`` of an empty database, as ``variant`` has them.

    Run it as a superuser, then `create_roles` to hand the tables to Engram's roles.
    """
    steps = _steps(variant)
    server_version = int(await conn.fetchval("SELECT current_setting('server_version_num')"))
    # Engram's ids default to PostgreSQL 18's uuidv7(); older servers get the closest built-in.
    uuid_default = "uuidv7()" if server_version >= 180000 else "gen_random_uuid()"
    async with conn.transaction():
        await conn.execute(
            "CREATE TABLE public.schema_migrations ("
            " version bigint PRIMARY KEY, inserted_at timestamp(0) without time zone)"
        )
        for step in steps:
            for name in step.sql_files:
                await conn.execute(_read_sql(name).replace("@UUID_DEFAULT@", uuid_default))
            for table in step.rls_tables:
                await conn.execute(_tenant_policy_sql(table))
            await conn.executemany(
                "INSERT INTO public.schema_migrations (version, inserted_at) VALUES ($1, $2)",
                [(v, _migrated_at(v)) for v in step.versions],
            )


async def create_roles(conn: asyncpg.Connection, db_name: str) -> None:
    """Create Engram's roles if missing, give them the tables of ``db_name``, grant as Engram does.

    Roles are cluster-wide and shared by every scratch database, so they are
    created once and never dropped. Call after `create_engram_schema`, connected
    to ``db_name`` as a superuser.
    """
    for role, attributes in _ROLE_ATTRIBUTES.items():
        await _ensure_role(conn, role, attributes)
    owner, app, backup = (quote_ident(r) for r in (OWNER_ROLE, APP_ROLE, BACKUP_ROLE))
    # Engram's Repo drops to engram_app with SET ROLE inside tenant transactions, which
    # needs membership; the migrator role is the one that connects. Granted only once,
    # since concurrent grants of the same cluster-wide membership can collide.
    if not await conn.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", OWNER_ROLE, APP_ROLE):
        await conn.execute(f"GRANT {app} TO {owner}")
    async with conn.transaction():
        await conn.execute(f"GRANT CONNECT ON DATABASE {quote_ident(db_name)} TO {app}, {owner}, {backup}")
        await conn.execute(f"GRANT USAGE, CREATE ON SCHEMA public TO {owner}")
        await conn.execute(f"GRANT USAGE ON SCHEMA public TO {app}, {backup}")
        for kind, name in await _public_objects(conn):
            await conn.execute(f"ALTER {kind} {name} OWNER TO {owner}")
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {app}")
        await conn.execute(f"GRANT SELECT, USAGE ON ALL SEQUENCES IN SCHEMA public TO {app}")
        await conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {backup}")
        await conn.execute(f"GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO {backup}")
        # Later migrations run as the owner; mirror Engram's DEFAULT PRIVILEGES for them.
        await conn.execute(
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA public"
            f" GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {app}"
        )
        await conn.execute(
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA public GRANT SELECT, USAGE ON SEQUENCES TO {app}"
        )


def _steps(variant: str) -> tuple[_Step, ...]:
    if variant not in _STEPS:
        raise ValueError(f"unknown Engram schema variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return _STEPS[variant]


def _read_sql(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _tenant_policy_sql(table: str) -> str:
    # The policy text Engram's migrations use; the sub-select makes PostgreSQL
    # evaluate current_setting once per query instead of once per row.
    tenant = "(SELECT current_setting('app.current_tenant', true))"
    return (
        f"ALTER TABLE public.{table} ENABLE ROW LEVEL SECURITY;"
        f"ALTER TABLE public.{table} FORCE ROW LEVEL SECURITY;"
        f"CREATE POLICY tenant_isolation_{table} ON public.{table}"
        f" USING (user_id::text = {tenant}) WITH CHECK (user_id::text = {tenant});"
    )


def _migrated_at(version: int) -> datetime:
    # Only the date is used: Engram has a version whose time part reads 25:00:00 (20260629250000).
    # A deploy lands some hours after the migration was written; the exact lag is irrelevant.
    return datetime.strptime(str(version)[:8], "%Y%m%d") + timedelta(hours=30)


async def _ensure_role(conn: asyncpg.Connection, role: str, attributes: dict[str, bool]) -> None:
    wanted = " ".join(_ATTRIBUTE_KEYWORDS[a][0 if on else 1] for a, on in attributes.items())
    # Another test process may create the same cluster-wide role at the same moment.
    await conn.execute(
        f"DO $$ BEGIN CREATE ROLE {quote_ident(role)} {wanted};"
        " EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
    )
    current = await conn.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1", role)
    if current is None or any(current[a] != on for a, on in attributes.items()):
        await conn.execute(f"ALTER ROLE {quote_ident(role)} {wanted}")


async def _public_objects(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """Objects in ``public`` that need an explicit owner change (sequences follow their tables)."""
    rows = await conn.fetch(
        """
        SELECT 'TABLE' AS kind, format('public.%I', c.relname) AS name
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
        UNION ALL
        SELECT 'TYPE', format('public.%I', t.typname)
        FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = 'public' AND t.typtype = 'e'
        UNION ALL
        SELECT 'FUNCTION', p.oid::regprocedure::text
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public'
        ORDER BY 1, 2
        """
    )
    return [(r["kind"], r["name"]) for r in rows]
