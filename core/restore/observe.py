"""The I/O behind a restore plan: find the recovery point, re-hash it, look at the target and the live database.

Everything here only reads. The judging happens in core/restore/plan.py.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..artifact.encryption import backup_key
from ..engram.keys import MasterKeys
from ..engram.schema_probe import probe
from ..errors import ConfigurationError, RecoveryError
from ..repository.base import Repository
from ..repository.manifest import Manifest
from ..repository.points import RecoveryPoint
from ..repository.pool import read_inventory, verify_blobs
from ..runtime import Runtime
from ..settings import Settings
from ..stores import postgres, s3
from ..stores.pgclient.commands import PgRestoreCommand
from ..stores.pgclient.process import Feed, feed_all
from ..stores.pgclient.versions import ClientChoice, choose
from .drill import Keys, plaintext
from .plan import InventoryState, KeyMaterial, LiveState, RestoreNeeds, RoleState, TargetState, ToolState, dump_major

SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")


def tool_argv() -> tuple[str, ...]:
    """This tool by absolute path: the console script beside this interpreter, else the interpreter itself."""
    script = Path(sys.executable).parent / "engram-recovery"
    if script.is_file():
        return (str(script),)
    return (sys.executable, "-m", "engram_recovery.server.cli")


def absolute(path: str) -> str:
    """A path as the plan's commands must name it: they may run from another directory."""
    return str(Path(path).absolute())


def absolute_repository(settings: Settings) -> str:
    location = settings.repository
    return location if "://" in location else absolute(location)


def drill_keys(settings: Settings) -> Keys:
    """The keys a drill proves the restored data with: refused without a current master key."""
    keys = key_material(settings)
    if keys.current is None:
        raise ConfigurationError(keys.current_problem or "ENCRYPTION_MASTER_KEY is not available to this tool",
                                 "set ENCRYPTION_MASTER_KEY or ENCRYPTION_MASTER_KEY_FILE: the drill proves the key "
                                 "opens the restored data")  # fmt: skip
    return Keys(keys.current, keys.previous)


def key_material(settings: Settings) -> KeyMaterial:
    keys = MasterKeys.from_settings(settings)
    problem = (f"ENCRYPTION_MASTER_KEY is malformed ({keys.current_error}): it must be base64 of exactly 32 bytes"
               if keys.current_error else None)  # fmt: skip
    return KeyMaterial(current=keys.current, current_problem=problem, previous=keys.previous,
                       key_provider=settings.key_provider)  # fmt: skip


async def restore_client(
    settings: Settings, manifest: Manifest, target_major: int | None = None, *, through_prefix: bool = True
) -> ClientChoice:
    """The pg_restore for this backup: configured, else PATH's or the bundled one, able to read its dump
    (pg_restore cannot read an archive of a newer pg_dump) and at least as new as the target server.

    `through_prefix=False` for the plan's commands: the operator runs those on this host, on files in a
    local work directory that a client behind ENGRAM_RECOVERY_PG_CLIENT_PREFIX (a container) cannot see."""
    dump = dump_major(manifest)
    needed = max((m for m in (dump, target_major) if m is not None), default=None)
    purpose = f"read a dump written by pg_dump {dump}"
    if target_major is not None and (dump is None or target_major > dump):
        purpose += f" into a PostgreSQL {target_major} server"
    if settings.pg_client_prefix and not through_prefix:
        # ENGRAM_RECOVERY_PG_RESTORE then names a binary inside the prefix's world: use this host's own.
        return await choose("pg_restore", None, needed, purpose)
    return await choose("pg_restore", settings.pg_restore, needed, purpose, settings.pg_client_prefix)


async def tool_state(settings: Settings, manifest: Manifest, target_major: int | None = None) -> ToolState:
    choice = await restore_client(settings, manifest, target_major, through_prefix=False)
    if choice.chosen is not None:
        return ToolState(pg_restore_path=choice.chosen.path, pg_restore_major=choice.chosen.major)
    if not choice.considered:
        return ToolState(pg_restore_path=None, pg_restore_major=None, problem=choice.problem, fix=choice.fix)
    # Too old: reported with the newest one found, so the plan can say which and by how much.
    best = max(choice.considered, key=lambda c: c.major)
    return ToolState(pg_restore_path=best.path, pg_restore_major=best.major, problem=choice.problem, fix=choice.fix)


