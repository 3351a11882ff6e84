"""run_restore: perform the restore a plan_restore token names, in Engram's order, fenced, resumable.

The token carries its premises (token.py). The run redoes the plan with the planner's own
observation and refuses, before touching anything, a token whose premises changed or a target
anything is connected to. Then, each a named step with its status, its time (the RTO per step) and
what it changed: snapshot the live database for the fences, create the roles the dump needs,
create (or, where the plan chose it, drop and re-create) the target, restore and verify the
database (database.py), prove the master key opens the restored canary, copy the attachments back
(copy_back.py), the fences (tokens, sync heads, orphaned users' blobs), queue the Qdrant rebuild.

It stops at the first failed step, says what the target holds then, and writes a step log to the
repository under `restores/<run id>/log.json`; the run id comes from the token, so `resume=true`
with the same token finds the log and continues from the failed step (run_steps.py holds the steps).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime
from typing import Literal

import anyio
from pydantic import BaseModel, Field, ValidationError

from ..errors import ConfigurationError, RecoveryError, StoreUnreachable, UnsafeOperation, scrub
from ..progress import Progress, silent
from ..repository import open_repository
from ..repository.base import Repository
from ..repository.layout import manifest_key, restore_log_key
from ..runtime import Runtime
from ..stores import postgres
from ..stores.advisory import Purpose, advisory_key, database_lock
from ..stores.failures import explain
from ..verdict import Verdict
from . import observe as rc
from .pitr_run import PitrSource
from .plan import Consequence
from .planner import PlanReport, PlanRequest, plan
from .run_steps import (
    STEPS,
    SWITCHED_OFF,
    Context,
    DumpSource,
    RestoreRequest,
    RestoreStep,
    Source,
    admin,
    describe_target,
    next_steps,
)

__all__ = ["RestoreLog", "RestoreReport", "RestoreRequest", "run_restore"]
from .token import REPLAN, Premises, changed, open_plan_token

# Failing plan checks that run_restore itself resolves: it creates the roles the dump needs.
RESOLVED_BY_RUN = frozenset({"roles_missing"})
_LOG_SEAL_LABEL = b"engram-recovery-restore-log-v1"


class RestoreLog(BaseModel):
    """What the repository keeps of a run: enough for resume=true and for the operator's records."""

    run_id: str
    premises: Premises
    started_at: datetime
    updated_at: datetime
    steps: list[RestoreStep] = Field(default_factory=list)
    live_snapshot: dict[str, object] | None = None
    # HMAC of the rest under a key derived from the master key: resume skips the steps a log says are done (the
    # database's verification, the canary), so it trusts no log that anyone with write access to the repository
    # could have written.
    seal: str | None = None

    def sealed(self, key: bytes) -> str:
        subkey = hmac.digest(key, _LOG_SEAL_LABEL, "sha256")
        return hmac.digest(subkey, self.model_dump_json(exclude={"seal"}).encode(), "sha256").hex()

    def done(self, name: str) -> bool:
        return any(s.name == name and s.status in ("ok", "warn", "skipped") for s in self.steps)


# (No docstring: the tool's result inherits this model, and its schema must not gain a description.)
class RestoreReport(BaseModel):
    verdict: Literal["ok", "warn", "fail", "not_confirmed"] = Field(
        description="ok: restored, every step passed; warn: restored, read the steps that warn; fail: stopped at "
        "failed_step (see target_state, fix the cause, run again with resume=true); not_confirmed: nothing was "
        "changed (pass confirm=true to restore)."
    )
    summary: str
    run_id: str
    backup_id: str
    target_database: str
    resumed: bool
    failed_step: str | None
    target_state: str = Field(description="What the target database and bucket hold now.")
    steps: list[RestoreStep]
    rto_seconds: float = Field(description="Sum of the steps' seconds (this run and the resumed ones).")
    log: str | None = Field(description="Repository key of this run's step log.")
    next_steps: list[str]
    plan_summary: str
    consequences: list[Consequence]


def lock(target: str) -> Purpose:
    """One run_restore into a database at a time, whichever machine runs it."""
    return Purpose(advisory_key(f"restore:{target}"), "engram-recovery run_restore",
                   f"another run_restore into {target} is running",
                   "wait for it to finish (its result says where it stopped), then resume=true if it stopped")


def run_id_of(token: str) -> str:
    """The run's id: the same token always names the same run, so resume=true finds its log."""
    return hashlib.sha256(token.strip().encode()).hexdigest()[:32]


