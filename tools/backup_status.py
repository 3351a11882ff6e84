"""backup_status: could I recover right now, and what would I lose?

Read-only. Each component gets its own check, run concurrently and each bounded
in time, so one store that is down fails its own check and the others still
report. Without `deep` it reads only catalogue statistics and indexes (numbers
from statistics are marked as estimates), so it stays fast on a large database.
"""

from __future__ import annotations

from pydantic import Field

from ..core.progress import Progress
from ..core.runtime import Runtime
from ..core.status import Check, StatusReport, check_status
from .base import ToolInput, ToolResult, ToolSpec, read_only_annotations

__all__ = ["SPEC", "BackupStatusInput", "BackupStatusResult", "Check", "backup_status"]


class BackupStatusInput(ToolInput):
    deep: bool = Field(
        default=False,
        description="Also re-verify the newest backup (every artifact's SHA-256, every mirrored blob's content; "
        "the result is recorded in the repository), list the whole attachments bucket and count rows exactly, to "
        "find attachments whose blob is missing and blobs no row references. Slow on large deployments; off by "
        "default.",
    )


class BackupStatusResult(ToolResult, StatusReport):
    pass


async def backup_status(runtime: Runtime, params: BackupStatusInput, progress: Progress) -> BackupStatusResult:
    report = await check_status(runtime, params.deep, progress)
    return BackupStatusResult.model_validate(report.model_dump())


SPEC = ToolSpec(
    name="backup_status",
    title="Backup status",
    description=(
        "Answer 'could I recover this Engram deployment right now, and what would I lose?'. Checks PostgreSQL "
        "(reachable, pg_dump compatible, role sees all rows under row-level security, WAL archiving), the newest "
        "backup's age and verification, the master key against Engram's boot canary (never revealing it), the "
        "attachments store, Qdrant, Oban's embedding backlog, the last restore drill and, when point-in-time recovery "
        "is configured, the WAL archive (newest WAL and its age, Barman's checks, gaps, restorable window, RPO). "
        "Returns one verdict (ok/warn/fail) and one check per component with a one-line summary that says what to "
        "do; it says when and how the newest backup was last verified and names any backup that failed verification "
        "or a drill. "
        "Read-only and fast by default. Pass deep=true to re-verify the newest backup byte for byte (recorded in the "
        "backup repository, unless access is read-only) and find attachment rows whose blob is missing."
    ),
    input_model=BackupStatusInput,
    result_model=BackupStatusResult,
    run=backup_status,
    annotations=read_only_annotations("Backup status"),
    writes=False,
)