def _server(settings: Settings) -> tuple[str | None, int | None, str | None]:
    url = urlsplit(settings.database_url.get_secret_value())
    return url.hostname, url.port, url.username


# TOC entries whose last field is the owning role (pg_restore --list prints "id; oids DESC schema tag owner").
_OWNED = ("TABLE", "SEQUENCE", "VIEW", "MATERIALIZED VIEW", "FUNCTION", "PROCEDURE", "TYPE", "DOMAIN", "SCHEMA",
          "ACL", "TABLE DATA", "POLICY", "TRIGGER", "INDEX")  # fmt: skip
_TOC_LINE = re.compile(r"^\d+; \d+ \d+ (?P<rest>.+)$")


def toc_owners(listing: str) -> set[str]:
    """The roles that own objects in a `pg_restore --list` listing."""
    owners: set[str] = set()
    for line in listing.splitlines():
        match = _TOC_LINE.match(line.strip())
        if match is None:
            continue
        rest = match["rest"]
        if any(rest.startswith(desc + " ") for desc in _OWNED):
            owner = rest.rsplit(" ", 1)[-1]
            if owner and owner != "-":
                owners.add(owner)
    return owners


def toc_needs(listing: str) -> RestoreNeeds:
    """What restoring a `pg_restore --list` listing asks of its role: owners, extensions, row-level security."""
    extensions: list[str] = []
    secured: list[str] = []
    for line in listing.splitlines():
        match = _TOC_LINE.match(line.strip())
        words = match["rest"].split() if match else []
        if words[:1] == ["EXTENSION"] and len(words) >= 3:
            extensions.append(words[2])
        elif words[:2] == ["ROW", "SECURITY"] and len(words) >= 4:
            secured.append(words[3])
    return RestoreNeeds(owner=None, object_owners=tuple(sorted(toc_owners(listing))),
                        extensions=tuple(sorted(extensions)), row_security_tables=tuple(sorted(secured)))  # fmt: skip


