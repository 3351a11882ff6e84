"""The steps of run_restore (run.py), in Engram's order; each returns what it did and what it changed.

Every step is idempotent where it can be (the attachments copy skips what is already there) and
says exactly what it changed, so the report can describe the target after any stop.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field, SecretStr

from ..artifact.encryption import backup_key
from ..engram.canary import read_canary
from ..engram.keys import judge_canary
from ..errors import ConfigurationError, RecoveryError, UnsafeOperation
from ..progress import Progress
from ..reindex.run import ReindexRequest, reindex
from ..repository.base import Repository
from ..repository.manifest import Manifest
from ..repository.points import RecoveryPoint, resolve
from ..runtime import Runtime
from ..stores import postgres
from ..stores.pgclient.commands import RestoreClients
from ..stores.pgclient.versions import beside
from ..stores.postgres import quote_ident
from . import fences
from . import observe as rc
from .copy_back import copy_back
from .database import DumpRestore, restore_database
from .plan import KeyMaterial
from .token import Premises

StepStatus = Literal["ok", "warn", "failed", "skipped"]
# A target this run dropped and could not create again: its state, a premise, moved; a new plan sees it absent.
REPLAN_ABSENT = "run plan_restore again (it sees the target absent) and restore with its plan_token"
# The role Engram's tables are granted to; Engram.Release.prepare_database creates it (NOLOGIN) at boot.
APP_ROLE = "engram_app"


@dataclass(frozen=True)
class RestoreRequest:
    """What run_restore was asked (the tool's input, validated)."""

    plan_token: str
    confirm: bool = False
    resume: bool = False
    revoke_tokens: bool = True
    advance_sync: bool = True
    protect_orphans: bool = True
    reindex_qdrant: bool = True
    jobs: int = 2


class RestoreStep(BaseModel):
    name: str
    status: StepStatus
    seconds: float = Field(default=0.0, description="Wall time of the step: the RTO, step by step.")
    summary: str
    changed: list[str] = Field(default_factory=list, description="What the step changed, exactly.")
    details: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Needs:
    """What the restored database needs of the target server before it can be restored."""

    roles: frozenset[str]  # every role it names (owners, grantees, policies)
    owner: str | None  # the database's owner, given to the new target


class Source(Protocol):
    """Where the restored data comes from, asked rather than switched on: a dump backup in the repository
    (`DumpSource`) or a point in time recovered by Barman (pitr_run.PitrSource). The other steps are shared."""

    def describe(self) -> str:
        """What is restored, for the summaries ("backup X" or "base backup X plus WAL to T")."""
        ...

    async def needs(self, ctx: Context) -> Needs: ...

    async def database(self, ctx: Context) -> RestoreStep:
        """The database step: the restored database in the target, verified."""
        ...

    async def expected_canary(self, ctx: Context) -> str | None:
        """The id of the boot canary the restored database must hold, where one was recorded."""
        ...

    async def attachments(self, ctx: Context) -> RestoreStep:
        """The attachments step: the bucket as the restored rows expect it."""
        ...

    async def attachments_in_s3(self, ctx: Context) -> bool: ...

    async def qdrant_configured(self, ctx: Context) -> bool: ...

    def annotate(self, step: RestoreStep) -> RestoreStep:
        """A finished step, with what the source did during it (e.g. a recovery a step's question started)."""
        ...

    async def close(self) -> RestoreStep | None:
        """Release what the source holds (a scratch server): a final step to report, or None."""
        ...


@dataclass
class Context:
    """One run_restore, as every step shares it."""

    runtime: Runtime
    repo: Repository
    request: RestoreRequest
    premises: Premises
    keys: KeyMaterial
    run_id: str
    progress: Progress
    own_partial: bool  # resuming: the target holds this run's own partial restore
    source: Source
    live_snapshot: dict[str, Any] | None = None
    log_key: str | None = None
    log_problem: str | None = None

    @property
    def target_dsn(self) -> str:
        return postgres.with_database(self.runtime.dsn, self.premises.target_database)

    def sub(self, name: str) -> Progress:
        """An engine's progress, forwarded as messages of this step."""

        async def forward(done: float, total: float | None = None, message: str | None = None) -> None:
            await self.progress(done, total, f"{name}: {message}" if message else name)

        return forward

    def snapshot(self) -> fences.LiveSnapshot:
        if self.live_snapshot is None:
            raise ConfigurationError("the live snapshot of this run is missing from its log",
                                     "run plan_restore again and restore with the new token")  # fmt: skip
        return fences.LiveSnapshot.model_validate(self.live_snapshot)


def _step(name: str, summary: str, changed: list[str] | None = None, status: StepStatus = "ok",
          details: dict[str, Any] | None = None) -> RestoreStep:  # fmt: skip
    return RestoreStep(name=name, status=status, summary=summary, changed=changed or [], details=details or {})


@contextlib.asynccontextmanager
async def admin(dsn: str) -> AsyncIterator[postgres.Connection]:
    """A connection for CREATE ROLE / DATABASE: never to the target (it would block the drop) nor the live one."""
    try:
        conn = await postgres.connect(dsn, database="postgres")
    except RecoveryError:  # a server without the maintenance database
        conn = await postgres.connect(dsn, database="template1")
    try:
        yield conn
    finally:
        await conn.close(timeout=2)


async def snapshot_live(ctx: Context) -> RestoreStep:
    snap = await fences.snapshot_live(ctx.runtime.dsn)
    ctx.live_snapshot = snap.model_dump(mode="json")
    if snap.readable:
        return _step("snapshot_live", "the live database was read for the fences before anything was dropped")
    return _step("snapshot_live", "the live database is not readable: the fences fall back to what needs no live "
                 "state (see each fence)", status="warn")  # fmt: skip


async def roles(ctx: Context) -> RestoreStep:
    """The roles the restored database names, created NOLOGIN as Engram's prepare_database creates engram_app."""
    needs = await ctx.source.needs(ctx)
    needed, owner = set(needs.roles), needs.owner
    created: list[str] = []
    async with admin(ctx.runtime.dsn) as conn:
        present = {r["rolname"] for r in await conn.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY($1::text[])", sorted(needed))}  # fmt: skip
        for role in sorted(needed - present):
            await conn.execute(f"CREATE ROLE {quote_ident(role)} NOLOGIN")
            created.append(f"created role {role} NOLOGIN")
        # Engram's Repo SETs ROLE engram_app inside tenant transactions: its connecting role must be a member.
        if APP_ROLE in needed and owner and owner != APP_ROLE and not await conn.fetchval(
                "SELECT pg_has_role($1, $2, 'MEMBER')", owner, APP_ROLE):  # fmt: skip
            await conn.execute(f"GRANT {quote_ident(APP_ROLE)} TO {quote_ident(owner)}")
            created.append(f"granted {APP_ROLE} to {owner}")
    if not created:
        return _step("roles", f"every role the dump names exists: {', '.join(sorted(needed)) or '(none)'}")
    login = [r for r in sorted(needed - present) if r != APP_ROLE]
    note = (f"; {', '.join(login)} cannot log in yet: give Engram's connecting role LOGIN and its password "
            "(ALTER ROLE ... LOGIN PASSWORD ...) before booting the app" if login else "")  # fmt: skip
    return _step("roles", f"{len(created)} change(s) to roles{note}", created)


async def target(ctx: Context) -> RestoreStep:
    """Create the target; drop it first only where the plan chose so, or where it holds this run's partial restore."""
    name = ctx.premises.target_database
    changed: list[str] = []
    async with admin(ctx.runtime.dsn) as conn:
        exists = bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
        if exists:
            tables = await _user_tables(ctx.target_dsn)
            if tables and not (ctx.premises.allow_non_empty_target or ctx.own_partial):
                raise UnsafeOperation(f"{name} holds {tables} table(s) and the plan did not choose to replace it: "
                                      "nothing was dropped", "plan again with an empty target, or with "
                                      "allow_non_empty_target=true to drop and re-create it")  # fmt: skip
            if not tables and not ctx.own_partial:
                return _step("target", f"{name} exists and is empty: restored into as it is")
            await conn.execute(f"DROP DATABASE {quote_ident(name)}")
            why = "this run's own partial restore" if ctx.own_partial else "allow_non_empty_target=true"
            changed.append(f"dropped database {name} ({tables} table(s); {why})")
        try:
            owner = (await ctx.source.needs(ctx)).owner
            known = owner is not None and await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", owner)
            owned = f" OWNER {quote_ident(owner)}" if owner is not None and known else ""
            await conn.execute(f"CREATE DATABASE {quote_ident(name)}{owned} TEMPLATE template0")
        except (RecoveryError, postgres.PostgresError) as exc:
            if not changed:
                raise
            # The drop is done and cannot be undone: the failed step must say so, or the run would report the
            # target as untouched.
            cause = exc.message if isinstance(exc, RecoveryError) else f"PostgreSQL error: {exc}"
            raise UnsafeOperation(f"{changed[0]}, then could not create it again: {cause}",
                                  f"{name} is now absent: fix the cause, then {REPLAN_ABSENT}") from exc  # fmt: skip
        changed.append(f"created database {name}" + (f" owned by {owner}" if owned else ""))
    return _step("target", "; ".join(changed), changed)


async def _user_tables(dsn: str) -> int:
    async with postgres.connection(dsn) as conn:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND n.nspname <> ALL($1::text[]) "
            "AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'", list(rc.SYSTEM_SCHEMAS)))


