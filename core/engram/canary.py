"""Engram's boot canary (system_canaries), read here and nowhere else.

Engram writes it at its first boot: a DEK wrapped with ENCRYPTION_MASTER_KEY and that DEK's
SHA-256. Whether a key opens it is judged by keys.py (the boot rule: the current key only).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

NEWEST = "SELECT id::text AS id, wrapped_dek, dek_sha256, inserted_at FROM system_canaries ORDER BY id DESC LIMIT 1"


@dataclass(frozen=True)
class Canary:
    id: str
    wrapped_dek: bytes
    dek_sha256: bytes
    inserted_at: datetime | None


async def read_canary(conn: asyncpg.Connection) -> Canary | None:
    """The newest canary (the one Engram checks at boot); None when the table is empty."""
    row = await conn.fetchrow(NEWEST)
    if row is None:
        return None
    return Canary(row["id"], bytes(row["wrapped_dek"]), bytes(row["dek_sha256"]), row["inserted_at"])
