"""plan_restore: an ordered, verified restore plan (not implemented yet: issue 5)."""

from __future__ import annotations

from ..core.errors import NotImplementedYet
from ..core.progress import Progress
from ..core.runtime import Runtime
from .base import ToolInput, ToolResult, ToolSpec, read_only_annotations


class PlanRestoreInput(ToolInput):
    recovery_point: str = "latest"


class PlanRestoreResult(ToolResult):
    plan_token: str


async def plan_restore(runtime: Runtime, params: PlanRestoreInput, progress: Progress) -> PlanRestoreResult:
    raise NotImplementedYet("plan_restore is not implemented yet", "follow Engram's manual restore page for now")


SPEC = ToolSpec(
    name="plan_restore",
    title="Plan a restore",
    description="Build and verify an ordered restore plan for a recovery point. Not implemented yet.",
    input_model=PlanRestoreInput,
    result_model=PlanRestoreResult,
    run=plan_restore,
    annotations=read_only_annotations("Plan a restore"),
    writes=False,
)