def restore_needs(manifest: Manifest, listing: str | None) -> RestoreNeeds:
    """From the manifest where it records them, else from the dump's table of contents; None where unknown."""
    db = manifest.database
    toc = toc_needs(listing) if listing is not None else None

    def pick(recorded: list[str] | None, listed: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return tuple(recorded) if recorded is not None else listed

    return RestoreNeeds(
        owner=db.owner,
        object_owners=pick(db.object_owners, toc.object_owners if toc else None),
        extensions=pick(db.extensions, toc.extensions if toc else None),
        row_security_tables=pick(db.row_security_tables, toc.row_security_tables if toc else None),
    )


async def roles_from_dump(settings: Settings, repo: Repository, point: RecoveryPoint) -> set[str] | None:
    """When the manifest names no roles: read the dump's table of contents (its first bytes) with pg_restore -l."""
    listing = await dump_listing(settings, repo, point)
    return None if listing is None else toc_owners(listing)


async def dump_listing(settings: Settings, repo: Repository, point: RecoveryPoint) -> str | None:
    """The dump's table of contents (its first bytes, through pg_restore -l), when it can be read here."""
    dumps = [a for a in point.manifest.artifacts if a.kind == "database"]
    if point.manifest.database.dump_format != "custom" or len(dumps) != 1:
        return None
    key = backup_key(settings)
    if dumps[0].encryption is not None and key is None:
        return None
    chosen = (await restore_client(settings, point.manifest)).chosen
    if chosen is None:
        return None
    lister = Feed(PgRestoreCommand(chosen.path, list_only=True, prefix=chosen.prefix), "", keep_stdout=True,
                  drain=False)  # fmt: skip

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in plaintext(repo, point.prefix + dumps[0].name, dumps[0], key):
                yield chunk
        except RecoveryError:
            pass  # what was read may hold the TOC: pg_restore says

    # pg_restore stops reading once it has the TOC: a closed pipe is the normal end.
    with contextlib.suppress(RecoveryError):  # an unreadable listing is no listing: the plan says so elsewhere
        await feed_all(lister, chunks())
    return lister.stdout.decode(errors="replace")


async def target_state(
    settings: Settings, database: str, roles: Sequence[str], extensions: Sequence[str] = ()
) -> TargetState:
    """The target database on the configured server: exists, empty, in use, which roles the server has."""
    host, port, user = _server(settings)
    base: dict[str, Any] = {"database": database, "host": host, "port": port, "user": user,
                            "is_live": database == settings.database_name}  # fmt: skip
    dsn = settings.database_url.get_secret_value()
    exists = True
    try:
        conn = await postgres.connect(dsn, database=database)
    except RecoveryError as exc:
        if "no database of that name" not in exc.message:
            return TargetState(reachable=False, problem=exc.message, **base)
        exists = False
        try:
            conn = await postgres.connect(dsn, database="postgres")
        except RecoveryError as exc2:
            return TargetState(reachable=False, problem=exc2.message, **base)
    try:
        row = await conn.fetchrow(
            "SELECT current_setting('server_version') AS v, current_setting('server_version_num')::int AS n"
        )
        assert row is not None
        present = await conn.fetch("SELECT rolname FROM pg_roles WHERE rolname = ANY($1::text[])", list(roles))
        # What the restoring role (the one the plan's commands connect as) may do on this server.
        me = await conn.fetchrow(
            "SELECT rolname, rolsuper, rolbypassrls, rolcreatedb, rolcreaterole FROM pg_roles "
            "WHERE rolname = current_user"
        )
        assert me is not None
        member = await conn.fetch("SELECT rolname FROM pg_roles WHERE rolname = ANY($1::text[]) "
                                  "AND pg_has_role(current_user, oid, 'MEMBER')", list(roles))  # fmt: skip
        # Extensions the dump creates that this role cannot: untrusted ones. Pre-creating them does not help
        # either: pg_restore then runs COMMENT ON EXTENSION, which only the extension's owner may.
        available = {r["name"]: (bool(r["superuser"]), bool(r["trusted"])) for r in await conn.fetch(
            "SELECT v.name, v.superuser, v.trusted FROM pg_available_extension_versions v "
            "JOIN pg_available_extensions a ON a.name = v.name AND a.default_version = v.version "
            "WHERE v.name = ANY($1::text[])", list(extensions))}  # fmt: skip
        unavailable = frozenset(e for e in extensions if e not in available)
        superuser_only = frozenset(e for e in extensions if e in available and available[e] == (True, False))
        tables = active = None
        if exists:
            tables = await conn.fetchval(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND n.nspname <> ALL($1::text[]) "
                "AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'",
                list(SYSTEM_SCHEMAS),
            )
            active = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", database
            )
    except postgres.PostgresError as exc:
        raise postgres.describe(exc) from exc
    finally:
        await conn.close(timeout=2)
    return TargetState(
        reachable=True, server_version=str(row["v"]).split()[0], server_major=int(row["n"]) // 10000,
        exists=exists, user_tables=int(tables) if tables is not None else None,
        active_connections=int(active) if active is not None else None,
        roles_present=frozenset(r["rolname"] for r in present), roles_needed=tuple(roles),
        role=RoleState(name=str(me["rolname"]), superuser=bool(me["rolsuper"]), bypass_rls=bool(me["rolbypassrls"]),
                       create_db=bool(me["rolcreatedb"]), create_role=bool(me["rolcreaterole"]),
                       member_of=frozenset(r["rolname"] for r in member)),
        extensions_superuser_only=superuser_only, extensions_unavailable=unavailable, **base,
    )  # fmt: skip


