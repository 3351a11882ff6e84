"""A throwaway Engram: its schema, roles and row-level security, filled with really encrypted data.

Tests build one per test in a scratch database (`scratch_database`), the
benchmark builds a big one, and ``engram-recovery demo`` builds a small one
(`demo`). Nothing here is used by the product at run time.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import anyio
import asyncpg

from .schema import (
    APP_ROLE,
    BACKUP_ROLE,
    DEFAULT_VARIANT,
    OWNER_ROLE,
    SUPER_ROLE,
    VARIANTS,
    Variant,
    create_engram_schema,
    create_roles,
    migration_versions,
    rls_tables,
)
from .seed import AttachmentSample, NoteSample, ProgressFn, SeedReport, seed

__all__ = [
    "APP_ROLE",
    "BACKUP_ROLE",
    "DEFAULT_VARIANT",
    "OWNER_ROLE",
    "SUPER_ROLE",
    "VARIANTS",
    "AttachmentSample",
    "NoteSample",
    "ProgressFn",
    "SeedReport",
    "Variant",
    "create_database",
    "create_engram_schema",
    "create_roles",
    "demo",
    "drop_database",
    "dsn_for",
    "migration_versions",
    "rls_tables",
    "scratch_database",
    "seed",
]


def dsn_for(admin_dsn: str, dbname: str, user: str | None = None) -> str:
    """``admin_dsn`` pointed at database ``dbname``, optionally as another role (trust auth: no password)."""
    parts = urlsplit(admin_dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("expected a postgresql:// URL")
    netloc = parts.netloc
    if user is not None:
        host = netloc.rpartition("@")[2]
        netloc = f"{quote(user, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, "/" + quote(dbname, safe=""), parts.query, ""))


async def create_database(admin_dsn: str, prefix: str = "engram_test") -> str:
    """Create an empty database named ``<prefix>_<random>``; its DSN."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        # template0: nobody is ever connected to it, so parallel creations cannot collide on it.
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await admin.close()
    return dsn_for(admin_dsn, name)


async def drop_database(admin_dsn: str, dsn: str) -> None:
    """Drop the database `dsn` names on the server of `admin_dsn`, even with sessions still on it."""
    name = unquote(urlsplit(dsn).path.lstrip("/"))
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@asynccontextmanager
async def scratch_database(admin_dsn: str, prefix: str = "engram_test") -> AsyncIterator[str]:
    """Create an empty database named ``<prefix>_<random>``, yield its DSN, drop it (even if in use) after."""
    dsn = await create_database(admin_dsn, prefix)
    try:
        yield dsn
    finally:
        # Shielded and bounded: a cancelled test must still not leave its database behind.
        with anyio.CancelScope(shield=True), anyio.move_on_after(60):
            await drop_database(admin_dsn, dsn)


async def demo(
    dsn: str,
    master_key: bytes,
    *,
    variant: Variant = DEFAULT_VARIANT,
    users: int = 3,
    notes: int = 200,
    attachments: int = 12,
) -> SeedReport:
    """Turn the empty database at ``dsn`` into a small, realistic Engram deployment.

    ``dsn`` must connect as a superuser. The roles of `create_roles` are created
    if missing and own the tables afterwards.
    """
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT to_regclass('public.notes') IS NOT NULL"):
            raise ValueError("this database already has Engram tables; the demo needs an empty one")
        await create_engram_schema(conn, variant=variant)
        await create_roles(conn, await conn.fetchval("SELECT current_database()"))
        return await seed(
            conn, master_key=master_key, users=users, vaults_per_user=2, notes=notes, attachments=attachments
        )
    finally:
        await conn.close()