async def run_restore(runtime: Runtime, request: RestoreRequest, progress: Progress) -> RestoreReport:
    """Refuse a stale token or a busy target; then, confirmed, run every step (or resume the failed one)."""
    settings = runtime.settings
    keys = rc.key_material(settings)
    if keys.current is None:
        raise ConfigurationError(keys.current_problem or "ENCRYPTION_MASTER_KEY is not available to this tool",
                                 "set ENCRYPTION_MASTER_KEY or ENCRYPTION_MASTER_KEY_FILE: run_restore proves the key "
                                 "opens the restored data and checks the plan_token with it")  # fmt: skip
    planned = open_plan_token(request.plan_token, keys.current)
    run_id = run_id_of(request.plan_token)
    async with open_repository(settings) as repo:
        log = await _read_log(repo, run_id, keys.current)
        if request.resume and log is None:
            raise ConfigurationError("there is no earlier run of this plan_token to resume: nothing was changed",
                                     "run it without resume=true")  # fmt: skip
        # Resuming after the target step created the target: what it holds now is this run's doing, not a premise
        # that changed. A target step that failed created nothing (it refused a stranger's tables, or CREATE
        # failed): the target is then judged as the plan saw it, so resume never drops what this run did not make.
        own_partial = (
            request.resume and log is not None and any(s.name == "target" and s.status != "failed" for s in log.steps)
        )
        if planned.point_in_time is None and not await repo.exists(manifest_key(planned.backup_id)):
            # Said before re-planning: the planner would answer for the repository as a whole ("no complete
            # backup: run run_backup first"), and backing up a broken live database is the wrong fix on this day.
            raise UnsafeOperation(f"premises changed: backup {planned.backup_id} the plan_token names is no longer in "
                                  "the repository (pruned or deleted): nothing was changed",
                                  f"{REPLAN}, for a backup list_backups shows")  # fmt: skip
        await progress(0, len(STEPS) + 2, "premises: re-planning to check the token still holds")
        started = time.perf_counter()
        report = await _premises(runtime, planned, own_partial, log is not None and not request.resume)
        if own_partial:
            # The plan made again sees this run's own partial target and says "DO NOT RESTORE yet: not empty": the
            # wrong words for the summary the operator confirms a resume by.
            report = report.model_copy(update={"summary": (
                f"resuming: {planned.target_database} holds this plan_token's own partial restore, which the "
                "steps not yet done complete (the plan's check of the target is set aside for it; every other "
                "premise still holds)")})  # fmt: skip
        source = source_of(planned, report)
        premises_step = RestoreStep(name="premises", status="ok", seconds=round(time.perf_counter() - started, 3),
                                    summary="the plan's premises still hold: " + report.summary)  # fmt: skip
        if not request.confirm:
            return _not_confirmed(source, run_id, planned, report, premises_step)
        await progress(1, len(STEPS) + 2, "sessions: nothing may be connected to the target")
        if planned.target_database == settings.database_name:
            # This server's own idle connections to the live database are not a client to refuse for.
            await runtime.pool.close()
        # Held on the maintenance database: a session on the target would itself block the drop.
        async with database_lock(postgres.with_database(runtime.dsn, "postgres"), lock(planned.target_database)):
            sessions_step = await _refuse_sessions(runtime.dsn, planned.target_database)
            now = datetime.now(UTC)
            if log is None or not request.resume:
                log = RestoreLog(run_id=run_id, premises=planned, started_at=now, updated_at=now)
            ctx = Context(runtime=runtime, repo=repo, request=request, premises=planned, keys=keys, run_id=run_id,
                          progress=progress, own_partial=own_partial, source=source)  # fmt: skip
            ctx.live_snapshot = log.live_snapshot
            try:
                steps = await _steps(ctx, log, [premises_step, sessions_step])
            finally:
                # Whatever happened (a failed step, an unexpected error, cancellation): release what the source
                # holds, e.g. stop and remove a point in time's scratch server.
                with anyio.CancelScope(shield=True):
                    closing = await source.close()
            if closing is not None:
                steps.append(closing)
                log.steps = steps
                await _write_log(ctx, log)
    failed = next((s for s in steps if s.status == "failed"), None)
    rto = round(sum(s.seconds for s in steps), 3)
    state = describe_target(ctx, steps)
    verdict: Verdict = "fail" if failed else "warn" if any(s.status == "warn" for s in steps) else "ok"
    if failed is None:
        summary = (f"restored {source.describe()} into {planned.target_database} in {rto:.1f} s; read next_steps "
                   "before booting Engram")  # fmt: skip
    else:
        # (A canary that does not open is not fixed by resuming: the token is bound to the key; the state says.)
        # (Nor a target this run dropped and could not create again: its state moved, the state says re-plan.)
        final = failed.name == "canary" or " was DROPPED " in state
        fix = "" if final else " Fix the cause, then run the same plan_token again with resume=true"
        summary = f"STOPPED at {failed.name}: {failed.summary}. {state}{fix}"
    await progress(len(STEPS) + 2, len(STEPS) + 2, "restored" if failed is None else f"stopped at {failed.name}")
    return RestoreReport(
        verdict=verdict, summary=summary, run_id=run_id,
        backup_id=planned.backup_id, target_database=planned.target_database, resumed=request.resume,
        failed_step=failed.name if failed else None, target_state=state, steps=steps, rto_seconds=rto,
        log=ctx.log_key, next_steps=next_steps(ctx, steps) if failed is None else [],
        plan_summary=report.summary, consequences=report.consequences,
    )  # fmt: skip


