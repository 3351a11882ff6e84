"""The fences of run_restore: what a restored database must not bring back, and what it must not let die.

A restore rolls the database back to the backup while the world moved on. Each fence puts back one
thing the backup cannot know, on the RESTORED database, before the app boots on it:

* tokens: refresh, device and OAuth refresh tokens revoked (or consumed by rotation) in the live
  database after the backup, and API keys deleted there, come back to life: revoke / delete exactly
  those; with no readable live database, revoke every refresh token and list the API keys;
* sync: Obsidian clients keep cursors at the live `vaults.change_seq`; a restored head below them
  makes Engram hand out sequence numbers the clients think they have seen: move every head past;
* OrphanSweep: the app's weekly job deletes the S3 prefixes of users missing from `users`: copy the
  blobs of users only the newer bucket knows into the repository first.

`snapshot_live` reads what the fences need from the live database before anything is replaced; it
never raises, it says what it could not read. Columns differ between Engram releases: everything is
detected (engram/schema_probe), a missing table or column is skipped and said. Row-level security:
a role that is neither superuser nor BYPASSRLS sees zero rows of Engram's FORCEd tenant tables, so
those are read and written one tenant at a time (`app.current_tenant`, as Engram's Repo sets it).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from ..engram.schema_probe import SchemaProbe, probe
from ..errors import RecoveryError
from ..progress import Progress
from ..repository.base import Repository
from ..repository.layout import PROTECTED, protected_inventory_key
from ..repository.mirror import MirrorOptions, mirror_attachments
from ..stores import postgres, s3
from ..stores.s3 import S3_ERRORS, S3Location
from .observe import TenantReader

# Table -> who holds its tokens, in the words the operator reads.
TOKEN_TABLES: dict[str, str] = {
    "refresh_tokens": "web sessions",
    "device_refresh_tokens": "Obsidian devices",
    "oauth_refresh_tokens": "MCP clients (OAuth)",
}
# Engram takes a vault's next sync seq with `UPDATE vaults SET change_seq = change_seq + 1` (Vaults.next_seq!),
# one per change. With the live head known, the margin covers the changes the live app may still make between
# the snapshot and the cut-over; without it, a vault would need a billion changes after the backup (100 a
# second for four months) for a client cursor to pass it. Both stay far below 2**53, where the Obsidian
# plugin's JavaScript numbers stop being exact: nine million blind restores before that.
LIVE_MARGIN = 1_000_000
BLIND_MARGIN = 1_000_000_000
JS_SAFE = 2**53 - 1
ACCESS_TOKENS = (
    "Access tokens (web and MCP) are stateless JWTs valid 15 minutes, signed with JWT_SECRET: a restore does not "
    "cut them; rotating JWT_SECRET does (every session then refreshes or signs in again)."
)
MINTED_AFTER = (
    "Refresh tokens minted after the backup are unknown to the restored database: those clients get "
    "invalid_grant and sign in (or re-authorize) again."
)
_SHOWN = 20  # detail lines per list; the rest is counted


class TokenIds(BaseModel):
    dead: list[str] = Field(description="Rows revoked (or consumed by rotation) in live.")
    present: list[str] = Field(description="Every row in live.")


class LiveSnapshot(BaseModel):
    """What the fences need from the live database: ids and counters only, never a secret or a token hash."""

    readable: bool
    why: str | None = None
    taken_at: datetime
    read_as: str | None = None
    tokens: dict[str, TokenIds] = Field(default_factory=dict, description="Per token table that could be read.")
    api_key_ids: list[str] | None = None
    vault_heads: dict[str, int] | None = Field(default=None, description="Vault id -> change_seq.")
    user_ids: list[str] | None = None
    unreadable: dict[str, str] = Field(default_factory=dict, description="Part -> why it could not be read.")
    skipped: list[str] = Field(default_factory=list, description="What the live schema does not have.")


class FenceResult(BaseModel):
    name: str
    changed: int
    details: list[str] = Field(default_factory=list)
    said: str


def _unreadable(why: str) -> LiveSnapshot:
    return LiveSnapshot(readable=False, why=why, taken_at=datetime.now(UTC))


async def snapshot_live(dsn: str | None) -> LiveSnapshot:
    """Read the live database (the one Engram runs on) before the restore replaces anything. Never raises."""
    if not dsn:
        return _unreadable("no live database is configured (DATABASE_URL is not set)")
    try:
        conn = await postgres.connect(dsn)
    except RecoveryError as exc:
        return _unreadable(exc.message)
    try:
        return await _snapshot(conn)
    except postgres.PostgresError as exc:
        return _unreadable(f"reading the live database failed: {exc}")
    except (OSError, postgres.InterfaceError) as exc:
        return _unreadable(f"the connection to the live database was lost: {exc.__class__.__name__}: {exc}")
    finally:
        await conn.close(timeout=2)


async def _snapshot(conn: postgres.Connection) -> LiveSnapshot:
    taken_at = datetime.now(UTC)
    p = await probe(conn)
    if not p.looks_like_engram:
        return _unreadable("the live database holds no Engram tables (users, vaults, notes)")
    read = TenantReader(conn, p.forced_rls, p.sees_all_rows)
    snap = LiveSnapshot(readable=True, taken_at=taken_at)
    for table in TOKEN_TABLES:
        if not p.has_table(table):
            snap.skipped.append(f"live has no table {table}")
            continue
        dead = _dead_sql(p, table)
        if dead == "false":
            snap.skipped.append(f"live {table} has no revoked_at: only rows missing from live count as dead")
        rows = await read.fetch(table, [table], f"SELECT id::text AS id, {dead} AS dead FROM {table}")
        if rows is not None:
            snap.tokens[table] = TokenIds(dead=sorted(r["id"] for r in rows if r["dead"]),
                                          present=sorted(r["id"] for r in rows))  # fmt: skip
    if p.has_table("api_keys"):
        keys = await read.fetch("api_keys", ["api_keys"], "SELECT id::text AS id FROM api_keys")
        snap.api_key_ids = None if keys is None else sorted(r["id"] for r in keys)
    else:
        snap.skipped.append("live has no table api_keys")
    if p.has_column("vaults", "change_seq"):
        # vault_device_cursors is vestigial, but where a device recorded a higher cursor, that one counts;
        # a role that may not read it still gets the heads themselves.
        cursors = await conn.fetchval("SELECT to_regclass('vault_device_cursors') IS NOT NULL AND "
                                      "has_table_privilege('vault_device_cursors', 'SELECT')")  # fmt: skip
        sql = ("SELECT v.id::text AS id, greatest(v.change_seq, coalesce(max(c.last_seq), 0)) AS s FROM vaults v "
               "LEFT JOIN vault_device_cursors c ON c.vault_id = v.id GROUP BY v.id" if cursors
               else "SELECT id::text AS id, change_seq AS s FROM vaults")  # fmt: skip
        heads = await read.fetch("vaults", ["vaults", "vault_device_cursors"] if cursors else ["vaults"], sql)
        snap.vault_heads = None if heads is None else {r["id"]: int(r["s"]) for r in heads}
    else:
        snap.skipped.append("live vaults has no change_seq (an Engram release before sync cursors)")
    users = await read.fetch("users", ["users"], "SELECT id::text AS id FROM users")
    snap.user_ids = None if users is None else sorted(r["id"] for r in users)
    snap.unreadable = dict(read.unchecked)
    snap.read_as = (f"role {p.role} sees every row" if p.sees_all_rows else
                    f"role {p.role} is under row-level security: tenant tables were read one tenant at a time "
                    f"({len(read.tenants or ())} user(s) from the users table)")  # fmt: skip
    if snap.unreadable and not (snap.tokens or snap.api_key_ids is not None or snap.vault_heads is not None):
        snap.readable, snap.why = False, "; ".join(snap.unreadable.values())
    return snap


def _dead_sql(p: SchemaProbe, table: str) -> str:
    """A boolean SQL expression: the row can no longer be used (revoked, or consumed by rotation)."""
    marks = [f"{c} IS NOT NULL" for c in ("revoked_at", "consumed_at") if p.has_column(table, c)]
    return " OR ".join(marks) if marks else "false"


async def _each_tenant(conn: postgres.Connection, p: SchemaProbe, tables: Sequence[str], sql: str,
                       *args: Any) -> list[Any]:  # fmt: skip
    """Run `sql` (reading or writing `tables`) over every row: one transaction, tenant by tenant under RLS.

    A role subject to FORCE ROW LEVEL SECURITY would silently see (and change) nothing otherwise.
    """
    try:
        return await TenantReader(conn, p.forced_rls, p.sees_all_rows).each(tables, sql, *args, readonly=False)
    except postgres.PostgresError as exc:
        raise postgres.describe(exc) from exc


def _shown(lines: list[str]) -> list[str]:
    return lines[:_SHOWN] + ([f"... and {len(lines) - _SHOWN} more"] if len(lines) > _SHOWN else [])


async def fence_tokens(conn: postgres.Connection, snapshot: LiveSnapshot) -> FenceResult:
    """Keep dead what is dead in live: refresh tokens revoked there, API keys deleted there (restored db)."""
    p = await probe(conn)
    details: list[str] = []
    said: list[str] = []
    changed = 0
    blind: list[str] = []  # token tables whose live state is unknown: every token revoked
    now = "(now() AT TIME ZONE 'UTC')"  # Engram's timestamps are naive UTC
    for table, who in TOKEN_TABLES.items():
        if not p.has_table(table):
            details.append(f"{table}: no such table in the restored database: skipped")
            continue
        if not p.has_column(table, "revoked_at"):
            details.append(f"{table}: no revoked_at column in this release: cannot revoke, skipped")
            said.append(f"The {who} tokens ({table}) could not be revoked: this Engram release has no revoked_at.")
            continue
        live = snapshot.tokens.get(table) if snapshot.readable else None
        # Only tokens alive in the restored database change: one already revoked or consumed stays as it is.
        dead = _dead_sql(p, table)
        if live is None:
            rows = await _each_tenant(conn, p, [table], f"UPDATE {table} SET revoked_at = {now} "
                                      f"WHERE NOT ({dead}) RETURNING id")  # fmt: skip
            blind.append(who)
            details.append(f"{table}: live state unknown ({_why(snapshot, table)}): revoked all {len(rows)} live "
                           "token(s)")  # fmt: skip
            changed += len(rows)
            continue
        rows = await _each_tenant(
            conn, p, [table],
            f"UPDATE {table} t SET revoked_at = {now} WHERE NOT ({dead}) AND (t.id::text = ANY($1::text[]) "
            "OR NOT EXISTS (SELECT 1 FROM unnest($2::text[]) AS l(id) WHERE l.id = t.id::text)) "
            "RETURNING t.id::text AS id, t.id::text = ANY($1::text[]) AS revoked_in_live",
            live.dead, live.present,
        )  # fmt: skip
        # Under row-level security each tenant sees only its rows: count what it sees, subtract once.
        seen = await _each_tenant(
            conn, p, [table], f"SELECT count(*) AS n FROM {table} t WHERE t.id::text = ANY($1::text[])", live.present,
        )  # fmt: skip
        minted = len(live.present) - sum(int(r["n"]) for r in seen)
        revoked = sum(1 for r in rows if r["revoked_in_live"])
        details.append(f"{table}: revoked {len(rows)} ({revoked} revoked in live after the backup, "
                       f"{len(rows) - revoked} no longer in live); {minted} minted after the backup are unknown "
                       "here")  # fmt: skip
        changed += len(rows)
    keys_changed, keys_said = await _fence_api_keys(conn, p, snapshot, details)
    changed += keys_changed
    if blind and not snapshot.readable:
        said.append(f"The live database could not be read, so every refresh token was revoked ({', '.join(blind)}): "
                    "everyone signs in again, every Obsidian device and MCP client re-authorizes.")  # fmt: skip
    elif blind:
        said.append(f"Refresh tokens revoked in the live database after the backup stay revoked; where the live "
                    f"state was unknown ({', '.join(blind)}), every refresh token was revoked: those users sign in "
                    "again.")  # fmt: skip
    else:
        said.append("Refresh tokens revoked in the live database after the backup stay revoked.")
    said += [keys_said, MINTED_AFTER, ACCESS_TOKENS]
    return FenceResult(name="tokens", changed=changed, details=details, said=" ".join(s for s in said if s))


def _why(snapshot: LiveSnapshot, part: str) -> str:
    """Why the live state of `part` (a table) is unknown, in one line."""
    if part in snapshot.unreadable:
        return snapshot.unreadable[part]
    return snapshot.why or next((s for s in snapshot.skipped if part in s), f"live {part} was not read")


async def _fence_api_keys(
    conn: postgres.Connection, p: SchemaProbe, snapshot: LiveSnapshot, details: list[str]
) -> tuple[int, str]:
    if not p.has_table("api_keys"):
        details.append("api_keys: no such table in the restored database: skipped")
        return 0, ""
    live = snapshot.api_key_ids if snapshot.readable else None
    if live is not None:
        # A revoked API key is a deleted row: delete what live no longer has (api_key_vaults cascades).
        rows = await _each_tenant(
            conn, p, ["api_keys"],
            "DELETE FROM api_keys a WHERE NOT EXISTS (SELECT 1 FROM unnest($1::text[]) AS l(id) "
            "WHERE l.id = a.id::text) RETURNING a.id::text AS id, a.user_id::text AS user_id",
            live,
        )  # fmt: skip
        details += _shown([f"api_keys: deleted {r['id']} of user {r['user_id']} (deleted in live after the backup)"
                           for r in rows])  # fmt: skip
        return len(rows), f"{len(rows)} API key(s) deleted in the live database after the backup were deleted again."
    # Never key_hash; a key's visible prefix, where the release has one, helps its owner recognise it.
    label = next((c for c in ("key_prefix", "prefix") if p.has_column("api_keys", c)), None)
    name = "name" if p.has_column("api_keys", "name") else "NULL"
    rows = await _each_tenant(
        conn, p, ["api_keys"],
        f"SELECT id::text AS id, user_id::text AS user_id, {name} AS name, {label or 'NULL'} AS label "
        "FROM api_keys ORDER BY user_id, id",
    )  # fmt: skip
    details += _shown([f"api_keys: kept {r['id']} of user {r['user_id']} (name {r['name']!r}"
                       + (f", prefix {r['label']}" if r["label"] else "") + ")" for r in rows])  # fmt: skip
    return 0, (f"The live API keys are unknown ({_why(snapshot, 'api_keys')}), so the {len(rows)} API key(s) "
               "of the backup were kept, not deleted: any of them revoked after the backup works again. Ask their "
               "owners, and delete the revoked ones (DELETE FROM api_keys WHERE id = '<id>').")  # fmt: skip


async def fence_sync(conn: postgres.Connection, snapshot: LiveSnapshot) -> FenceResult:
    """Move every vault's `change_seq` past the live head, so no client cursor is ahead of the server."""
    p = await probe(conn)
    if not p.has_column("vaults", "change_seq"):
        return FenceResult(
            name="sync",
            changed=0,
            details=["vaults.change_seq: not in this release: skipped"],
            said="This Engram release has no vaults.change_seq: there is no sync head to move.",
        )
    heads = snapshot.vault_heads if snapshot.readable else None
    margin = LIVE_MARGIN if heads is not None else BLIND_MARGIN
    known = heads or {}
    # Vaults whose new head would pass 2**53 are left alone (and said): a client could not represent it.
    stuck = await _each_tenant(
        conn, p, ["vaults"],
        "SELECT v.id::text AS id FROM vaults v LEFT JOIN unnest($1::text[], $2::bigint[]) AS l(id, h) "
        "ON l.id = v.id::text WHERE greatest(v.change_seq, coalesce(l.h, 0)) > $4::bigint - $3::bigint",
        list(known), list(known.values()), margin, JS_SAFE,
    )  # fmt: skip
    rows = await _each_tenant(
        conn, p, ["vaults"],
        "UPDATE vaults v SET change_seq = n.head FROM (SELECT v2.id, v2.change_seq AS before, "
        "greatest(v2.change_seq, coalesce(l.h, 0)) + $3::bigint AS head FROM vaults v2 "
        "LEFT JOIN unnest($1::text[], $2::bigint[]) AS l(id, h) ON l.id = v2.id::text) n "
        "WHERE n.id = v.id AND n.head <= $4::bigint RETURNING v.id::text AS id, n.before, n.head",
        list(known), list(known.values()), margin, JS_SAFE,
    )  # fmt: skip
    details = _shown([f"vault {r['id']}: {r['before']} -> {r['head']}"
                      + (f" (live {known[r['id']]})" if r["id"] in known else "") for r in rows])  # fmt: skip
    details += [f"vault {r['id']}: not moved, its head would pass 2**53 (the client's largest exact number)"
                for r in stuck]  # fmt: skip
    base = ("past the live head read before the restore, plus 1,000,000 for changes made since" if heads is not None
            else f"by 1,000,000,000 (the live heads are unknown: {_why(snapshot, 'vaults')}): more changes "
            "than any vault can have made after the backup")  # fmt: skip
    said = (f"Every vault's sync head (vaults.change_seq) was moved {base}. Obsidian clients keep cursors at most at "
            "the live head, now behind the server's: they sync normally, pulling only changes made from now on, "
            "and no new change reuses a number they have seen. Changes a device synced after the backup stay on "
            "that device; the server has them again only if the device sends them again.")  # fmt: skip
    if stuck:
        said += (
            f" {len(stuck)} vault(s) were NOT moved: their head is within the margin of 2**53, past which the "
            "client's numbers are inexact; their devices may skip changes until they re-sync the vault."
        )
    return FenceResult(name="sync", changed=len(rows), details=details, said=said)


