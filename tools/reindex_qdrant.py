"""reindex_qdrant: rebuild Qdrant through Engram's EmbedNote jobs (not implemented yet: issue 4)."""

from __future__ import annotations

from mcp_types import ToolAnnotations

from ..core.errors import NotImplementedYet
from ..core.progress import Progress
from ..core.runtime import Runtime
from .base import ToolInput, ToolResult, ToolSpec


class ReindexInput(ToolInput):
    confirm: bool = False


class ReindexResult(ToolResult):
    enqueued: int


async def reindex_qdrant(runtime: Runtime, params: ReindexInput, progress: Progress) -> ReindexResult:
    raise NotImplementedYet("reindex_qdrant is not implemented yet", "wait for Engram's ReconcileEmbeddings sweep")


SPEC = ToolSpec(
    name="reindex_qdrant",
    title="Rebuild Qdrant",
    description="Re-embed notes through Engram's own EmbedNote jobs. Not implemented yet.",
    input_model=ReindexInput,
    result_model=ReindexResult,
    run=reindex_qdrant,
    annotations=ToolAnnotations(
        title="Rebuild Qdrant", read_only_hint=False, destructive_hint=True, idempotent_hint=True,
        open_world_hint=True,
    ),
    writes=True,
)