def source_of(planned: Premises, report: PlanReport) -> Source:
    """The one place that tells a point in time from a dump backup; every step asks the source after this."""
    if planned.point_in_time is not None and report.point_in_time is not None:
        return PitrSource(report.point_in_time)
    return DumpSource(planned.backup_id)


async def _premises(runtime: Runtime, planned: Premises, own_partial: bool, resumable: bool) -> PlanReport:
    """Redo the plan the token names, with the planner's own observation; refuse if any premise moved.

    For a point in time the plan is redone against Barman's archive now: the time must still be in the window
    and recovered from the same base backup (backup_id), with the same key and target state. The archive's end
    (manifest_sha256 there) moves with every new segment, which is not a reason to refuse.
    """
    request = PlanRequest(recovery_point=planned.recovery_point, target_database=planned.target_database,
                          app_version=planned.app_version, allow_non_empty_target=planned.allow_non_empty_target,
                          work_dir=planned.work_dir or PlanRequest.work_dir)  # fmt: skip
    try:
        report = await plan(runtime, request, silent)
    except ConfigurationError as exc:
        if planned.point_in_time is None:
            raise
        # Typically the window moved (its oldest base backup was deleted): the token's time is no longer recoverable.
        raise UnsafeOperation(f"premises changed: {exc.message}: nothing was changed",
                              f"{exc.hint}; then {REPLAN}" if exc.hint else REPLAN) from exc  # fmt: skip
    # Resuming: the target holds this run's own partial restore (its log says it created it), not a stranger's.
    ignore = frozenset({"target_state"}) if own_partial else frozenset()
    if planned.point_in_time is not None:
        ignore |= {"manifest_sha256"}
    down = next((c for c in report.checks if c.code == "target_unreachable"), None)
    if down is not None:
        # Not a premise that moved: re-planning would not help, starting the server (or fixing DATABASE_URL) does.
        cause, _, fix = down.summary.rpartition(": ")
        raise StoreUnreachable(f"{cause}: nothing was changed", f"{fix}, then run the same plan_token again")
    moved = changed(planned, report.premises, ignore=ignore)
    if moved:
        resume = (" (or, if this token's own run stopped half-way, pass resume=true to continue it)"
                  if resumable and not own_partial else "")  # fmt: skip
        raise UnsafeOperation(f"premises changed: {'; '.join(moved)}: nothing was changed", REPLAN + resume)
    blocking = [c for c in report.checks if c.status == "fail" and c.code not in RESOLVED_BY_RUN
                and not (own_partial and c.name == "target")]  # fmt: skip
    if blocking:
        raise UnsafeOperation("the plan does not pass: " + " | ".join(f"{c.name}: {c.summary}" for c in blocking)
                              + ": nothing was changed", "fix that, then " + REPLAN)  # fmt: skip
    return report


def _not_confirmed(source: Source, run_id: str, planned: Premises, report: PlanReport,
                   premises: RestoreStep) -> RestoreReport:  # fmt: skip
    return RestoreReport(
        verdict="not_confirmed", run_id=run_id, backup_id=planned.backup_id, target_database=planned.target_database,
        summary=(f"NOT CONFIRMED, nothing was changed. Confirming restores {source.describe()} into "
                 f"{planned.target_database}" + (" (DROPPING what it holds now)" if planned.allow_non_empty_target
                                                else "") + f": {report.summary}. Pass confirm=true to restore"),
        resumed=False, failed_step=None, target_state=f"untouched ({planned.target_database}: "
        f"{report.premises.target_state})", steps=[premises], rto_seconds=premises.seconds, log=None,
        next_steps=[], plan_summary=report.summary, consequences=report.consequences,
    )  # fmt: skip