async def database(ctx: Context) -> RestoreStep:
    return await ctx.source.database(ctx)


async def canary(ctx: Context) -> RestoreStep:
    """Engram's boot rule, offline: the current master key must unwrap the restored newest canary."""
    expected = await ctx.source.expected_canary(ctx)
    async with postgres.connection(ctx.target_dsn) as conn:
        found = await read_canary(conn)
    if found is None:
        return _step("canary", "the restored system_canaries is EMPTY: Engram would adopt any key at boot; do not "
                     "boot it on this database", status="failed", details={"code": "canary_empty"})  # fmt: skip
    if expected is not None and expected != found.id:
        return _step("canary", f"the restored canary {found.id} is not the one the backup recorded "
                     f"({expected})", status="failed", details={"code": "canary_replaced"})  # fmt: skip
    assert ctx.keys.current is not None  # run_restore refuses to start without it
    judged = judge_canary(ctx.keys.current, ctx.keys.previous, found.wrapped_dek, found.dek_sha256,
                          what="the restored boot canary")  # fmt: skip
    status: StepStatus = "ok" if judged.status == "ok" else "warn" if judged.status == "warn" else "failed"
    return _step("canary", judged.summary, status=status,
                 details={"code": judged.code, "canary_id": found.id} | judged.details)


