"""plan_restore: an ordered, verified, executable restore plan for this deployment.

Read-only. It re-hashes every artifact, checks the master key against the
backup's boot canary offline, checks versions, the target database and the
attachments inventory, measures what would be lost, and only then writes the
steps. A failed check leaves the plan without executable steps.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import Field

from ..core.progress import Progress
from ..core.repository import open_repository, points
from ..core.repository.verify import verify_artifacts
from ..core.restore import observe as rc
from ..core.restore.plan import Consequence, Observed, PlanCheck, PlanStep, run_checks, snapshot_time
from ..core.restore.steps import CommandContext, build_steps, consequences
from ..core.restore.token import Premises, plan_token, premises_of
from ..core.runtime import Runtime
from ..core.stores.pgclient.versions import beside
from ..core.taskgroups import gather
from ..core.verdict import Verdict, worst
from .base import ToolInput, ToolResult, ToolSpec, read_only_annotations


class PlanRestoreInput(ToolInput):
    recovery_point: str = Field(
        default="latest",
        description="'latest', a backup id, or 'before:<ISO time>' for the newest backup finished before then.",
    )
    target_database: str | None = Field(
        default=None,
        description="Database NAME to restore into, on the server of DATABASE_URL (default: Engram's own "
        "database). No URL: credentials never travel as tool arguments.",
        pattern=r"^[A-Za-z_][A-Za-z0-9_$-]{0,62}$",
    )
    app_version: str | None = Field(
        default=None, description="The Engram release you will boot against the restored database, e.g. '0.18.1'."
    )
    allow_non_empty_target: bool = Field(
        default=False,
        description="The target database holds tables and the plan may DROP and re-create it. Off by default.",
    )
    work_dir: str = Field(
        default="engram-restore", description="Directory the plan's commands decrypt the dump into (needs its size)."
    )


class RecoveryPointInfo(ToolResult):
    backup_id: str
    started_at: datetime
    finished_at: datetime
    manifest_sha256: str


class PlanRestoreResult(ToolResult):
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


async def plan_restore(runtime: Runtime, params: PlanRestoreInput, progress: Progress) -> PlanRestoreResult:
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
    premises = premises_of(manifest, observed)
    failed = [c for c in checks if c.status == "fail"]
    warned = [c for c in checks if c.status == "warn"]
    if failed:
        summary = "DO NOT RESTORE yet: " + " | ".join(f"{c.name}: {c.summary}" for c in failed)
    elif warned:
        summary = f"restorable in {len(steps)} steps, after reading: " + " | ".join(c.name for c in warned)
    else:
        summary = f"restorable in {len(steps)} steps; every check passed"
    await progress(5, 5, "planned")
    return PlanRestoreResult(
        verdict=verdict, summary=summary, executable=verdict != "fail",
        recovery_point=RecoveryPointInfo(backup_id=manifest.backup_id, started_at=manifest.started_at,
                                         finished_at=manifest.finished_at, manifest_sha256=point.manifest_sha256),
        target_database=target_db, checks=checks, steps=steps,
        consequences=consequences(manifest, observed, all_steps), premises=premises,
        plan_token=plan_token(premises, observed.keys.current), planned_at=observed.now,
    )  # fmt: skip


SPEC = ToolSpec(
    name="plan_restore",
    title="Plan a restore",
    description=(
        "Build a verified, ordered restore plan for a recovery point ('latest', a backup id, or "
        "'before:<ISO time>'), BEFORE anything is restored. Re-hashes every artifact (SHA-256), checks the master "
        "key from the environment against the backup's boot canary offline (wrong key, previous-only key, KMS, "
        "empty canary each named), pg_restore and server versions, the Engram schema vs app_version, the target "
        "database (reachable, empty unless allow_non_empty_target, roles present), what the restoring role may do "
        "(superuser-only extensions, row-level security, owners, CREATEDB), the attachments inventory, and "
        "how much would be lost (read per tenant under row-level security; what cannot be read is 'cannot check' "
        "and yields no SQL). Returns a verdict, the checks, the steps with exact shell commands (withheld when "
        "a check fails), the consequences to tell users (sign-ins, revived tokens, sync cursors, OrphanSweep, "
        "Qdrant rebuild) and a plan_token bound to these premises. Read-only: it changes nothing. Run the steps in "
        "order; re-plan if anything changed."
    ),
    input_model=PlanRestoreInput,
    result_model=PlanRestoreResult,
    run=plan_restore,
    annotations=read_only_annotations("Plan a restore"),
    writes=False,
)