class TenantReader:
    """Reads the live database completely or not at all: through row-level security one tenant at a time.

    A role that is neither superuser nor BYPASSRLS sees zero rows in Engram's
    FORCEd tenant tables: an empty answer there proves nothing. Such tables are
    read per tenant (app.current_tenant set in a transaction, users enumerated
    from `users`, which has no RLS); what cannot be read that way is reported as
    unchecked, never as empty.
    """

    def __init__(self, conn: postgres.Connection, forced: frozenset[str], sees_all: bool) -> None:
        self.conn, self.forced, self.sees_all = conn, forced, sees_all
        self.tenants: list[str] | None = None
        self.unchecked: dict[str, str] = {}

    def per_tenant(self, tables: Sequence[str]) -> bool:
        return not self.sees_all and any(t in self.forced for t in tables)

    async def each(self, tables: Sequence[str], sql: str, *args: Any, readonly: bool = True) -> list[Any]:
        """Every row `sql` (reading or, not `readonly`, writing `tables`) returns: where row-level security
        would hide rows, one transaction, tenant by tenant. Raises PostgresError."""
        if not self.per_tenant(tables):
            return list(await self.conn.fetch(sql, *args))
        if self.tenants is None:
            self.tenants = [r["id"] for r in await self.conn.fetch("SELECT id::text AS id FROM users ORDER BY id")]
        rows: list[Any] = []
        async with self.conn.transaction(readonly=readonly):
            for tenant in self.tenants:
                # Transaction-local, as Engram's Repo sets it: it cannot leak into the next statement's tenant.
                await self.conn.execute("SELECT set_config('app.current_tenant', $1, true)", tenant)
                rows += await self.conn.fetch(sql, *args)
        return rows

    async def fetch(self, what: str, tables: Sequence[str], sql: str, *args: Any) -> list[Any] | None:
        """Every row of `sql` (which reads `tables`), or None (recorded in `unchecked`) if that is not knowable."""
        try:
            return await self.each(tables, sql, *args)
        except postgres.PostgresError as exc:
            self.unchecked[what] = f"cannot check {what}: {exc}"
            return None


