"""backup_status: could I recover right now, and what would I lose?

Read-only. Each component gets its own check, run concurrently and each bounded
in time, so one store that is down fails its own check and the others still
report. Without `deep` it reads only catalogue statistics and indexes (numbers
from statistics are marked as estimates), so it stays fast on a large database.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import anyio
from pydantic import Field

from ...core.progress import Progress
from ...core.runtime import Runtime
from ...core.status.common import Check, CheckFn, Component, StatusContext
from ...core.status.database import check_master_key, check_oban, check_postgres
from ...core.status.repository import check_last_backup, check_restore_drill
from ...core.status.stores import check_attachments, check_qdrant
from ...core.stores.failures import explain
from ...core.taskgroups import task_group
from ...core.verdict import Verdict, worst
from ..base import ToolInput, ToolResult, ToolSpec, read_only_annotations

__all__ = ["SPEC", "BackupStatusInput", "BackupStatusResult", "Check", "backup_status"]

CHECK_TIMEOUT = 8.0


class BackupStatusInput(ToolInput):
    deep: bool = Field(
        default=False,
        description="Also re-verify the newest backup (every artifact's SHA-256, every mirrored blob's content; "
        "the result is recorded in the repository), list the whole attachments bucket and count rows exactly, to "
        "find attachments whose blob is missing and blobs no row references. Slow on large deployments; off by "
        "default.",
    )


class BackupStatusResult(ToolResult):
    verdict: Verdict = Field(description="The worst status of all checks.")
    summary: str
    checked_at: datetime
    deep: bool
    checks: list[Check]


# --- the tool -------------------------------------------------------------------------------

CHECKS: list[tuple[Component, CheckFn]] = [
    ("postgres", check_postgres),
    ("last_backup", check_last_backup),
    ("master_key", check_master_key),
    ("attachments", check_attachments),
    ("qdrant", check_qdrant),
    ("oban", check_oban),
    ("restore_drill", check_restore_drill),
]


OPTIONAL: frozenset[Component] = frozenset({"qdrant"})


async def _run_check(ctx: StatusContext, component: Component, fn: CheckFn, limit: float) -> Check:
    started = time.perf_counter()
    # Qdrant holds derived data (rebuildable from PostgreSQL): when it cannot be checked, that is a warning.
    failed: Verdict = "warn" if component in OPTIONAL else "fail"
    try:
        with anyio.fail_after(limit):
            check = await fn(ctx)
    except TimeoutError:
        check = Check(component=component, status=failed, summary=f"did not answer within {limit:g} s",
                      details={"error": "timeout"})
    except Exception as exc:  # one check's failure is its finding, never the whole tool's
        error = explain(exc, f"the {component} check")
        check = Check(component=component, status=failed, summary=str(error).replace("\n", " "),
                      details={"error": error.kind})
    check.elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
    return check


async def backup_status(runtime: Runtime, params: BackupStatusInput, progress: Progress) -> BackupStatusResult:
    ctx = StatusContext(runtime, params.deep)
    results: dict[Component, Check] = {}
    timeout = CHECK_TIMEOUT * (30 if params.deep else 1)

    async def run_one(component: Component, fn: CheckFn) -> None:
        results[component] = await _run_check(ctx, component, fn, timeout)
        await progress(len(results), len(CHECKS), f"checked {component}")

    async with task_group() as tg:
        for component, fn in CHECKS:
            tg.start_soon(run_one, component, fn)
    checks = [results[c] for c, _ in CHECKS]
    verdict = worst([c.status for c in checks])
    failing = [c.component for c in checks if c.status != "ok"]
    summary = (
        "recoverable: every check passed"
        if verdict == "ok"
        else f"{verdict}: " + ", ".join(f"{c} ({results[c].status})" for c in failing)
    )
    return BackupStatusResult(
        verdict=verdict, summary=summary, checked_at=datetime.now(UTC), deep=params.deep, checks=checks
    )


SPEC = ToolSpec(
    name="backup_status",
    title="Backup status",
    description=(
        "Answer 'could I recover this Engram deployment right now, and what would I lose?'. Checks PostgreSQL "
        "(reachable, pg_dump compatible, role sees all rows under row-level security, WAL archiving), the newest "
        "backup's age and verification, the master key against Engram's boot canary (never revealing it), the "
        "attachments store, Qdrant, Oban's embedding backlog and the last restore drill. Returns one verdict "
        "(ok/warn/fail) and one check per component with a one-line summary that says what to do; it says when and "
        "how the newest backup was last verified and names any backup that failed verification or a drill. "
        "Read-only and fast by default. Pass deep=true to re-verify the newest backup byte for byte (recorded in the "
        "backup repository, unless access is read-only) and find attachment rows whose blob is missing."
    ),
    input_model=BackupStatusInput,
    result_model=BackupStatusResult,
    run=backup_status,
    annotations=read_only_annotations("Backup status"),
    writes=False,
)
