"""plan_restore: an ordered, verified, executable restore plan for this deployment.

Read-only. It re-hashes every artifact, checks the master key against the
backup's boot canary offline, checks versions, the target database and the
attachments inventory, measures what would be lost, and only then writes the
steps. A failed check leaves the plan without executable steps.
"""

from __future__ import annotations

from pydantic import Field

from ..core.progress import Progress
from ..core.restore.planner import PlanReport, PlanRequest, plan
from ..core.runtime import Runtime
from .base import ToolInput, ToolResult, ToolSpec, read_only_annotations


class PlanRestoreInput(ToolInput):
    recovery_point: str = Field(
        default="latest",
        description="'latest', a backup id, 'before:<ISO time>' for the newest backup finished before then, or "
        "'at:<ISO time with zone>' for point-in-time recovery from Barman's WAL archive.",
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


class PlanRestoreResult(ToolResult, PlanReport):
    pass


async def plan_restore(runtime: Runtime, params: PlanRestoreInput, progress: Progress) -> PlanRestoreResult:
    report = await plan(runtime, PlanRequest(**params.model_dump()), progress)
    return PlanRestoreResult.model_validate(report.model_dump())


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
        "Qdrant rebuild) and a plan_token that carries these premises. Read-only: it changes nothing. Run the steps "
        "in order, or pass plan_token to run_restore to have them performed; re-plan if anything changed. With "
        "'at:<ISO time with zone>' (point-in-time recovery, Barman configured): the restorable window (a time "
        "outside it is refused, the window named), the base backup, the WAL to replay, the key, the target database, "
        "and the steps (barman recover into a new data directory, start PostgreSQL 18 on it, the proofs, run_restore "
        "with the plan_token to move it into the target); nothing is recovered."
    ),
    input_model=PlanRestoreInput,
    result_model=PlanRestoreResult,
    run=plan_restore,
    annotations=read_only_annotations("Plan a restore"),
    writes=False,
)