async def live_state(settings: Settings, since: datetime) -> LiveState:
    """What a restore to `since` would undo in the live database (which may well be gone)."""
    try:
        conn = await postgres.connect(settings.database_url.get_secret_value())
    except RecoveryError as exc:
        return LiveState(reachable=False, problem=exc.message)
    # Engram stores naive UTC timestamps.
    point = since.astimezone(UTC).replace(tzinfo=None)
    # ...with whole seconds: what happened in the snapshot's own second cannot be placed before
    # or after it, so it counts as after (re-revoking, or copying a user's blobs aside, is harmless).
    second = point.replace(microsecond=0)
    try:
        p = await probe(conn)
        if not p.looks_like_engram:
            return LiveState(reachable=False, problem="the configured database holds no Engram tables")
        read = TenantReader(conn, p.forced_rls, p.sees_all_rows)
        newest: datetime | None = None
        for table in ("notes", "vaults", "attachments", "users"):
            if p.has_column(table, "updated_at"):
                rows = await read.fetch("newest_write", [table], f"SELECT max(updated_at) AS m FROM {table}")
                for value in (r["m"] for r in rows or ()):
                    if value is not None and (newest is None or value > newest):
                        newest = value
        issued: dict[str, int] = {}
        revoked: dict[str, list[str]] = {}
        users: set[str] = set()
        for table, created in {"refresh_tokens": "created_at", "device_refresh_tokens": "inserted_at",
                               "oauth_refresh_tokens": "inserted_at"}.items():  # fmt: skip
            if not p.has_table(table):
                continue
            rows = await read.fetch("tokens", [table], f"SELECT user_id::text AS u FROM {table} WHERE {created} >= $1",
                                    second)  # fmt: skip
            if rows is None:
                continue
            issued[table] = len(rows)
            users.update(r["u"] for r in rows)
            if p.has_column(table, "revoked_at"):
                found = await read.fetch("tokens", [table], f"SELECT id FROM {table} WHERE revoked_at >= $2 AND "
                                         f"{created} <= $1 ORDER BY id", point, second)  # fmt: skip
                if found is not None:
                    revoked[table] = sorted(str(r["id"]) for r in found)
        api_ids = created_after = None
        if p.has_table("api_keys"):
            keys = await read.fetch("api_keys", ["api_keys"], "SELECT id, created_at >= $1 AS new FROM api_keys",
                                    second)  # fmt: skip
            if keys is not None:
                api_ids = sorted(str(r["id"]) for r in keys)
                created_after = sum(1 for r in keys if r["new"])
        seqs: dict[str, int] | None = None
        if p.has_column("vaults", "change_seq"):
            cursors = "vault_device_cursors" in {r["t"] for r in await conn.fetch(
                "SELECT tablename AS t FROM pg_tables WHERE schemaname = current_schema()")}
            sql = ("SELECT v.id::text AS id, greatest(v.change_seq, coalesce(max(c.last_seq), 0)) AS s FROM vaults v "
                   "LEFT JOIN vault_device_cursors c ON c.vault_id = v.id GROUP BY v.id" if cursors
                   else "SELECT id::text AS id, change_seq AS s FROM vaults")
            found = await read.fetch("vault_seqs", ["vaults", "vault_device_cursors"] if cursors else ["vaults"], sql)
            seqs = None if found is None else {r["id"]: int(r["s"]) for r in found}
        newer = [r["id"] for r in await conn.fetch(
            "SELECT id::text AS id FROM users WHERE created_at >= $1 ORDER BY id", second)]
    except postgres.PostgresError as exc:
        return LiveState(reachable=False, problem=f"reading the live database failed: {exc}")
    finally:
        await conn.close(timeout=2)
    how = (f"role {p.role} sees every row" if p.sees_all_rows else
           f"role {p.role} is under row-level security: tenant tables read per tenant "
           f"({len(read.tenants or ())} user(s) from the users table)")  # fmt: skip
    return LiveState(
        reachable=True, newest_write=newest.replace(tzinfo=UTC) if newest else None, tokens_issued_after=issued,
        users_signing_in_again=len(users), revoked_after=revoked, api_key_ids=api_ids,
        api_keys_created_after=created_after, vault_seqs=seqs, newer_users=newer, read_as=how,
        unchecked=dict(read.unchecked),
    )  # fmt: skip


async def inventory_state(repo: Repository, point: RecoveryPoint) -> InventoryState | None:
    att = point.manifest.attachments
    if att.backend != "s3":
        return None
    if not att.inventory or point.manifest.artifact(att.inventory) is None:
        return InventoryState(present=False, problem="the manifest names no attachments inventory")
    key = point.prefix + att.inventory
    if not await repo.exists(key):
        return InventoryState(present=False, problem=f"the attachments inventory {key} is missing")
    entries = [e async for e in read_inventory(repo, key)]
    # Every blob re-read: one of the right size but other content is as unusable as a missing one.
    checked = await verify_blobs(repo, entries)
    return InventoryState(
        present=True, objects=len(entries), missing=[f"{k} ({why})" for k, why in checked.bad[:50]],
        missing_count=len(checked.bad), entries=[(e.key, e.repo_key, e.version_id) for e in entries],
        checked_by=checked.how,
    )


async def bucket_unknown_prefixes(runtime: Runtime, inventory: InventoryState | None) -> list[str] | None:
    """Top-level prefixes (user ids) in the live attachments bucket that the backup's inventory does not name."""
    location = runtime.attachments_location()
    if location is None or inventory is None or not inventory.present:
        return None
    known = {key.split("/", 1)[0] for key, _repo_key, _version in inventory.entries}
    prefixes: set[str] = set()
    try:
        async with s3.client(location) as client:
            paginator = client.get_paginator("list_objects_v2")
            # One request per 1,000 prefixes: the bucket's objects themselves are not listed.
            async for page in paginator.paginate(Bucket=location.bucket, Delimiter="/"):
                prefixes.update(p["Prefix"].rstrip("/") for p in page.get("CommonPrefixes", ()))
    except s3.S3_ERRORS:
        return None  # the bucket is gone too: nothing there to protect
    return sorted(prefixes - known - {"exports"})
