"""run_backup: one consistent recovery point (database dump, attachments, key check), verified.

The run is core/backup/recovery_point.py; this module is the tool: its input and its result.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..core.backup.recovery_point import BackupReport, BackupRequest, backup
from ..core.progress import Progress
from ..core.runtime import Runtime
from .base import ToolAnnotations, ToolInput, ToolResult, ToolSpec


class RunBackupInput(ToolInput):
    dry_run: bool = Field(
        default=False,
        description="Report what would be dumped and mirrored, with sizes, and what retention would prune; "
        "write and delete nothing.",
    )
    format: Literal["custom", "directory", "plain"] = Field(
        default="custom",
        description="pg_dump format: 'custom' (one file, selective and parallel pg_restore; the default), "
        "'directory' (one file per table; needs local scratch space), 'plain' (SQL for psql).",
    )
    compression: Literal["zstd", "gzip", "none"] = Field(
        default="zstd", description="'zstd' (fast, the default), 'gzip' (for tools that only know gzip), 'none'."
    )
    prune: bool = Field(
        default=False,
        description="After a verified backup, apply the retention policy (ENGRAM_RECOVERY_KEEP_*). Deletes only "
        "with confirm=true; otherwise the result previews what would be deleted.",
    )
    confirm: bool = Field(default=False, description="Required with prune=true to actually delete old backups.")


class RunBackupResult(ToolResult, BackupReport):
    pass


async def run_backup(runtime: Runtime, params: RunBackupInput, progress: Progress) -> RunBackupResult:
    report = await backup(runtime, BackupRequest(**params.model_dump()), progress)
    return RunBackupResult.model_validate(report.model_dump())


SPEC = ToolSpec(
    name="run_backup",
    title="Run a backup",
    description=(
        "Create one consistent, verified recovery point of the Engram deployment: a pg_dump of the database "
        "(custom format by default, zstd-compressed, encrypted when ENGRAM_RECOVERY_BACKUP_KEY is set), the "
        "attachments bucket mirrored incrementally when STORAGE_BACKEND=s3, and a manifest recording the WAL "
        "position, versions, row counts, the boot canary and checksums. Writes only new files into the backup "
        "repository; deletes old backups only with prune=true and confirm=true. Use dry_run=true first to see "
        "sizes and what retention would prune. One run at a time: a concurrent run is refused. The result gives "
        "the backup id (give it to plan_restore), sizes, durations and warnings to act on."
    ),
    input_model=RunBackupInput,
    result_model=RunBackupResult,
    run=run_backup,
    annotations=ToolAnnotations(
        title="Run a backup", read_only_hint=False, destructive_hint=True, idempotent_hint=False,
        open_world_hint=True,
    ),
    writes=True,
)
