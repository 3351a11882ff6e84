"""restore_drill: restore a recovery point into a scratch database and prove it is usable.

"A backup that has never been restored is not a backup." The drill re-hashes
the artifacts, creates `engram_drill_<time>_<random>` on the same server,
streams the decrypted dump into stock pg_restore, then proves that the master
key unwraps the restored canary, that sampled notes and attachments decrypt
with their users' DEKs and match their content hashes, and that every row count
matches the manifest. The scratch database is dropped whatever happens, and
the result is recorded in the repository, where backup_status reads it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field

from ..core import backup_crypto, drill, postgres
from ..core import restore_checks as rc
from ..core.errors import ConfigurationError, IntegrityError, RecoveryError, scrub
from ..core.mirror import read_inventory
from ..core.progress import Progress
from ..core.repository import DRILLS, Repository, open_repository
from ..core.runtime import Runtime
from ..core.schema_probe import probe
from .base import ToolInput, ToolResult, ToolSpec, Verdict

T = TypeVar("T")
RTO_STEPS = ("verify", "create_database", "restore")


class RestoreDrillInput(ToolInput):
    recovery_point: str = Field(
        default="latest", description="'latest', a backup id, or 'before:<ISO time>'."
    )
    sample_notes: int = Field(default=50, ge=1, le=10_000, description="Notes to decrypt and hash-check.")
    sample_attachments: int = Field(default=20, ge=0, le=10_000, description="Attachments to decrypt and check.")


class DrillStep(BaseModel):
    name: str
    ok: bool
    seconds: float
    summary: str
    details: dict[str, Any] = Field(default_factory=dict)


class RestoreDrillResult(ToolResult):
    verdict: Verdict = Field(description="ok: this recovery point restores and reads; fail: it does not (see steps).")
    summary: str
    backup_id: str | None
    scratch_database: str | None
    scratch_dropped: bool = Field(description="The scratch database is gone (always true unless the server failed).")
    leftovers_dropped: list[str] = Field(default_factory=list, description="Stale drill databases swept first.")
    steps: list[DrillStep]
    rto_seconds: float | None = Field(description="Verify + create + restore: the time to a restored database.")
    total_seconds: float
    record: str | None = Field(description="Repository key of the drill record backup_status reads.")


class _Run:
    def __init__(self, progress: Progress) -> None:
        self.steps: list[DrillStep] = []
        self.progress = progress
        # Set as soon as the name is chosen, so the finally clause drops it even if creation failed half-way.
        self.scratch: str | None = None

    async def step(self, name: str, fn: Callable[[], Awaitable[T]], done: Callable[[T], str]) -> T:
        await self.progress(len(self.steps), None, f"drill: {name}")
        started = time.perf_counter()
        try:
            value = await fn()
        except RecoveryError as exc:
            self.steps.append(DrillStep(name=name, ok=False, seconds=time.perf_counter() - started,
                                        summary=str(exc).replace("\n", " ")))  # fmt: skip
            raise
        self.steps.append(DrillStep(name=name, ok=True, seconds=round(time.perf_counter() - started, 3),
                                    summary=done(value)))  # fmt: skip
        return value

    def proof(self, proof: drill.Proof, seconds: float) -> None:
        self.steps.append(DrillStep(name=f"prove_{proof.name}", ok=proof.ok, seconds=round(seconds, 3),
                                    summary=proof.summary, details=proof.details))  # fmt: skip


async def _admin(dsn: str) -> postgres.Connection:
    # The live database may be the very thing that was lost: fall back to the maintenance database.
    try:
        return await postgres.connect(dsn)
    except RecoveryError:
        return await postgres.connect(dsn, database="postgres")


async def restore_drill(runtime: Runtime, params: RestoreDrillInput, progress: Progress) -> RestoreDrillResult:
    settings = runtime.settings
    keys = rc.key_material(settings)
    if keys.current is None:
        raise ConfigurationError(keys.current_problem or "ENCRYPTION_MASTER_KEY is not available to this tool",
                                 "set ENCRYPTION_MASTER_KEY or ENCRYPTION_MASTER_KEY_FILE: the drill proves the key "
                                 "opens the restored data")  # fmt: skip
    backup_key = backup_crypto.parse_key(settings.backup_key.get_secret_value()) if settings.backup_key else None
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
        point = await rc.resolve(repo, params.recovery_point)
        try:
            backup_id = point.manifest.backup_id
            await _drill(runtime, repo, point, params, keys.current, backup_key, run, now, swept)
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
            record = await _record(repo, now, backup_id, ok, rto, run.steps, scratch)
    failed = [s for s in run.steps if not s.ok]
    summary = (f"drill passed: {backup_id} restores with stock pg_restore and reads with the master key; "
               f"RTO {rto:.1f} s" if ok and rto is not None else
               "drill FAILED: " + "; ".join(f"{s.name}: {s.summary}" for s in failed))  # fmt: skip
    await progress(len(run.steps), len(run.steps), "drill finished")
    return RestoreDrillResult(
        verdict="ok" if ok else "fail", summary=summary, backup_id=backup_id, scratch_database=scratch,
        scratch_dropped=dropped, leftovers_dropped=swept, steps=run.steps, rto_seconds=round(rto, 3) if rto else rto,
        total_seconds=round(total, 3), record=record,
    )  # fmt: skip


async def _drill(
    runtime: Runtime, repo: Repository, point: rc.RecoveryPoint, params: RestoreDrillInput, key: bytes,
    backup_key: bytes | None, run: _Run, now: datetime, swept: list[str],
) -> None:
    manifest = point.manifest
    verdicts = await run.step("verify", lambda: rc.verify_artifacts(repo, point),
                              lambda v: f"{len(v)} artifact(s) match their SHA-256")  # fmt: skip
    bad = [v for v in verdicts if not v.ok]
    if bad:
        run.steps[-1] = run.steps[-1].model_copy(update={"ok": False, "summary": "; ".join(
            v.problem or "" for v in bad)})
        return
    dumps = [a for a in manifest.artifacts if a.kind == "database"]
    directory = manifest.database.dump_format == "directory"
    if not dumps or (len(dumps) != 1 and not directory):
        raise IntegrityError(f"the manifest of {manifest.backup_id} lists {len(dumps)} database dump artifacts",
                             "choose another recovery point")  # fmt: skip
    admin = await _admin(runtime.dsn)
    try:
        swept.extend(await drill.sweep_leftovers(admin, now))
        name = drill.scratch_name(now)
        run.scratch = name
        await run.step("create_database", lambda: drill.create_scratch(admin, name), lambda _: f"created {name}")
    finally:
        await admin.close(timeout=2)
    scratch_dsn = _with_database(runtime.dsn, name)
    if directory:
        await run.step("restore", lambda: drill.restore_directory(runtime.settings.pg_restore, scratch_dsn, repo,
                                                                  manifest.backup_id, backup_key),
                       lambda n: f"stock pg_restore --jobs=2 restored a directory dump of {n} bytes")  # fmt: skip
    else:
        command = drill.RestoreCommand(runtime.settings.pg_restore, scratch_dsn, manifest.database.dump_format)
        stream = drill.plaintext(repo, point.prefix + dumps[0].name, dumps[0], backup_key)
        await run.step("restore", lambda: drill.restore_stream(command, stream),
                       lambda n: f"stock {command.argv[0].rsplit('/', 1)[-1]} restored {n} bytes of dump")  # fmt: skip
    async with postgres.connection(scratch_dsn) as conn:
        p = await probe(conn)
        if not p.sees_all_rows:
            raise IntegrityError(f"role {p.role} sees no rows under row-level security in the scratch database",
                                 "run the drill as a superuser or a role with BYPASSRLS")  # fmt: skip
        proofs: list[Callable[[], Awaitable[drill.Proof]]] = [
            lambda: drill.prove_canary(conn, manifest, key),
            lambda: drill.prove_counts(conn, manifest),
            lambda: drill.prove_notes(conn, key, params.sample_notes),
            lambda: _prove_attachments(conn, repo, point, key, params.sample_attachments),
        ]
        for prove in proofs:
            t0 = time.perf_counter()
            await run.progress(len(run.steps), None, "drill: proving")
            run.proof(await prove(), time.perf_counter() - t0)


async def _prove_attachments(
    conn: postgres.Connection, repo: Repository, point: rc.RecoveryPoint, key: bytes, sample: int
) -> drill.Proof:
    att = point.manifest.attachments
    if sample == 0:
        return drill.Proof("attachments", True, "not sampled (sample_attachments=0)")
    if att.backend == "database":
        return await drill.prove_attachments_in_db(conn, key, sample)
    if not att.inventory:
        return drill.Proof("attachments", False, "the backup records no attachments inventory")
    pool = {e.key: e.repo_key async for e in read_inventory(repo, point.prefix + att.inventory)}
    return await drill.prove_attachments_mirrored(conn, key, sample, repo, pool)


def _with_database(dsn: str, database: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


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


async def _record(
    repo: Repository, now: datetime, backup_id: str, ok: bool, rto: float | None, steps: list[DrillStep],
    scratch: str | None,
) -> str | None:
    key = f"{DRILLS}{now.strftime('%Y%m%dT%H%M%SZ')}-{backup_id}.json"
    body = {"at": now.isoformat(), "backup_id": backup_id, "ok": ok, "rto_seconds": rto,
            "scratch_database": scratch, "steps": [s.model_dump() for s in steps]}  # fmt: skip
    try:
        await repo.put_bytes(key, json.dumps(body, indent=2).encode())
    except RecoveryError as exc:
        steps.append(DrillStep(name="record", ok=False, seconds=0.0, summary=str(exc).replace("\n", " ")))
        return None
    return key


SPEC = ToolSpec(
    name="restore_drill",
    title="Restore drill",
    description=(
        "Prove a recovery point restores: re-hashes its artifacts, restores it with stock pg_restore into a NEW "
        "scratch database engram_drill_<time>_<random> on the same server, then checks that the master key "
        "(from the environment) unwraps the restored boot canary, that sampled notes and attachments decrypt with "
        "their users' keys and match their content hashes, and that every row count matches the manifest. "
        "Measures the recovery time (RTO) per step, always drops the scratch database (and stale ones from killed "
        "drills), and records the result in the repository (backup_status shows the last successful drill). "
        "Never touches an existing database. Run it after backups and at least monthly."
    ),
    input_model=RestoreDrillInput,
    result_model=RestoreDrillResult,
    run=restore_drill,
    annotations=ToolAnnotations(
        title="Restore drill", read_only_hint=False, destructive_hint=False, idempotent_hint=False,
        open_world_hint=True,
    ),
    writes=True,
)
