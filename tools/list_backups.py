"""list_backups: the catalog of recovery points, newest first.

Read-only. The answers come from core/status/catalog.py; this module is the tool.
"""

from __future__ import annotations

from ..core.progress import Progress
from ..core.runtime import Runtime
from ..core.status.catalog import CatalogView, open_catalog
from .base import ToolInput, ToolResult, ToolSpec, read_only_annotations


class ListBackupsInput(ToolInput):
    pass


class ListBackupsResult(ToolResult, CatalogView):
    """Every backup folder of the repository, newest first, with what is known about each."""


async def list_backups(runtime: Runtime, params: ListBackupsInput, progress: Progress) -> ListBackupsResult:
    async with open_catalog(runtime.settings) as catalog:
        view = await catalog.view()
    return ListBackupsResult.model_validate(view.model_dump())


SPEC = ToolSpec(
    name="list_backups",
    title="List backups",
    description=(
        "List every recovery point in the backup repository, newest first: its id (give it to plan_restore or "
        "restore_drill), snapshot time and age (what a restore of it would lose), size, pg_dump format, "
        "compression, whether it is encrypted and whether the configured backup key is the one that encrypted "
        "it, when it was last proven good and how (read back at write, backup_status deep=true, or a restore "
        "drill) with the result, its last restore drill (when, result, RTO), and what retention will do to it "
        "(kept, and under which rule, or pruned; also after the next run_backup). Folders without a manifest "
        "(interrupted runs) and unreadable manifests are listed as such. Read-only: it changes nothing. Use it to "
        "choose a recovery point: prefer the newest one verified and drilled."
    ),
    input_model=ListBackupsInput,
    result_model=ListBackupsResult,
    run=list_backups,
    annotations=read_only_annotations("List backups"),
    writes=False,
)
