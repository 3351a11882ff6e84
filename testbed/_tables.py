"""The small tables of a seed (users, vaults, tokens, Oban jobs, canaries) and the COPY helpers.

Rows are written through COPY like the bulk tables, projected onto the columns
the target schema has, so older schema variants simply lose the newer columns.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

# Absolute on purpose: `mypy tests` checks tests/testbed/ as a package named `testbed`, which
# resolves to this directory, and a `..core` import would then climb above the top level.
from engram_recovery.core.engram import crypto as ec

from ._bulk import AAD_BOUND, UserKeys, VaultRef, projector, random_uuid4, uuid7_at

EMBED_WORKER = "Engram.Workers.EmbedNote"
_VAULT_NAMES = ("Personal", "Work", "Research", "Archive", "Reading", "Side projects")


async def columns_of(conn: asyncpg.Connection) -> dict[str, set[str]]:
    """The columns each table in ``public`` really has: the seeder adapts to the variant it finds."""
    rows = await conn.fetch(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'"
    )
    columns: dict[str, set[str]] = {}
    for r in rows:
        columns.setdefault(r["table_name"], set()).add(r["column_name"])
    return columns


async def copy_rows(
    conn: asyncpg.Connection,
    table: str,
    full: tuple[str, ...],
    rows: Iterable[tuple[Any, ...]],
    columns: dict[str, set[str]],
    counts: dict[str, int],
) -> None:
    """COPY ``rows`` (laid out as ``full``) into ``table``, keeping only the columns it has."""
    if table not in columns:
        return
    names, cut = projector(full, columns[table])
    records = [cut(r) for r in rows]
    if records:
        await conn.copy_records_to_table(table, records=records, columns=names, schema_name="public")
    counts[table] = counts.get(table, 0) + len(records)


def _ms(moment: datetime) -> int:
    return int(moment.replace(tzinfo=UTC).timestamp() * 1000)


def _token_hash(rng: random.Random) -> str:
    # Engram stores SHA-256 hex of a random secret; the secret itself is never kept.
    return hashlib.sha256(rng.randbytes(32)).hexdigest()


async def _copy_dicts(
    conn: asyncpg.Connection,
    table: str,
    rows: Sequence[dict[str, Any]],
    columns: dict[str, set[str]],
    counts: dict[str, int],
) -> None:
    """`copy_rows` for the small tables, whose rows read better as dicts (all with the same keys)."""
    if rows:
        full = tuple(rows[0])
        await copy_rows(conn, table, full, (tuple(r[c] for c in full) for r in rows), columns, counts)


async def write_users(
    conn: asyncpg.Connection,
    rng: random.Random,
    master_key: bytes,
    count: int,
    now: datetime,
    columns: dict[str, set[str]],
    counts: dict[str, int],
) -> list[UserKeys]:
    keys: list[UserKeys] = []
    rows: list[dict[str, Any]] = []
    for i in range(count):
        created = now - timedelta(days=400, minutes=count - i)
        user_id = uuid7_at(_ms(created), rng)
        dek = os.urandom(ec.KEY_BYTES)
        keys.append(UserKeys.for_user(user_id, dek))
        email = f"user{i + 1}@example.test"
        rows.append(
            {
                "id": user_id,
                "email": email,
                "normalized_email": email,
                "display_name": f"User {i + 1}",
                "created_at": created,
                "updated_at": created,
                "role": "admin" if i == 0 else "member",
                "encrypted_dek": ec.wrap_dek(master_key, dek, user_id),
                # The master-key generation (ENCRYPTION_MASTER_KEY_VERSION, default 1), not the wrap format.
                "dek_version": 1,
                "key_provider": "local",
            }
        )
    await _copy_dicts(conn, "users", rows, columns, counts)
    return keys


async def write_vaults(
    conn: asyncpg.Connection,
    rng: random.Random,
    keys: Sequence[UserKeys],
    per_user: int,
    now: datetime,
    columns: dict[str, set[str]],
    counts: dict[str, int],
) -> list[VaultRef]:
    vaults: list[VaultRef] = []
    rows: list[dict[str, Any]] = []
    for u, user in enumerate(keys):
        for j in range(per_user):
            created = now - timedelta(days=390, hours=j)
            vault_id = uuid7_at(_ms(created), rng)
            # One deleted vault (the very last) so tools must skip the notes that live in it.
            deleted = len(keys) * per_user > 1 and u == len(keys) - 1 and j == per_user - 1
            name = _VAULT_NAMES[j % len(_VAULT_NAMES)] + ("" if j < len(_VAULT_NAMES) else f" {j}")
            name_ct, name_nonce = user.cipher.encrypt(name.encode(), "vaults", "name", vault_id, AAD_BOUND)
            rows.append(
                {
                    "id": vault_id,
                    "user_id": user.user_id,
                    "slug": f"vault-{j + 1}",
                    "is_default": j == 0,
                    "deleted_at": now - timedelta(days=3) if deleted else None,
                    "created_at": created,
                    "updated_at": created,
                    "name_ciphertext": name_ct,
                    "name_nonce": name_nonce,
                    "name_hmac": user.hmac(name),
                    "dek_version": AAD_BOUND,
                    "change_seq": 0,
                }
            )
            vaults.append(VaultRef(vault_id, user, deleted))
    await _copy_dicts(conn, "vaults", rows, columns, counts)
    return vaults


async def write_tokens(
    conn: asyncpg.Connection,
    rng: random.Random,
    keys: Sequence[UserKeys],
    vaults: Sequence[VaultRef],
    now: datetime,
    columns: dict[str, set[str]],
    counts: dict[str, int],
) -> None:
    """Sessions, devices, MCP grants and API keys, each with a revoked one that a restore would revive."""
    later, earlier = now + timedelta(days=30), now - timedelta(days=2)
    clients = [
        {"client_id": random_uuid4(rng), "client_name": name, "redirect_uris": [uri], "kind": kind}
        | {"inserted_at": now, "updated_at": now}
        for name, uri, kind in (
            ("Claude Desktop", "http://127.0.0.1:6274/oauth/callback", "mcp"),
            ("Obsidian", "obsidian://engram-auth", "obsidian"),
        )
    ]
    sessions: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    grants: list[dict[str, Any]] = []
    api_keys: list[dict[str, Any]] = []
    scopes: list[dict[str, Any]] = []
    for user in keys:
        uid = user.user_id
        mine = [v.id for v in vaults if v.user is user and not v.deleted]
        vault_id = mine[0] if mine else None
        for revoked_at in (None, earlier):
            family = str(random_uuid4(rng))
            sessions.append(
                {"id": random_uuid4(rng), "user_id": uid, "token_hash": _token_hash(rng), "family_id": family}
                | {"expires_at": later, "revoked_at": revoked_at, "created_at": earlier}
            )
        # Every live vault has a synced device; the first also has one that was revoked.
        devices.extend(
            {"id": random_uuid4(rng), "token_hash": _token_hash(rng), "user_id": uid, "vault_id": vid}
            | {"expires_at": later, "revoked_at": revoked_at, "inserted_at": earlier}
            | {"family_id": random_uuid4(rng)}
            for n, vid in enumerate(mine)
            for revoked_at in ((None, earlier) if n == 0 else (None,))
        )
        # Live, revoked, and consumed by rotation: the three states a grant can be in.
        for revoked_at, consumed_at in ((None, None), (earlier, None), (None, earlier)):
            grants.append(
                {"id": random_uuid4(rng), "token_hash": _token_hash(rng), "family_id": random_uuid4(rng)}
                | {"client_id": clients[0]["client_id"], "user_id": uid, "vault_id": vault_id, "scope": "mcp"}
                | {"expires_at": later, "revoked_at": revoked_at, "consumed_at": consumed_at}
                | {"inserted_at": earlier, "last_used_at": earlier}
            )
        key_id = random_uuid4(rng)
        api_keys.append(
            {"id": key_id, "user_id": uid, "key_hash": _token_hash(rng), "name": "CLI"}
            | {"last_used": earlier, "created_at": now - timedelta(days=60)}
        )
        if vault_id is not None:
            scopes.append({"api_key_id": key_id, "vault_id": vault_id})
    await _copy_dicts(conn, "oauth_clients", clients, columns, counts)
    await _copy_dicts(conn, "refresh_tokens", sessions, columns, counts)
    await _copy_dicts(conn, "device_refresh_tokens", devices, columns, counts)
    await _copy_dicts(conn, "oauth_refresh_tokens", grants, columns, counts)
    await _copy_dicts(conn, "api_keys", api_keys, columns, counts)
    await _copy_dicts(conn, "api_key_vaults", scopes, columns, counts)


async def write_oban_jobs(
    conn: asyncpg.Connection,
    note_ids: Sequence[uuid.UUID],
    now: datetime,
    columns: dict[str, set[str]],
    counts: dict[str, int],
) -> list[uuid.UUID]:
    """EmbedNote jobs in each state Engram produces, plus finished cron runs; returns the incomplete ones."""
    ago = [now - timedelta(minutes=m) for m in range(61)]
    jobs: list[dict[str, Any]] = []
    incomplete: list[uuid.UUID] = []

    def job(worker: str, queue: str, state: str, args: dict[str, Any], **fields: Any) -> dict[str, Any]:
        row = {"state": state, "queue": queue, "worker": worker, "args": json.dumps(args), "max_attempts": 1}
        row |= {"meta": "{}", "tags": [], "errors": [], "attempt": 0, "priority": 0}
        row |= {"inserted_at": ago[3], "scheduled_at": ago[3], "attempted_at": None, "attempted_by": None}
        row |= {"completed_at": None, "discarded_at": None, "cancelled_at": None}
        return row | fields

    def embed(state: str, index: int, **fields: Any) -> None:
        note_id = note_ids[index % len(note_ids)]
        if state in ("available", "scheduled", "executing", "retryable"):
            incomplete.append(note_id)
        # Engram enqueues backfill at priority 9 and interactive edits at 0.
        fields = {"max_attempts": 5, "priority": 9} | fields
        jobs.append(job(EMBED_WORKER, "embed", state, {"note_id": str(note_id)}, **fields))

    failure = json.dumps({"at": ago[2].isoformat(), "attempt": 1, "error": "** (RuntimeError) Voyage 503"})
    if note_ids:
        embed("available", 0)
        embed("available", 1)
        embed("scheduled", 2, priority=0, scheduled_at=now + timedelta(minutes=10))
        embed("executing", 3, attempt=1, attempted_at=ago[0], attempted_by=["engram@10.0.0.5", "f3b1c2d4"])
        embed("retryable", 4, attempt=1, attempted_at=ago[2], scheduled_at=now + timedelta(minutes=2))
        jobs[-1]["errors"] = [failure]
        embed("completed", 5, attempt=1, inserted_at=ago[31], attempted_at=ago[30], completed_at=ago[30])
        embed("discarded", 6, attempt=5, attempted_at=ago[40], discarded_at=ago[40], errors=[failure] * 5)
        embed("cancelled", 7, inserted_at=ago[50], cancelled_at=ago[50])
    for minutes in (15, 30, 45):
        meta = {"cron": True, "cron_expr": "*/15 * * * *", "cron_name": "Engram.Workers.ReconcileEmbeddings"}
        jobs.append(
            job("Engram.Workers.ReconcileEmbeddings", "maintenance", "completed", {}, meta=json.dumps(meta))
            | {"attempt": 1, "inserted_at": ago[minutes], "scheduled_at": ago[minutes]}
            | {"attempted_at": ago[minutes], "completed_at": ago[minutes]}
        )
    jobs.append(
        job("Engram.Workers.OrphanSweep", "maintenance", "completed", {}, meta='{"cron": true}', attempt=1)
        | {"inserted_at": ago[60], "scheduled_at": ago[60], "attempted_at": ago[60], "completed_at": ago[59]}
    )
    if "oban_jobs" not in columns:
        return []
    await _copy_dicts(conn, "oban_jobs", jobs, columns, counts)
    return incomplete


async def write_canaries(
    conn: asyncpg.Connection,
    rng: random.Random,
    master_key: bytes,
    retired: int,
    now: datetime,
    columns: dict[str, set[str]],
    counts: dict[str, int],
) -> bytes:
    """The current canary, newest by id, above ``retired`` ones from master keys rotated away."""
    rows: list[dict[str, Any]] = []
    for n in range(retired + 1):
        current = n == retired
        at = now - timedelta(days=30 if current else 365 - n)
        wrapped, sha = ec.make_canary(master_key if current else os.urandom(ec.KEY_BYTES))
        rows.append(
            {"id": uuid7_at(_ms(at), rng), "wrapped_dek": wrapped, "dek_sha256": sha}
            | {"inserted_at": at, "updated_at": at}
        )
    await _copy_dicts(conn, "system_canaries", rows, columns, counts)
    return sha
