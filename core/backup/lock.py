"""One backup (and one confirmed reindex) at a time, with a lock that dies with its holder.

Two locks, both released by the operating system or the database when the
holder dies (a killed process leaves no stale lock file to clean by hand):

* a PostgreSQL session advisory lock on the Engram database: two cron entries,
  an assistant and a human, on any machines, backing up the same database (a
  second key, for the same reason, serialises confirmed reindex_qdrant runs);
* the repository's own lock (`Repository.lock`; for a local directory, `flock` on
  `<repository>/.lock`): two deployments writing (and pruning) the same directory.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from ..errors import Busy
from ..stores import postgres
from ..stores.postgres import PostgresError


def _key(label: str) -> int:
    # A fixed 64-bit key derived from a label, so it cannot collide with Engram's own (Oban uses small ints).
    return int.from_bytes(hashlib.sha256(f"engram-recovery:{label}".encode()).digest()[:8], "big", signed=True)


@dataclass(frozen=True)
class Purpose:
    """What a lock serialises: its advisory key, what to call the other run, and the advice."""

    key: int
    name: str
    doing: str
    hint: str


BACKUP = Purpose(
    _key("backup"),
    "engram-recovery run_backup",
    "another backup of this database is running",
    "wait for the running backup to finish (backup_status shows the newest one), or stagger the cron "
    "entries; the lock is released automatically when its holder ends, even if it is killed",
)
REINDEX = Purpose(
    _key("reindex"),
    "engram-recovery reindex_qdrant",
    "another confirmed reindex_qdrant of this database is running",
    "wait for it to finish (its EmbedNote jobs then show in backup_status's oban check), then run again if "
    "needed; a dry run (confirm=false) is allowed meanwhile; the lock is released when its holder ends",
)


@asynccontextmanager
async def database_lock(dsn: str, purpose: Purpose = BACKUP) -> AsyncIterator[None]:
    """Hold the advisory lock on a dedicated connection for the duration; Busy if someone has it."""
    # Named, so that the refused run can say who holds the lock.
    conn = await postgres.connect(dsn, server_settings={"application_name": purpose.name})
    try:
        try:
            got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", purpose.key)
            holder = None if got else await conn.fetchval(
                "SELECT coalesce(nullif(a.application_name, ''), 'a session') || ' (pid ' || a.pid || ', since ' || "
                "to_char(a.backend_start, 'YYYY-MM-DD HH24:MI:SS') || ', from ' || "
                "coalesce(host(a.client_addr), 'a local socket') || ')' FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                "AND l.classid = (($1::bigint >> 32) & 4294967295)::oid "
                "AND l.objid = ($1::bigint & 4294967295)::oid LIMIT 1",
                purpose.key,
            )
        except PostgresError as exc:
            raise postgres.describe(exc) from exc
        if not got:
            raise Busy(purpose.doing + (f": {holder}" if holder else ""), purpose.hint)
        yield
    finally:
        # Closing the session releases the lock; no explicit unlock that could fail half-way.
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await conn.close(timeout=2)
