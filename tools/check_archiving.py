"""check_archiving: is Engram's PostgreSQL ready for point-in-time recovery through a streaming Barman sidecar?

Read-only. It reads the server's settings, roles, replication slots, pg_hba rules and
archiver statistics, judges each prerequisite (core/archive/prerequisites.py), and writes out the
exact changes: a `command:` override for Engram's compose stack and SQL for a bare host.
"""

from __future__ import annotations

from pydantic import Field

from ..core.archive import prerequisites as archiving
from ..core.archive.prerequisites import ArchivingReport
from ..core.progress import Progress
from ..core.runtime import Runtime
from .base import ToolInput, ToolResult, ToolSpec, read_only_annotations

_IDENTIFIER = r"^[a-z_][a-z0-9_]{0,62}$"


class CheckArchivingInput(ToolInput):
    replication_role: str = Field(default="streaming_barman", pattern=_IDENTIFIER,
                                  description="The role Barman's streaming_conninfo connects as.")  # fmt: skip
    slot_name: str = Field(default="barman", pattern=_IDENTIFIER,
                           description="The replication slot Barman's receiver uses (its slot_name).")  # fmt: skip


class CheckArchivingResult(ToolResult, ArchivingReport):
    pass


async def check_archiving(runtime: Runtime, params: CheckArchivingInput, progress: Progress) -> CheckArchivingResult:
    await progress(0, 1, "reading the server's archiving settings")
    report = await archiving.assess(runtime.pool, runtime.dsn, params.replication_role, params.slot_name)
    await progress(1, 1, report.verdict)
    return CheckArchivingResult.model_validate(report.model_dump())


SPEC = ToolSpec(
    name="check_archiving",
    title="Check archiving prerequisites",
    description=(
        "Check whether Engram's PostgreSQL (DATABASE_URL) is ready for continuous WAL archiving by a Barman "
        "sidecar in streaming mode, the basis of point-in-time recovery: wal_level, max_wal_senders, "
        "max_replication_slots, archive_mode and archive_timeout, a LOGIN REPLICATION role, a physical "
        "replication slot with its receiver connected, and a pg_hba replication rule. Each check has a verdict "
        "(ok/warn/fail) and the fix; `remedies` holds the exact changes twice: a docker-compose.override.yml "
        "`command:` for Engram's compose stack with the commands to run, and ALTER SYSTEM/SQL lines for a bare "
        "host, saying whether a restart is needed. Read-only: it changes nothing; show the operator the remedies "
        "for their setup and run it again after they applied them."
    ),
    input_model=CheckArchivingInput,
    result_model=CheckArchivingResult,
    run=check_archiving,
    annotations=read_only_annotations("Check archiving prerequisites"),
    writes=False,
)
