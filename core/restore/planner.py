"""plan_restore: an ordered, verified, executable restore plan for this deployment.

Read-only. It re-hashes every artifact, checks the master key against the
backup's boot canary offline, checks versions, the target database and the
attachments inventory, measures what would be lost, and only then writes the
steps. A failed check leaves the plan without executable steps.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, Field

from ..progress import Progress
from ..repository import open_repository, points
from ..repository.verify import verify_artifacts
from ..runtime import Runtime
from ..stores.pgclient.versions import beside
from ..taskgroups import gather
from ..verdict import Verdict, worst
from . import observe as rc
from .pitr import PitrSurvey
from .pitr_plan import plan_pitr
from .plan import Consequence, Observed, PlanCheck, PlanRequest, PlanStep, run_checks, snapshot_time
from .steps import CommandContext, build_steps, consequences
from .token import Premises, plan_token, premises_of

__all__ = ["PlanReport", "PlanRequest", "RecoveryPointInfo", "plan"]


class RecoveryPointInfo(BaseModel):
    backup_id: str
    started_at: datetime
    finished_at: datetime
    manifest_sha256: str


# (No docstring: the tool's result inherits this model, and its schema must not gain a description.)
class PlanReport(BaseModel):
    verdict: Verdict = Field(description="fail: do not restore (steps withheld); warn: read every warning first.")
    summary: str
    executable: bool = Field(description="True when the steps may be run, in order.")
    recovery_point: RecoveryPointInfo
    target_database: str
    checks: list[PlanCheck]
    steps: list[PlanStep]
    consequences: list[Consequence]
    premises: Premises
    plan_token: str = Field(description="Bound to the premises: a later execution refuses it if any changed.")
    planned_at: datetime
    point_in_time: PitrSurvey | None = Field(default=None, description="For recovery_point 'at:<ISO time>': the "
                                             "restorable window, the base backup and the WAL replayed to that time.")


async def plan(runtime: Runtime, params: PlanRequest, progress: Progress) -> PlanReport:
    """Gather (observe.py, I/O only), judge (plan.py, pure), then write the steps (steps.py) and bind the token."""
    moment = points.point_in_time(params.recovery_point)
    if moment is not None:  # at:<time>: Barman's archive, not the repository (pitr_plan.py)
        return PlanReport.model_validate(await plan_pitr(runtime, moment, params, progress))
    settings = runtime.settings
    target_db = params.target_database or settings.database_name
    async with open_repository(settings) as repo:
        await progress(0, 5, "reading the manifest")
        point = await points.resolve(repo, params.recovery_point)
        manifest = point.manifest
        db = manifest.database
        # Backups that predate these manifest fields: the dump's own table of contents says.
        unrecorded = not db.roles_referenced or None in (db.extensions, db.object_owners, db.row_security_tables)
        listing = await rc.dump_listing(settings, repo, point) if unrecorded else None
        needs = rc.restore_needs(manifest, listing)
        roles = sorted(set(db.roles_referenced or rc.toc_owners(listing or "")) | set(needs.object_owners or ())
                       | ({needs.owner} if needs.owner else set()))  # fmt: skip
        await progress(1, 5, f"verifying {len(manifest.artifacts)} artifact(s) of {manifest.backup_id}")
        artifacts, target, live, inventory = await gather(
            verify_artifacts(repo, point),
            rc.target_state(settings, target_db, roles, needs.extensions or ()),
            rc.live_state(settings, snapshot_time(manifest)),
            rc.inventory_state(repo, point),
        )
        tools = await rc.tool_state(settings, manifest, target.server_major)
    unknown = None
    if manifest.attachments.backend == "s3" and not live.reachable:
        unknown = await rc.bucket_unknown_prefixes(runtime, inventory)
    await progress(4, 5, "judging")
    observed = Observed(
        manifest_sha256=point.manifest_sha256, artifacts=artifacts, keys=rc.key_material(settings), tools=tools,
        target=target, live=live, inventory=inventory, app_version=params.app_version,
        allow_non_empty_target=params.allow_non_empty_target, now=datetime.now(UTC), bucket_unknown_prefixes=unknown,
        needs=needs,
    )  # fmt: skip
    checks = run_checks(manifest, observed)
    verdict = worst([c.status for c in checks])
    ctx = CommandContext(
        work_dir=rc.absolute(params.work_dir), pg_restore=tools.pg_restore_path or settings.pg_restore or "pg_restore",
        repository=rc.absolute_repository(settings), repository_endpoint=settings.repository_endpoint,
        storage_bucket=manifest.attachments.source_bucket or settings.storage_bucket,
        storage_endpoint=settings.storage_endpoint, qdrant_configured=manifest.qdrant.configured,
        tool=rc.tool_argv(), env_file=settings.env_file, environment=settings.from_environment,
        clients={t: beside(tools.pg_restore_path, t) for t in ("psql", "createdb", "dropdb")},
    )  # fmt: skip
    all_steps = build_steps(manifest, observed, ctx)
    steps = [] if verdict == "fail" else all_steps
    premises = premises_of(manifest, observed, ctx.work_dir)
    failed = [c for c in checks if c.status == "fail"]
    warned = [c for c in checks if c.status == "warn"]
    if failed:
        summary = "DO NOT RESTORE yet: " + " | ".join(f"{c.name}: {c.summary}" for c in failed)
    elif warned:
        summary = f"restorable in {len(steps)} steps, after reading: " + " | ".join(c.name for c in warned)
    else:
        summary = f"restorable in {len(steps)} steps; every check passed"
    await progress(5, 5, "planned")
    return PlanReport(
        verdict=verdict, summary=summary, executable=verdict != "fail",
        recovery_point=RecoveryPointInfo(backup_id=manifest.backup_id, started_at=manifest.started_at,
                                         finished_at=manifest.finished_at, manifest_sha256=point.manifest_sha256),
        target_database=target_db, checks=checks, steps=steps,
        consequences=consequences(manifest, observed, all_steps), premises=premises,
        plan_token=plan_token(premises, observed.keys.current), planned_at=observed.now,
    )  # fmt: skip
