"""What the CLI and drill benchmarks share: a server to run on and a seeded Engram database.

The scripts run as `.venv/bin/python bench/<name>.py`, so this directory is on sys.path
and they import it as `_common`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

from engram_recovery import testbed
from engram_recovery.testbed import cluster


@contextmanager
def admin_url(prefix: str, override_env: str = "ENGRAM_TEST_ADMIN_URL") -> Iterator[str]:
    """The server named by `override_env`, else a throwaway bundled cluster for the run."""
    override = os.environ.get(override_env)
    if override:
        yield override
        return
    with cluster.throwaway(prefix) as pg:
        yield pg.admin_url


async def seeded(admin: str, key: bytes, prefix: str, *, users: int, notes: int, attachments: int) -> str:
    """A new database `<prefix>_<random>` with Engram's schema and roles, seeded and analysed; its DSN."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = testbed.dsn_for(admin, name)
    conn = await asyncpg.connect(dsn)
    try:
        await testbed.create_engram_schema(conn)
        await testbed.create_roles(conn, name)
        await testbed.seed(conn, master_key=key, users=users, vaults_per_user=2, notes=notes, attachments=attachments)
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return dsn


async def drop(admin: str, dsn: str) -> None:
    """Drop the database `dsn` names, even with sessions still on it."""
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{dsn.rsplit("/", 1)[-1].split("?")[0]}" WITH (FORCE)')
    finally:
        await conn.close()
