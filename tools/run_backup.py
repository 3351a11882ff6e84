"""run_backup: one consistent recovery point (not implemented yet: issue 3)."""

from __future__ import annotations

from mcp_types import ToolAnnotations

from ..core.errors import NotImplementedYet
from ..core.progress import Progress
from ..core.runtime import Runtime
from .base import ToolInput, ToolResult, ToolSpec


class RunBackupInput(ToolInput):
    dry_run: bool = False


class RunBackupResult(ToolResult):
    backup_id: str


async def run_backup(runtime: Runtime, params: RunBackupInput, progress: Progress) -> RunBackupResult:
    raise NotImplementedYet("run_backup is not implemented yet", "take a manual pg_dump until it lands")


SPEC = ToolSpec(
    name="run_backup",
    title="Run a backup",
    description="Create one consistent recovery point of the Engram deployment. Not implemented yet.",
    input_model=RunBackupInput,
    result_model=RunBackupResult,
    run=run_backup,
    annotations=ToolAnnotations(
        title="Run a backup", read_only_hint=False, destructive_hint=False, idempotent_hint=False,
        open_world_hint=True,
    ),
    writes=True,
)