async def attachments(ctx: Context) -> RestoreStep:
    return await ctx.source.attachments(ctx)


class DumpSource:
    """A dump backup of the repository: the manifest names the roles, the canary, the attachments."""

    def __init__(self, backup_id: str) -> None:
        self.backup_id = backup_id
        self._point: RecoveryPoint | None = None
        self._needs: Needs | None = None  # the roles and target steps both ask: read the dump's head once

    def describe(self) -> str:
        return self.backup_id

    async def point(self, ctx: Context) -> RecoveryPoint:
        if self._point is None:
            self._point = await resolve(ctx.repo, self.backup_id)
        return self._point

    async def manifest(self, ctx: Context) -> Manifest:
        return (await self.point(ctx)).manifest

    async def needs(self, ctx: Context) -> Needs:
        if self._needs is None:
            point = await self.point(ctx)
            db = point.manifest.database
            needed = set(db.roles_referenced) | set(db.object_owners or ()) | ({db.owner} if db.owner else set())
            if not db.roles_referenced and db.object_owners is None:
                needed |= await rc.roles_from_dump(ctx.runtime.settings, ctx.repo, point) or set()
            self._needs = Needs(frozenset(needed), db.owner)
        return self._needs

    async def expected_canary(self, ctx: Context) -> str | None:
        return (await self.manifest(ctx)).canary.id

    async def attachments_in_s3(self, ctx: Context) -> bool:
        return (await self.manifest(ctx)).attachments.backend == "s3"

    async def qdrant_configured(self, ctx: Context) -> bool:
        return (await self.manifest(ctx)).qdrant.configured

    def annotate(self, step: RestoreStep) -> RestoreStep:
        return step

    async def close(self) -> RestoreStep | None:
        return None

    async def database(self, ctx: Context) -> RestoreStep:
        return await _dump_database(ctx, await self.manifest(ctx))

    async def attachments(self, ctx: Context) -> RestoreStep:
        return await _dump_attachments(ctx, await self.manifest(ctx))