async def _refuse_sessions(dsn: str, database: str) -> RestoreStep:
    """Anything connected to the target would write into (or block the drop of) a half-restored database."""
    started = time.perf_counter()
    try:
        async with admin(dsn) as conn:
            rows = await conn.fetch("SELECT pid, coalesce(nullif(application_name, ''), usename, '?') AS who "
                                    "FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                                    database)  # fmt: skip
    except postgres.PostgresError as exc:
        raise postgres.describe(exc) from exc
    if rows:
        who = ", ".join(sorted({str(r["who"]) for r in rows}))
        raise UnsafeOperation(f"{len(rows)} session(s) are connected to {database} ({who}): nothing was changed",
                              "stop every Engram instance and worker (and any other client of that database), "
                              "then run again")  # fmt: skip
    return RestoreStep(name="sessions", status="ok", seconds=round(time.perf_counter() - started, 3),
                       summary=f"nothing is connected to {database}")  # fmt: skip


async def _steps(ctx: Context, log: RestoreLog, first: list[RestoreStep]) -> list[RestoreStep]:
    """Every step in order; on resume the ones the log records as done are kept, not redone."""
    # A step the first run was told to skip is asked again: this run's request may switch it on.
    kept = {s.name: s for s in log.steps
            if ctx.own_partial and log.done(s.name) and not s.details.get(SWITCHED_OFF)}  # fmt: skip
    # A database step that failed half-way left rows behind: the target is dropped and created again first.
    if ctx.own_partial and not log.done("database"):
        kept.pop("target", None)
    ctx.log_key = restore_log_key(ctx.run_id)
    out = list(first)
    for index, (name, fn) in enumerate(STEPS):
        if name in kept:
            out.append(kept[name])
            continue
        await ctx.progress(index + 2, len(STEPS) + 2, f"{name}")
        started = time.perf_counter()
        try:
            step = await fn(ctx)
        except (RecoveryError, postgres.PostgresError) as exc:
            text = str(exc) if isinstance(exc, RecoveryError) else scrub(f"PostgreSQL error: {exc}")
            step = RestoreStep(name=name, status="failed", summary=text.replace("\n", " "))
        except Exception as exc:  # the step boundary: a lost connection, an S3 client error, a task group's failure
            # Still a failed step, logged: otherwise the run would end as a bare error that neither records the step
            # nor says what the target holds, which is what the operator needs after any stop. (Only the cause:
            # explain's generic fix, "nothing half-written was kept", is not true half-way through a restore.)
            step = RestoreStep(name=name, status="failed", summary=explain(exc, name).message.replace("\n", " "),
                               details={"error": type(exc).__name__})  # fmt: skip
        step = ctx.source.annotate(step)
        step.seconds = round(time.perf_counter() - started, 3)
        out.append(step)
        log.steps = out
        log.live_snapshot = ctx.live_snapshot
        log.updated_at = datetime.now(UTC)
        await _write_log(ctx, log)
        if step.status == "failed":
            break
    return out


async def _read_log(repo: Repository, run_id: str, master: bytes) -> RestoreLog | None:
    key = restore_log_key(run_id)
    if not await repo.exists(key):
        return None
    try:
        log = RestoreLog.model_validate_json(await repo.get_bytes(key))
    except ValidationError as exc:
        raise ConfigurationError(f"the step log {key} of this run is unreadable: {exc.error_count()} problem(s)",
                                 "delete it and " + REPLAN) from exc  # fmt: skip
    if log.seal is None or not hmac.compare_digest(log.seal, log.sealed(master)):
        raise UnsafeOperation(f"the step log {key} of this run was not written under this ENCRYPTION_MASTER_KEY, or "
                              "was altered: nothing was changed", "delete it and " + REPLAN)  # fmt: skip
    return log


async def _write_log(ctx: Context, log: RestoreLog) -> None:
    try:
        assert ctx.keys.current is not None  # run_restore refuses to start without it
        log.seal = log.sealed(ctx.keys.current)
        await ctx.repo.put_bytes(ctx.log_key or restore_log_key(ctx.run_id), log.model_dump_json(indent=1).encode())
    except RecoveryError as exc:
        # The restore itself goes on: the log is the record, not a premise; the report says it is missing.
        ctx.log_key = None
        ctx.log_problem = exc.message
