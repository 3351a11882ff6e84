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

from pydantic import Field

from ..core.progress import Progress
from ..core.restore.drill_run import DrillReport, DrillRequest, run_drill
from ..core.runtime import Runtime
from .base import ToolAnnotations, ToolInput, ToolResult, ToolSpec


class RestoreDrillInput(ToolInput):
    recovery_point: str = Field(
        default="latest",
        description="'latest', a backup id, 'before:<ISO time>', or 'at:<ISO time with zone>' (point-in-time "
        "recovery from Barman's archive into a scratch PostgreSQL 18).",
    )
    sample_notes: int = Field(default=50, ge=1, le=10_000, description="Notes to decrypt and hash-check.")
    sample_attachments: int = Field(default=20, ge=0, le=10_000, description="Attachments to decrypt and check.")


class RestoreDrillResult(ToolResult, DrillReport):
    pass


async def restore_drill(runtime: Runtime, params: RestoreDrillInput, progress: Progress) -> RestoreDrillResult:
    report = await run_drill(runtime, DrillRequest(**params.model_dump()), progress)
    return RestoreDrillResult.model_validate(report.model_dump())


SPEC = ToolSpec(
    name="restore_drill",
    title="Restore drill",
    description=(
        "Prove a recovery point restores: re-hashes its artifacts, restores it with stock pg_restore into a NEW "
        "scratch database engram_drill_<time>_<random> (owned by the source database's owner) on the same server, "
        "then checks, by Engram's key rules, that the master key (from the environment) unwraps the restored boot "
        "canary (current key only; a PREVIOUS-only key gets key_verdict previous_key_only), that sampled notes and "
        "attachments decrypt with their users' keys (current, then ENCRYPTION_MASTER_KEY_PREVIOUS) and match their "
        "content hashes, and that every row count matches the manifest. "
        "Measures the recovery time (RTO) per step, always drops the scratch database (and stale ones from killed "
        "drills), and records the result in the repository (backup_status shows the last successful drill). "
        "Never touches an existing database. Run it after backups and at least monthly. With "
        "'at:<ISO time with zone>': Barman recovers the base backup before that time plus WAL into a new scratch data "
        "directory, served by the bundled PostgreSQL 18 on a free loopback port until replay reaches the time; the "
        "same proofs run there (attachments as of that time from a versioned bucket's object versions), the server "
        "is stopped and removed, and the PITR RTO (recover + replay + proofs) is recorded."
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