async def _dump_database(ctx: Context, manifest: Manifest) -> RestoreStep:
    """Stock pg_restore, parallel where the dump allows; then every table, constraint, index and row count."""
    settings = ctx.runtime.settings
    client = (await rc.restore_client(settings, manifest, ctx.premises.target_server_major,
                                      through_prefix=False)).require()  # fmt: skip
    clients = RestoreClients(client.path, beside(client.path, "psql"))
    done = await restore_database(DumpRestore(ctx.repo, manifest, backup_key(settings), ctx.target_dsn, clients,
                                              jobs=ctx.request.jobs, progress=ctx.sub("database")))  # fmt: skip
    changed = [f"restored {done.plain_bytes} bytes of pg_dump output into {ctx.premises.target_database} "
               f"with pg_restore {client.major} ({done.why})"]  # fmt: skip
    details = {"mode": done.mode, "jobs": done.jobs, "timings": done.timings, "tables": done.check.tables,
               "constraints": done.check.constraints, "indexes": done.check.indexes}  # fmt: skip
    if not done.check.ok:
        return _step("database", f"the restored database differs from the backup: {done.check.summary}", changed,
                     status="failed", details=details | {"missing": done.check.missing[:20], "counts_wrong": {
                         t: list(v) for t, v in done.check.counts_wrong.items()}})  # fmt: skip
    return _step("database", done.check.summary, changed, details=details)


async def _dump_attachments(ctx: Context, manifest: Manifest) -> RestoreStep:
    """The attachments exactly as recorded, from the repository's pool, each checked against its checksum."""
    if manifest.attachments.backend != "s3" or manifest.attachments.in_database_dump:
        return _step("attachments", "STORAGE_BACKEND=database: the attachments are rows of the database dump, "
                     "restored with it", status="skipped")  # fmt: skip
    bucket = ctx.runtime.attachments_location()
    if bucket is None:
        raise ConfigurationError("this backup's attachments were in S3, but no bucket is configured to restore "
                                 "them into", "set STORAGE_BACKEND=s3, STORAGE_BUCKET, STORAGE_HOST (or the AWS "
                                 "default) and STORAGE_ACCESS_KEY_ID/STORAGE_SECRET_ACCESS_KEY")  # fmt: skip
    done = await copy_back(ctx.repo, manifest, bucket, ctx.sub("attachments"))
    where = f"s3://{bucket.bucket}"
    changed = [f"copied {done.copied_objects} object(s) ({done.copied_bytes} bytes) into {where}"] if (
        done.copied_objects) else []  # fmt: skip
    details = {"objects": done.objects, "copied": done.copied_objects, "skipped": done.skipped_objects,
               "server_side_copy": done.server_side_copy, "bucket": bucket.bucket}  # fmt: skip
    if done.failures:
        bad = "; ".join(f"{f.key}: {f.reason}" for f in done.failures[:5])
        details["failures"] = [f.key for f in done.failures[:50]]
        return _step("attachments", f"{len(done.failures)} of {done.objects} blob(s) could not be restored: {bad}",
                     changed, status="failed", details=details)  # fmt: skip
    summary = (f"{done.objects} attachment(s) in {where} as recorded, each checked against its checksum "
               f"({done.copied_objects} copied, {done.skipped_objects} already there)")  # fmt: skip
    return _step("attachments", summary, changed, details=details)  # fmt: skip


