"""restore_drill: restore a recovery point into a scratch database, prove it reads, drop it, record it.

The run and its steps; the restore is the restore engine's (database.py, as a real restore does it,
with its check of tables, constraints, indexes and row counts); drill.py holds the scratch database
and the proofs. tools/restore_drill.py is the MCP adapter.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
from pydantic import BaseModel, Field

from ..artifact import encryption as backup_crypto
from ..engram.schema_probe import probe
from ..errors import ConfigurationError, IntegrityError, RecoveryError, scrub
from ..progress import Progress
from ..repository import open_repository
from ..repository.base import Repository
from ..repository.layout import drill_record_key
from ..repository.manifest import Manifest
from ..repository.points import RecoveryPoint, point_in_time, resolve
from ..repository.pool import BlobCheck, read_inventory, verify_blobs
from ..repository.records import DrillRecord, DrillStep
from ..repository.verify import verify_artifacts
from ..runtime import Runtime
from ..stores import postgres
from ..stores.pgclient.commands import RestoreClients
from ..stores.pgclient.versions import ClientVersion, beside
from ..verdict import Verdict
from . import drill, pitr_drill
from . import observe as rc
from .database import DatabaseRestore, DumpRestore, restore_database

RTO_STEPS = ("verify", "create_database", "restore")


@dataclass(frozen=True)
class DrillRequest:
    """What restore_drill was asked (the tool's input, validated)."""

    recovery_point: str = "latest"
    sample_notes: int = 50
    sample_attachments: int = 20


# (No docstring: the tool's result inherits this model, and its schema must not gain a description.)
class DrillReport(BaseModel):
    verdict: Verdict = Field(description="ok: this recovery point restores and reads; fail: it does not (see steps).")
    summary: str
    backup_id: str | None
    scratch_database: str | None
    scratch_dropped: bool = Field(description="The scratch database is gone (always true unless the server failed).")
    leftovers_dropped: list[str] = Field(default_factory=list, description="Stale drill databases swept first.")
    steps: list[DrillStep]
    key_verdict: str | None = Field(default=None, description="The restored boot canary under Engram's key rules "
                                    "(ok, previous_key_only, wrong_key, kms_wrapped, canary_corrupt, canary_empty): "
                                    "the same codes as plan_restore's master_key check.")
    rto_seconds: float | None = Field(description="Verify + create + restore: the time to a restored database.")
    total_seconds: float
    record: str | None = Field(description="Repository key of the drill record backup_status reads.")


class _Run(drill.Steps):
    def __init__(self, progress: Progress) -> None:
        super().__init__(progress)
        # Set as soon as the name is chosen, so the finally clause drops it even if creation failed half-way.
        self.scratch: str | None = None


async def _admin(dsn: str) -> postgres.Connection:
    # The live database may be the very thing that was lost: fall back to the maintenance database.
    try:
        return await postgres.connect(dsn)
    except RecoveryError:
        return await postgres.connect(dsn, database="postgres")


@dataclass(frozen=True)
class Drill:
    """One drill, as its steps share it (instead of nine parameters each)."""

    runtime: Runtime
    repo: Repository
    point: RecoveryPoint
    params: DrillRequest
    keys: drill.Keys
    backup_key: bytes | None
    run: _Run
    now: datetime
    swept: list[str]  # stale drill databases dropped first, filled in by the run


async def run_drill(runtime: Runtime, params: DrillRequest, progress: Progress) -> DrillReport:
    """Verify, restore into a scratch database, prove it reads, drop it, record the drill."""
    moment = point_in_time(params.recovery_point)
    if moment is not None:  # at:<time>: Barman's recovery on a scratch server, the same proofs (pitr_drill.py)
        return DrillReport(**await pitr_drill.run_pitr_drill(runtime, moment, params.sample_notes,
                                                             params.sample_attachments, progress))  # fmt: skip
    settings = runtime.settings
    keys = rc.drill_keys(settings)
    backup_key = backup_crypto.backup_key(settings)
    started, now = time.perf_counter(), datetime.now(UTC)
    run = _Run(progress)
    scratch: str | None = None
    dropped = True
    swept: list[str] = []
    backup_id: str | None = None
    record: str | None = None
    async with open_repository(settings) as repo:
        # A recovery point that does not resolve is the caller's input, answered as plan_restore answers it
        # (an error with its fix), not a drill that ran and failed.
        point = await resolve(repo, params.recovery_point)
        ctx = Drill(runtime, repo, point, params, keys, backup_key, run, now, swept)
        try:
            backup_id = point.manifest.backup_id
            await _drill(ctx)
        except (RecoveryError, postgres.PostgresError) as exc:
            # A database error inside a proof (a table the manifest counts is missing, say) fails the drill too.
            text = str(exc) if isinstance(exc, RecoveryError) else scrub(f"PostgreSQL error: {exc}")
            if not run.steps or run.steps[-1].ok:
                run.steps.append(DrillStep(name="drill", ok=False, seconds=0.0, summary=text.replace("\n", " ")))
        finally:
            scratch = run.scratch
            if scratch is not None:
                with anyio.CancelScope(shield=True):
                    dropped = await _drop(runtime.dsn, scratch, run)
        ok = all(s.ok for s in run.steps) and dropped and backup_id is not None
        rto = sum(s.seconds for s in run.steps if s.name in RTO_STEPS) if ok else None
        total = time.perf_counter() - started
        if backup_id is not None:
            record = await _record(ctx, ok, rto)
    failed = [s for s in run.steps if not s.ok]
    summary = (f"drill passed: {backup_id} restores with stock pg_restore and reads with the master key; "
               f"RTO {rto:.1f} s" if ok and rto is not None else
               "drill FAILED: " + "; ".join(f"{s.name}: {s.summary}" for s in failed))  # fmt: skip
    await progress(len(run.steps), len(run.steps), "drill finished")
    return DrillReport(
        verdict="ok" if ok else "fail", summary=summary, backup_id=backup_id, scratch_database=scratch,
        scratch_dropped=dropped, leftovers_dropped=swept, steps=run.steps,
        key_verdict=next((s.code for s in run.steps if s.name == "prove_canary"), None),
        rto_seconds=round(rto, 3) if rto else rto,
        total_seconds=round(total, 3), record=record,
    )  # fmt: skip


async def _drill(ctx: Drill) -> None:
    runtime, repo, point, params, keys, run = ctx.runtime, ctx.repo, ctx.point, ctx.params, ctx.keys, ctx.run
    now = ctx.now
    manifest = point.manifest
    verdicts = await run.step("verify", lambda: verify_artifacts(repo, point),
                              lambda v: f"{len(v)} artifact(s) match their SHA-256")  # fmt: skip
    bad = [v for v in verdicts if not v.ok]
    if bad:
        run.steps[-1] = run.steps[-1].model_copy(update={"ok": False, "summary": "; ".join(
            v.problem or "" for v in bad)})
        return
    if manifest.attachments.backend == "s3" and manifest.attachments.inventory:
        blobs = await run.step("verify_attachments", lambda: _verify_blobs(repo, point),
                               lambda c: f"{c.objects} mirrored blob(s) checked by {c.how}")  # fmt: skip
        if blobs.bad:
            run.steps[-1] = run.steps[-1].model_copy(update={"ok": False, "summary": (
                f"{len(blobs.bad)} of {blobs.objects} mirrored blob(s) do not match the inventory: "
                + "; ".join(f"{key} ({why})" for key, why in blobs.bad[:3])), "details": {"bad": blobs.bad[:20]}})
            return
    dumps = [a for a in manifest.artifacts if a.kind == "database"]
    directory = manifest.database.dump_format == "directory"
    if not dumps or (len(dumps) != 1 and not directory):
        raise IntegrityError(f"the manifest of {manifest.backup_id} lists {len(dumps)} database dump artifacts",
                             "choose another recovery point")  # fmt: skip
    admin = await _admin(runtime.dsn)
    try:
        # Refuse before creating anything when no pg_restore here can read this dump into this server.
        server = int(await admin.fetchval("SHOW server_version_num")) // 10000
        client = await run.step("pg_restore", lambda: _restore_client(runtime, manifest, server),
                                lambda c: f"pg_restore {c.major} ({c.origin}: {c.path})")  # fmt: skip
        if directory and client.prefix:
            raise ConfigurationError(
                "a directory-format dump cannot be drilled through ENGRAM_RECOVERY_PG_CLIENT_PREFIX: pg_restore reads "
                "its files where the prefix runs it, not here",
                "unset the prefix for the drill (the bundled pg_restore is used), or drill a custom-format backup",
            )
        ctx.swept.extend(await drill.sweep_leftovers(admin, now))
        name = drill.scratch_name(now)
        run.scratch = name
        # Owned by the source database's owner, as a real restore must be (schema grants expect it).
        await run.step("create_database", lambda: drill.create_scratch(admin, name, manifest.database.owner),
                       lambda owner: f"created {name}, owned by {owner}")  # fmt: skip
    finally:
        await admin.close(timeout=2)
    scratch_dsn = postgres.with_database(runtime.dsn, name)
    restored = await run.step("restore", lambda: _restore(ctx, client, scratch_dsn),
                              lambda r: f"stock tools restored {r.plain_bytes} bytes of dump: {r.why}")  # fmt: skip
    # The engine checked the restored database against the backup after loading it: that check is a proof, and its
    # time is not part of the time to a restored database.
    checked = restored.timings.get("verify", 0.0)
    run.steps[-1] = run.steps[-1].model_copy(update={
        "seconds": round(max(0.0, run.steps[-1].seconds - checked), 3),
        "details": {"mode": restored.mode, "jobs": restored.jobs, "timings": restored.timings},
    })  # fmt: skip
    async with postgres.connection(scratch_dsn) as conn:
        p = await probe(conn)
        if not p.sees_all_rows:  # before the counts are reported: under RLS they would read as lost rows
            raise IntegrityError(f"role {p.role} sees no rows under row-level security in the scratch database",
                                 "run the drill as a superuser or a role with BYPASSRLS")  # fmt: skip
        for proof in drill.schema_proofs(restored.check, len(manifest.database.row_counts)):
            run.proof(proof, checked / 2)
        proofs: list[Callable[[], Awaitable[drill.Proof]]] = [
            lambda: drill.prove_canary(conn, manifest, keys),
            lambda: drill.prove_notes(conn, keys, params.sample_notes),
            lambda: _prove_attachments(conn, repo, point, keys, params.sample_attachments),
        ]
        for prove in proofs:
            await run.prove(prove)


async def _restore(ctx: Drill, client: ClientVersion, dsn: str) -> DatabaseRestore:
    """The restore engine a real restore uses, into the scratch database; its progress is the drill's."""
    run = ctx.run

    async def progress(done: float, total: float | None = None, message: str | None = None) -> None:
        await run.progress(len(run.steps), None, f"drill: restore: {message}")

    clients = RestoreClients(client.path, beside(client.path, "psql"), client.prefix)
    # The verify step has just checked the artifact against the manifest: the engine does not hash it again.
    return await restore_database(DumpRestore(ctx.repo, ctx.point.manifest, ctx.backup_key, dsn, clients,
                                              progress=progress, verified=True))  # fmt: skip


async def _verify_blobs(repo: Repository, point: RecoveryPoint) -> BlobCheck:
    assert point.manifest.attachments.inventory is not None
    entries = [e async for e in read_inventory(repo, point.prefix + point.manifest.attachments.inventory)]
    return await verify_blobs(repo, entries)


async def _restore_client(runtime: Runtime, manifest: Manifest, server_major: int) -> ClientVersion:
    return (await rc.restore_client(runtime.settings, manifest, server_major)).require()


async def _prove_attachments(
    conn: postgres.Connection, repo: Repository, point: RecoveryPoint, keys: drill.Keys, sample: int
) -> drill.Proof:
    att = point.manifest.attachments
    if att.backend != "database" and not att.inventory:
        return drill.Proof("attachments", False, "the backup records no attachments inventory")
    pool: dict[str, str] = {}
    if att.inventory and att.backend != "database":
        pool = {e.key: e.repo_key async for e in read_inventory(repo, point.prefix + att.inventory)}
    if sample == 0:
        proof = drill.Proof("attachments", True, "not sampled (sample_attachments=0)")
    elif att.backend == "database":
        proof = await drill.prove_attachments_in_db(conn, keys, sample)
    else:
        proof = await drill.prove_attachments_mirrored(conn, keys, sample, repo, pool)
    return await _lacking(conn, proof, None if att.backend == "database" else pool)


async def _lacking(conn: postgres.Connection, proof: drill.Proof, pool: dict[str, str] | None) -> drill.Proof:
    """Say how many live attachments of the restored database have no blob in this backup."""
    live = "FROM attachments a WHERE a.deleted_at IS NULL AND a.storage_key IS NOT NULL"
    if pool is None:
        absent = "NOT EXISTS (SELECT 1 FROM storage_objects o WHERE o.storage_key = a.storage_key)"
        lacking = [r["k"] for r in await conn.fetch(f"SELECT a.storage_key AS k {live} AND {absent} ORDER BY 1")]
    else:
        lacking = sorted(k for k in [r["k"] for r in await conn.fetch(f"SELECT a.storage_key AS k {live}")]
                         if k not in pool)  # fmt: skip
    proof.details["lacking"] = len(lacking)
    if lacking:
        proof.details["lacking_keys"] = lacking[:20]
        proof.summary += (f"; this backup lacks {len(lacking)} live attachment(s), whose blob was not at the source "
                          f"when it was taken (e.g. {', '.join(lacking[:3])})")
    else:
        proof.summary += "; no live attachment lacks its blob"
    return proof


async def _drop(dsn: str, name: str, run: _Run) -> bool:
    t0 = time.perf_counter()
    try:
        admin = await _admin(dsn)
        try:
            await drill.drop_scratch(admin, name)
            gone = not await drill.scratch_exists(admin, name)
        finally:
            await admin.close(timeout=2)
    except (RecoveryError, postgres.PostgresError) as exc:
        run.steps.append(DrillStep(name="drop_database", ok=False, seconds=time.perf_counter() - t0,
                                   summary=f"could not drop {name}: {exc}; the next drill sweeps it after "
                                   f"{drill.STALE_AFTER}"))  # fmt: skip
        return False
    run.steps.append(DrillStep(name="drop_database", ok=gone, seconds=round(time.perf_counter() - t0, 3),
                               summary=f"dropped {name}" if gone else f"{name} still exists"))  # fmt: skip
    return gone


async def _record(ctx: Drill, ok: bool, rto: float | None) -> str | None:
    backup_id, steps = ctx.point.manifest.backup_id, ctx.run.steps
    key = drill_record_key(ctx.now, backup_id)
    record = DrillRecord(at=ctx.now, backup_id=backup_id, ok=ok, rto_seconds=rto, scratch_database=ctx.run.scratch,
                         steps=steps)  # fmt: skip
    try:
        await ctx.repo.put_bytes(key, record.to_json())
    except RecoveryError as exc:
        steps.append(DrillStep(name="record", ok=False, seconds=0.0, summary=str(exc).replace("\n", " ")))
        return None
    return key
