"""What the CLI and drill benchmarks share: a server to run on and a seeded Engram database.

The scripts run as `.venv/bin/python bench/<name>.py`, so this directory is on sys.path
and they import it as `_common`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

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
    dsn = await testbed.create_database(admin, prefix)
    conn = await asyncpg.connect(dsn)
    try:
        await testbed.create_engram_schema(conn)
        await testbed.create_roles(conn, urlsplit(dsn).path.lstrip("/"))
        await testbed.seed(conn, master_key=key, users=users, vaults_per_user=2, notes=notes, attachments=attachments)
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return dsn


# Drop the database a DSN names, even with sessions still on it.
drop = testbed.drop_database