SWITCHED_OFF = "switched_off"


def switched_off(name: str, consequence: str) -> RestoreStep:
    """A step the request switched off: skipped, and marked so that a resume that switches it on runs it."""
    return _step(name, f"switched off ({consequence})", status="skipped", details={SWITCHED_OFF: True})


def _fenced(name: str, result: fences.FenceResult) -> RestoreStep:
    changed = [f"{result.changed} change(s)"] + result.details if result.changed else []
    return _step(name, result.said, changed, details={"details": result.details})


async def fence_tokens(ctx: Context) -> RestoreStep:
    if not ctx.request.revoke_tokens:
        return switched_off("fence_tokens", "revoke_tokens=false: refresh tokens revoked and API keys deleted "
                            "after the backup are valid again in the restored database")
    async with postgres.connection(ctx.target_dsn) as conn:
        return _fenced("fence_tokens", await fences.fence_tokens(conn, ctx.snapshot()))


async def fence_sync(ctx: Context) -> RestoreStep:
    if not ctx.request.advance_sync:
        return switched_off("fence_sync", "advance_sync=false: Obsidian clients whose cursor is past the restored "
                            "vaults' change_seq will skip new writes")
    async with postgres.connection(ctx.target_dsn) as conn:
        return _fenced("fence_sync", await fences.fence_sync(conn, ctx.snapshot()))


async def protect_orphans(ctx: Context) -> RestoreStep:
    if not ctx.request.protect_orphans:
        return switched_off("protect_orphans", "protect_orphans=false: Engram's weekly OrphanSweep deletes the "
                            "blobs of users the restored database does not know")
    bucket = ctx.runtime.attachments_location() if await ctx.source.attachments_in_s3(ctx) else None
    async with postgres.connection(ctx.target_dsn) as conn:
        result = await fences.protect_orphans(conn, bucket, ctx.repo, ctx.run_id, ctx.sub("protect_orphans"))
    return _fenced("protect_orphans", result)


async def qdrant(ctx: Context) -> RestoreStep:
    """Qdrant's points belong to another moment than the restored chunks: queue the rebuild through the engine."""
    settings = ctx.runtime.settings
    if not ctx.request.reindex_qdrant:
        return switched_off("qdrant", "reindex_qdrant=false: search answers from vectors of another moment until "
                            "reindex_qdrant runs")
    if not await ctx.source.qdrant_configured(ctx) and not settings.qdrant_configured:
        return _step("qdrant", "no Qdrant in this deployment: nothing to rebuild", status="skipped")
    name = ctx.premises.target_database
    live = name == settings.database_name
    # The collection serves the database DATABASE_URL names: recreated only when that is the one restored.
    recreate = live and settings.qdrant_configured
    target_settings = settings.model_copy(update={"database_url": SecretStr(ctx.target_dsn)})
    async with Runtime(target_settings) as target_runtime:
        done = await reindex(target_runtime, ReindexRequest(mode="all", recreate_collection=recreate, confirm=True),
                             ctx.sub("qdrant"))  # fmt: skip
    changed = [f"queued {done.enqueued} EmbedNote job(s) in {name}"]
    if done.collection_recreated:
        changed.append(f"dropped and re-created the Qdrant collection {done.collection}")
    later = "" if live else (f"; the collection {done.collection} still serves the database DATABASE_URL names: when "
                             f"Engram is switched to {name}, run reindex_qdrant with recreate_collection=true there")
    return _step("qdrant", done.summary + later, changed,
                 details={"enqueued": done.enqueued, "backlog": done.backlog.total})