async def protect_orphans(
    conn: postgres.Connection, bucket: S3Location | None, repo: Repository, run_id: str, progress: Progress
) -> FenceResult:
    """Copy the blobs of users the bucket has and the restored `users` lacks into the repository.

    Engram's weekly OrphanSweep deletes those S3 prefixes. Nothing is deleted here, ever.
    """
    if bucket is None:
        return FenceResult(name="orphans", changed=0, said=(
            "STORAGE_BACKEND=database: the attachments are rows of the restored database, consistent with its "
            "users; OrphanSweep has no S3 prefix to delete."))  # fmt: skip
    try:
        users = {str(r["id"]) for r in await conn.fetch("SELECT id::text AS id FROM users")}
    except postgres.PostgresError as exc:
        raise postgres.describe(exc) from exc
    prefixes: set[str] = set()
    try:
        async with s3.client(bucket) as client:
            paginator = client.get_paginator("list_objects_v2")
            # One request per 1,000 prefixes: the objects themselves are listed only under the orphans'.
            async for page in paginator.paginate(Bucket=bucket.bucket, Delimiter="/"):
                prefixes.update(p["Prefix"].rstrip("/") for p in page.get("CommonPrefixes", ()))
    except S3_ERRORS as exc:
        raise s3.translate(exc, "list the user prefixes of the attachments bucket", bucket) from exc
    # exports/ holds 7-day account exports, not a user; OrphanSweep keeps soft-deleted users, and so does `users`.
    orphans = sorted(p for p in prefixes - users - {"exports"} if p)
    if not orphans:
        return FenceResult(name="orphans", changed=0, said=(
            f"Every user prefix of bucket {bucket.bucket!r} belongs to a user of the restored database: "
            "OrphanSweep will delete nothing there."))  # fmt: skip
    inventory = protected_inventory_key(run_id)
    options = MirrorOptions(prefixes=[f"{o}/" for o in orphans], inventory=inventory)
    report = await mirror_attachments(bucket, repo, run_id, progress, options)
    per_user = dict.fromkeys(orphans, 0)
    for key in report.keys:
        per_user[key.split("/", 1)[0]] += 1
    details = _shown([f"user {o}{'' if _is_uuid(o) else ' (not a user id)'}: {n} object(s)"
                      for o, n in per_user.items()])  # fmt: skip
    details.append(f"{report.objects} object(s), {report.bytes} bytes: {report.copied_objects} copied now, "
                   f"{report.skipped_objects} already in the repository's pool; inventory {inventory}")  # fmt: skip
    named = ", ".join(orphans[:5]) + " ..." * (len(orphans) > 5)
    said = (f"{len(orphans)} user(s) have attachments in bucket {bucket.bucket!r} but are not in the restored "
            f"database (most likely they signed up after the backup): {named}. "
            "Engram's weekly OrphanSweep (Sundays 05:00 UTC) deletes their prefixes and their Qdrant points. "
            f"Their {report.objects} blob(s) are now in the repository ({inventory}, blobs in the attachments pool, "
            f"kept by retention until you delete {PROTECTED}{run_id}/). Before the app runs the sweep, restore those "
            "users, or delete their prefixes yourself once you are sure they are not wanted.")  # fmt: skip
    return FenceResult(name="orphans", changed=report.objects, details=details, said=said)


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True
