"""A PostgreSQL session advisory lock that dies with its holder: two runs of the same kind, on any
machines, against the same database, serialised; the refused one is told who holds the lock.

Released by the database when the holder's session ends (a killed process leaves nothing to clean).
The purposes (their keys and wordings) belong to the use cases: backup/lock.py, reindex/run.py.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from ..errors import Busy
from . import postgres
from .postgres import PostgresError


def advisory_key(label: str) -> int:
    # A fixed 64-bit key derived from a label, so it cannot collide with Engram's own (Oban uses small ints).
    return int.from_bytes(hashlib.sha256(f"engram-recovery:{label}".encode()).digest()[:8], "big", signed=True)


@dataclass(frozen=True)
class Purpose:
    """What a lock serialises: its advisory key, what to call the other run, and the advice."""

    key: int
    name: str
    doing: str
    hint: str


@asynccontextmanager
async def database_lock(dsn: str, purpose: Purpose) -> AsyncIterator[None]:
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