STEPS: tuple[tuple[str, Callable[[Context], Awaitable[RestoreStep]]], ...] = (
    ("snapshot_live", snapshot_live), ("roles", roles), ("target", target), ("database", database),
    ("canary", canary), ("attachments", attachments), ("fence_tokens", fence_tokens), ("fence_sync", fence_sync),
    ("protect_orphans", protect_orphans), ("qdrant", qdrant),
)  # fmt: skip


def describe_target(ctx: Context, steps: list[RestoreStep]) -> str:
    """What the target holds after these steps: exactly what the operator must know before doing anything."""
    done = {s.name for s in steps if s.status in ("ok", "warn", "skipped")}
    name = ctx.premises.target_database
    if "target" not in done:
        failed = next((s for s in steps if s.name == "target" and s.status == "failed"), None)
        if failed is not None and failed.summary.startswith("dropped database"):
            return (
                f"{name} was DROPPED (the plan chose allow_non_empty_target) and not created again: it is absent; "
                "plan again (the new plan sees it absent) and restore with that plan_token."
            )
        made = [c for s in steps if s.name == "roles" for c in s.changed]
        return f"{name} is untouched" + (f" (roles: {'; '.join(made)})" if made else "") + "."
    if "database" not in done:
        return (f"{name} exists and may hold a PARTIAL restore: do not use it; resume=true drops it and restores "
                "again.")  # fmt: skip
    if "canary" not in done:
        return (f"{name} holds the complete, verified database, but the master key does not open its boot canary: "
                "do NOT boot Engram on it. The token is bound to the key: with the right ENCRYPTION_MASTER_KEY, "
                "plan again with allow_non_empty_target=true (it replaces this database) and restore with that "
                "token.")
    if "attachments" not in done:
        return (f"{name} holds the complete, verified database and its canary opens; the bucket holds only part of "
                "the attachments: resume=true copies the rest (what is there is skipped).")
    fenced = {"fence_tokens", "fence_sync", "protect_orphans"}
    if not fenced <= done:
        return (f"{name} and the bucket are restored, but not every fence is applied "
                f"({', '.join(sorted(fenced - done))}): do not boot Engram before resume=true applies them.")
    if "qdrant" not in done:
        return f"{name}, the bucket and the fences are done; the Qdrant rebuild is not queued (resume=true)."
    return (f"{name} is restored ({ctx.source.describe()}), verified and fenced; the bucket holds the attachments "
            "its rows name (see the attachments step).")


def next_steps(ctx: Context, steps: list[RestoreStep]) -> list[str]:
    name = ctx.premises.target_database
    live = name == ctx.runtime.settings.database_name
    fingerprint = next((s.details.get("fingerprint") for s in steps if s.name == "canary"), None)
    out = [
        ("Boot Engram" if live else f"Point Engram's DATABASE_URL at {name}, then boot it")
        + f" with ENCRYPTION_MASTER_KEY = the key with fingerprint {fingerprint}: it runs its migrations, then its "
        "boot canary unwraps the newest system_canaries row with that key (checked here already) and refuses to "
        "start with any other.",
        "Access tokens are stateless JWTs signed with JWT_SECRET: those issued in the last 15 minutes stay valid "
        "until they expire unless JWT_SECRET is rotated (rotate it to cut them at once).",
        "Web sessions, Obsidian devices and MCP clients whose refresh tokens were minted after the backup get "
        "invalid_grant: their users sign in (or re-authorize) again; MCP clients registered after the backup "
        "register again.",
        "Obsidian clients reconnect and sync from the vaults' advanced change_seq (see fence_sync).",
    ]
    if any(s.name == "qdrant" and s.status == "ok" for s in steps):
        out.append("Watch the EmbedNote backlog drain (backup_status's oban check): search is incomplete until then.")
    if ctx.log_problem:
        out.append(f"The step log could not be written to the repository ({ctx.log_problem}): keep this result.")
    return out
