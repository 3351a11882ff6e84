"""backup_status and list_backups: what the deployment's backups are worth right now.

backup_status: one check per component, run concurrently and each bounded in time, so one store that
is down fails its own check and the others still report (`check_status`, here); common.py (Check,
StatusContext), database.py, stores.py, repository.py,
archive.py (Barman's WAL archive, when configured). list_backups (and the resources, the prompt and
`engram-recovery backups`): catalog.py, every recovery point with its verification, drill and
retention fate.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import anyio
from pydantic import BaseModel, Field

from ..progress import Progress
from ..runtime import Runtime
from ..stores.failures import explain
from ..taskgroups import task_group
from ..verdict import Verdict, worst
from .archive import ArchiveStatus, check_archive
from .common import Check, CheckFn, Component, StatusContext
from .database import check_master_key, check_oban, check_postgres
from .repository import check_last_backup, check_restore_drill
from .stores import check_attachments, check_qdrant

__all__ = ["CHECKS", "CHECK_TIMEOUT", "Check", "StatusReport", "check_status"]

CHECK_TIMEOUT = 8.0


# (No docstring: the tool's result inherits this model, and its schema must not gain a description.)
class StatusReport(BaseModel):
    verdict: Verdict = Field(description="The worst status of all checks.")
    summary: str
    checked_at: datetime
    deep: bool
    checks: list[Check]
    archive: ArchiveStatus = Field(description="The continuous archive (point-in-time recovery): WAL, window, RPO.")


CHECKS: list[tuple[Component, CheckFn]] = [
    ("postgres", check_postgres),
    ("last_backup", check_last_backup),
    ("master_key", check_master_key),
    ("attachments", check_attachments),
    ("qdrant", check_qdrant),
    ("oban", check_oban),
    ("restore_drill", check_restore_drill),
    ("archive", check_archive),
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


async def check_status(runtime: Runtime, deep: bool, progress: Progress) -> StatusReport:
    """Every check at once; the verdict is the worst of them."""
    ctx = StatusContext(runtime, deep)
    results: dict[Component, Check] = {}
    timeout = CHECK_TIMEOUT * (30 if deep else 1)

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
    archive = ctx.reports.get("archive")
    if not isinstance(archive, ArchiveStatus):  # the check failed or timed out before reading the archive
        archive = ArchiveStatus(configured=bool(runtime.settings.barman_config))
    return StatusReport(verdict=verdict, summary=summary, checked_at=datetime.now(UTC), deep=deep, checks=checks,
                        archive=archive)
