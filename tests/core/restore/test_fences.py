"""The fences of run_restore against real PostgreSQL 18 and SeaweedFS.

"Backup, then live moves on" is simulated by cloning a seeded Engram database (the clone is what
the restore brought back) and changing the original (the live database) afterwards.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from support import EngramDB, make_engram_db

from engram_recovery import testbed
from engram_recovery.core.progress import silent
from engram_recovery.core.repository.base import Repository
from engram_recovery.core.repository.layout import POOL, protected_inventory_key
from engram_recovery.core.repository.local import LocalRepository
from engram_recovery.core.repository.pool import read_inventory
from engram_recovery.core.repository.prune import _collect_pool
from engram_recovery.core.repository.s3 import S3Repository
from engram_recovery.core.restore.fences import (
    BLIND_MARGIN,
    LIVE_MARGIN,
    TOKEN_TABLES,
    fence_sync,
    fence_tokens,
    protect_orphans,
    snapshot_live,
)
from engram_recovery.core.stores import s3
from engram_recovery.core.stores.s3 import S3Location
from engram_recovery.testbed.seaweedfs import SeaweedFS

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def clone(db: EngramDB) -> AsyncIterator[str]:
    """A copy of `db` as it is now (the backup, restored), dropped afterwards."""
    name = f"restored_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(db.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{db.name}"')
    finally:
        await admin.close()
    try:
        yield testbed.dsn_for(db.dsn, name)
    finally:
        admin = await asyncpg.connect(db.dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


# What makes a token unusable, per table of the 0.18.1 schema.
DEAD = dict.fromkeys(TOKEN_TABLES, "revoked_at IS NOT NULL") | {
    "oauth_refresh_tokens": "revoked_at IS NOT NULL OR consumed_at IS NOT NULL"
}


@dataclass
class MovedOn:
    """What changed in live after the backup."""

    revoked: dict[str, str]  # token table -> id revoked in live after the backup
    gone: dict[str, str]  # token table -> id deleted from live after the backup
    deleted_key: str
    minted: str  # a refresh token created in live after the backup


async def move_on(dsn: str) -> MovedOn:
    conn = await asyncpg.connect(dsn)
    try:
        revoked: dict[str, str] = {}
        gone: dict[str, str] = {}
        for table in TOKEN_TABLES:
            alive = [str(r["id"]) for r in await conn.fetch(f"SELECT id FROM {table} WHERE NOT ({DEAD[table]}) "
                                                           "ORDER BY id")]  # fmt: skip
            revoked[table], gone[table] = alive[0], alive[1]
            await conn.execute(f"UPDATE {table} SET revoked_at = now() WHERE id = $1::uuid", revoked[table])
            await conn.execute(f"DELETE FROM {table} WHERE id = $1::uuid", gone[table])
        deleted_key = str(await conn.fetchval(
            "DELETE FROM api_keys WHERE id = (SELECT id FROM api_keys ORDER BY id LIMIT 1) RETURNING id"))  # fmt: skip
        minted = str(await conn.fetchval(
            "INSERT INTO refresh_tokens (user_id, token_hash, family_id, expires_at, created_at) "
            "SELECT id, 'new-hash', 'new-family', now() + interval '30 days', now() FROM users LIMIT 1 RETURNING id"
        ))  # fmt: skip
        await conn.execute("UPDATE vaults SET change_seq = change_seq + 500")
    finally:
        await conn.close()
    return MovedOn(revoked, gone, deleted_key, minted)


async def token_states(dsn: str) -> dict[str, dict[str, bool]]:
    """Token table -> id -> dead (revoked, or consumed by rotation)?"""
    conn = await asyncpg.connect(dsn)
    try:
        return {t: {str(r["id"]): r["dead"] for r in await conn.fetch(f"SELECT id, {DEAD[t]} AS dead FROM {t}")}
                for t in TOKEN_TABLES}  # fmt: skip
    finally:
        await conn.close()


async def column(dsn: str, sql: str) -> list[object]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def test_tokens_revoked_and_keys_deleted_in_live_after_the_backup_stay_dead(engram_db: EngramDB) -> None:
    async with clone(engram_db) as restored:
        moved = await move_on(engram_db.dsn)
        before = await token_states(restored)
        snapshot = await snapshot_live(engram_db.dsn)
        assert snapshot.readable and snapshot.user_ids
        conn = await asyncpg.connect(restored)
        try:
            result = await fence_tokens(conn, snapshot)
        finally:
            await conn.close()
        after = await token_states(restored)
        keys = await column(restored, "SELECT id::text FROM api_keys")
    for table in TOKEN_TABLES:
        # Exactly those: what live revoked or no longer has; every other token is as the backup had it.
        changed = {i for i, dead in after[table].items() if dead != before[table][i]}
        assert changed == {moved.revoked[table], moved.gone[table]}
        assert all(after[table].values()) is False
    assert moved.deleted_key not in keys and len(keys) == len(engram_db.report.user_ids) - 1
    assert result.changed == 2 * len(TOKEN_TABLES) + 1
    assert any("1 minted after the backup" in d for d in result.details if d.startswith("refresh_tokens"))
    assert "JWT_SECRET" in result.said and "minted after the backup" in result.said
    assert "everyone signs in again" not in result.said


@pytest.mark.parametrize("dsn", [None, "missing-database", "refused"])
async def test_an_unreadable_live_database_revokes_every_refresh_token_and_only_lists_api_keys(
    engram_db: EngramDB, dsn: str | None
) -> None:
    if dsn == "missing-database":
        dsn = testbed.dsn_for(engram_db.dsn, "no_such_database")
    elif dsn == "refused":
        dsn = "postgresql://nobody@127.0.0.1:1/engram"
    snapshot = await snapshot_live(dsn)
    assert not snapshot.readable and snapshot.why and "\n" not in snapshot.why
    assert snapshot.model_dump_json()  # JSON all the way
    hashes = await column(engram_db.dsn, "SELECT key_hash FROM api_keys")
    conn = await asyncpg.connect(engram_db.dsn)
    try:
        result = await fence_tokens(conn, snapshot)
    finally:
        await conn.close()
    states = await token_states(engram_db.dsn)
    assert all(all(t.values()) for t in states.values())
    assert len(await column(engram_db.dsn, "SELECT id FROM api_keys")) == len(engram_db.report.user_ids)
    listed = [d for d in result.details if d.startswith("api_keys: kept")]
    assert len(listed) == len(engram_db.report.user_ids) and "'CLI'" in listed[0]
    assert "everyone signs in again" in result.said and "kept, not deleted" in result.said
    text = result.model_dump_json()
    assert not any(str(h) in text for h in hashes)


async def test_every_vault_head_ends_past_the_live_one(engram_db: EngramDB) -> None:
    async with clone(engram_db) as restored:
        await move_on(engram_db.dsn)
        live = dict(await column_pairs(engram_db.dsn))
        snapshot = await snapshot_live(engram_db.dsn)
        assert snapshot.vault_heads == live
        conn = await asyncpg.connect(restored)
        try:
            result = await fence_sync(conn, snapshot)
        finally:
            await conn.close()
        heads = dict(await column_pairs(restored))
    assert heads.keys() == live.keys() and result.changed == len(heads)
    assert all(heads[v] == live[v] + LIVE_MARGIN for v in heads)
    assert "sync normally" in result.said


async def test_without_the_live_head_every_vault_moves_by_a_margin_no_client_can_have_passed(
    engram_db: EngramDB,
) -> None:
    restored = dict(await column_pairs(engram_db.dsn))
    conn = await asyncpg.connect(engram_db.dsn)
    try:
        result = await fence_sync(conn, await snapshot_live(None))
    finally:
        await conn.close()
    heads = dict(await column_pairs(engram_db.dsn))
    assert all(heads[v] == restored[v] + BLIND_MARGIN for v in heads)
    assert "live heads are unknown: no live database is configured" in result.said


async def column_pairs(dsn: str) -> list[tuple[str, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [(r["id"], int(r["s"])) for r in await conn.fetch("SELECT id::text AS id, change_seq AS s FROM vaults")]
    finally:
        await conn.close()


async def test_a_role_under_row_level_security_reads_and_fences_tenant_by_tenant(engram_db: EngramDB) -> None:
    async with clone(engram_db) as restored:
        moved = await move_on(engram_db.dsn)
        full = await snapshot_live(engram_db.dsn)
        # The owner is neither superuser nor BYPASSRLS: under FORCE RLS a plain read would see no api_keys.
        owner = await snapshot_live(engram_db.role_dsn(testbed.OWNER_ROLE))
        assert owner.readable and owner.read_as and "row-level security" in owner.read_as
        assert owner.api_key_ids == full.api_key_ids and owner.api_key_ids
        assert owner.vault_heads == full.vault_heads and owner.tokens == full.tokens
        name = restored.rsplit("/", 1)[1]
        conn = await asyncpg.connect(testbed.dsn_for(engram_db.dsn, name, user=testbed.OWNER_ROLE))
        try:
            assert (await fence_tokens(conn, owner)).changed == 2 * len(TOKEN_TABLES) + 1
            assert (await fence_sync(conn, owner)).changed == len(full.vault_heads or {})
        finally:
            await conn.close()
        assert moved.deleted_key not in await column(restored, "SELECT id::text FROM api_keys")


async def test_missing_tables_and_columns_are_skipped_and_said(admin_dsn: str, master_key: bytes) -> None:
    async for db in make_engram_db(admin_dsn, master_key, variant="older"):
        conn = await asyncpg.connect(db.dsn)
        try:
            await conn.execute("DROP TABLE oauth_refresh_tokens; ALTER TABLE device_refresh_tokens DROP revoked_at")
            snapshot = await snapshot_live(db.dsn)
            assert snapshot.readable and snapshot.vault_heads is None
            assert any("change_seq" in s for s in snapshot.skipped)
            assert any("oauth_refresh_tokens" in s for s in snapshot.skipped)
            tokens = await fence_tokens(conn, snapshot)
            sync = await fence_sync(conn, snapshot)
        finally:
            await conn.close()
        assert any(d.startswith("oauth_refresh_tokens: no such table") for d in tokens.details)
        assert any(d.startswith("device_refresh_tokens: no revoked_at") for d in tokens.details)
        assert "could not be revoked" in tokens.said
        assert sync.changed == 0 and "no vaults.change_seq" in sync.said


def location(weed: SeaweedFS, bucket: str) -> S3Location:
    return S3Location(weed.endpoint, weed.access_key_id, weed.secret_access_key, weed.region, bucket)


@asynccontextmanager
async def repository(kind: str, weed: SeaweedFS, tmp_path: Path) -> AsyncIterator[Repository]:
    if kind == "local":
        yield LocalRepository(tmp_path / "repo")
        return
    # On the bucket's endpoint with the same credentials: the mirror copies server-side.
    target = location(weed, f"repo-{secrets.token_hex(4)}")
    async with s3.bulk_client(target) as c:
        await c.create_bucket(Bucket=target.bucket)
    async with S3Repository(target, "site/backups") as remote:
        yield remote


@pytest.mark.parametrize("kind", ["local", "s3"])
async def test_orphaned_users_blobs_are_copied_into_the_repository_and_left_in_the_bucket(
    engram_db: EngramDB, weed: SeaweedFS, tmp_path: Path, kind: str
) -> None:
    bucket = location(weed, f"orph-{secrets.token_hex(4)}")
    known = str(engram_db.report.user_ids[0])
    orphan = str(uuid.uuid4())
    objects = {f"{known}/v/objects/a": b"known", f"exports/{orphan}/x.zip": b"export"}
    objects |= {f"{orphan}/v/objects/{n}": secrets.token_bytes(100 + n) for n in range(3)}
    async with s3.bulk_client(bucket) as c:
        await c.create_bucket(Bucket=bucket.bucket)
        for key, body in objects.items():
            await c.put_object(Bucket=bucket.bucket, Key=key, Body=body)
    async with repository(kind, weed, tmp_path) as repo:
        await check_protection(engram_db, bucket, repo, objects, orphan)


async def check_protection(
    engram_db: EngramDB, bucket: S3Location, repo: Repository, objects: dict[str, bytes], orphan: str
) -> None:
    conn = await asyncpg.connect(engram_db.dsn)
    try:
        result = await protect_orphans(conn, bucket, repo, "run-1", silent)
        nothing = await protect_orphans(conn, None, repo, "run-2", silent)
    finally:
        await conn.close()
    entries = [e async for e in read_inventory(repo, protected_inventory_key("run-1"))]
    assert sorted(e.key for e in entries) == sorted(k for k in objects if k.startswith(orphan))
    for e in entries:
        assert await repo.get_bytes(e.repo_key) == objects[e.key]
    async with s3.bulk_client(bucket) as c:
        assert {o.key async for o in s3.list_objects(c, bucket.bucket)} == set(objects)  # nothing deleted
    assert result.changed == 3 and orphan in result.said and "OrphanSweep" in result.said
    assert nothing.changed == 0 and "STORAGE_BACKEND=database" in nothing.said
    # Retention keeps them: no backup references these pool blobs, the protected inventory does.
    assert await _collect_pool(repo, []) == (0, 0)
    assert len([k async for k, _s in repo.list(POOL)]) == 3


async def test_a_vault_whose_head_would_pass_2_to_the_53_is_left_alone_and_said(engram_db: EngramDB) -> None:
    conn = await asyncpg.connect(engram_db.dsn)
    try:
        near = await conn.fetchval("UPDATE vaults SET change_seq = $1 WHERE id = (SELECT id FROM vaults ORDER BY id "
                                   "LIMIT 1) RETURNING id::text", 2**53 - 10)  # fmt: skip
        result = await fence_sync(conn, await snapshot_live(None))
    finally:
        await conn.close()
    heads = dict(await column_pairs(engram_db.dsn))
    assert heads[near] == 2**53 - 10 and result.changed == len(heads) - 1
    assert any(d.startswith(f"vault {near}: not moved") for d in result.details) and "NOT moved" in result.said


async def test_a_live_table_the_role_may_not_read_is_reported_unreadable_not_empty(engram_db: EngramDB) -> None:
    role = f"fence_reader_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(engram_db.dsn)
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN BYPASSRLS")
        await conn.execute(f"GRANT SELECT ON schema_migrations, users, vaults, refresh_tokens, "
                           f"device_refresh_tokens, oauth_refresh_tokens TO {role}")  # fmt: skip
        snapshot = await snapshot_live(engram_db.role_dsn(role))
        assert snapshot.readable and snapshot.api_key_ids is None and "api_keys" in snapshot.unreadable
        assert snapshot.vault_heads and set(snapshot.tokens) == set(TOKEN_TABLES)
        result = await fence_tokens(conn, snapshot)
    finally:
        await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
        await conn.close()
    assert len(await column(engram_db.dsn, "SELECT id FROM api_keys")) == len(engram_db.report.user_ids)
    assert "live API keys are unknown" in result.said and "permission denied" in result.said
    assert "everyone signs in again" not in result.said
