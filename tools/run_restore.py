"""run_restore: perform the restore a plan_restore token names, fenced, resumable.

Destructive: it creates (and, where the plan chose it, drops) the target database and writes into
the configured attachments bucket. Without confirm=true it only re-checks the token and says what
confirming would do; where the client supports MCP elicitation the server asks the user with the
text of `confirmation` instead.
"""

from __future__ import annotations

from pydantic import Field

from ..core.progress import Progress
from ..core.restore.run import RestoreReport, RestoreRequest, run_restore
from ..core.runtime import Runtime
from .base import ToolAnnotations, ToolInput, ToolResult, ToolSpec


class RunRestoreInput(ToolInput):
    plan_token: str = Field(min_length=1, max_length=8192, description="The plan_token plan_restore returned: it "
                            "names the recovery point, the target database and the plan's choices.")
    confirm: bool = Field(default=False, description="true: restore. false: change nothing, say what would happen.")
    resume: bool = Field(default=False, description="Continue this token's run from the step where it stopped.")
    revoke_tokens: bool = Field(default=True, description="Fence: re-revoke refresh tokens revoked and delete API "
                                "keys deleted after the backup.")
    advance_sync: bool = Field(default=True, description="Fence: move every vault's change_seq past the live one.")
    protect_orphans: bool = Field(default=True, description="Fence: copy the blobs of users newer than the backup "
                                  "into the repository before Engram's OrphanSweep could delete them.")
    reindex_qdrant: bool = Field(default=True, description="Queue the Qdrant rebuild in the restored database.")
    jobs: int = Field(default=2, ge=1, le=16, description="pg_restore --jobs for indexes and constraints (and "
                      "pg_dump --jobs from the scratch server for a point in time).")


class RunRestoreResult(ToolResult, RestoreReport):
    pass


async def run_restore_tool(runtime: Runtime, params: RunRestoreInput, progress: Progress) -> RunRestoreResult:
    report = await run_restore(runtime, RestoreRequest(**params.model_dump()), progress)
    return RunRestoreResult.model_validate(report.model_dump())


def confirmation(params: RunRestoreInput, preview: RunRestoreResult) -> str | None:
    """What the user confirms, from the unconfirmed run: the plan re-checked now (a stale token is refused
    before anyone is asked)."""
    lines = [f"Restore {preview.backup_id} into the database {preview.target_database}"
             + (" (continuing the run that stopped)" if params.resume else "") + "?", preview.plan_summary]
    lines += [f"- {c.summary}" for c in preview.consequences]
    return "\n".join(lines)


SPEC = ToolSpec(
    name="run_restore",
    title="Run a restore",
    description=(
        "Perform the restore a plan_restore plan_token names (recovery point, target database, choices): DESTRUCTIVE. "
        "Re-checks the plan first and refuses, changing nothing, if any premise changed (re-plan then) or anything "
        "is connected to the target database. Then, in Engram's order, each step timed and reported with what it "
        "changed: snapshot the live database, create the roles the dump needs, create the target database (drop and "
        "re-create it only if the plan chose allow_non_empty_target), restore with stock pg_restore and verify every "
        "table, constraint, index and row count, prove the master key opens the restored boot canary, copy the "
        "attachments back into the configured bucket (checksum-checked), the fences (revoke tokens that came back "
        "to life, advance sync heads, protect newer users' blobs from OrphanSweep), queue the Qdrant rebuild. "
        "A plan of recovery_point 'at:<time>' is performed the same way, except that Barman first recovers the time "
        "into a new data directory served by a scratch PostgreSQL 18 (always stopped and removed), the database is "
        "moved into the target with pg_dump | pg_restore and verified against that server, and the attachments are "
        "rolled back to their object versions of that time (a bucket without versioning is left as it is). "
        "Stops at the first failed step and says what the target holds; fix the cause and call again with the same "
        "token and resume=true. Without confirm=true it changes nothing and returns verdict not_confirmed with the "
        "plan's summary and consequences. Read next_steps before booting Engram."
    ),
    input_model=RunRestoreInput,
    result_model=RunRestoreResult,
    run=run_restore_tool,
    annotations=ToolAnnotations(
        title="Run a restore", read_only_hint=False, destructive_hint=True, idempotent_hint=False,
        open_world_hint=True,
    ),
    writes=True,
    confirmation=confirmation,
)
