"""Retention applied to a repository: the preview, and (with confirmation) the deletion.

A pruned backup loses its manifest first, so an interrupted prune leaves an
incomplete folder (cleaned by the next run), never a complete-looking backup
with artifacts missing. Attachment blobs that no kept inventory references are
then removed from the shared pool.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, Field

from ..settings import Settings
from .base import Repository
from .layout import INVENTORY_NAME, POOL, PROTECTED, backup_prefix, inventory_key, manifest_key
from .manifest import Manifest
from .pool import collect_garbage
from .records import BackupSummary, scan
from .retention import Candidate, Policy, decide


class RetentionReport(BaseModel):
    policy: dict[str, int] = Field(description="keep_last, keep_daily, keep_weekly, keep_monthly in force.")
    keep: list[str] = Field(description="Backup ids the policy keeps, newest first.")
    reasons: dict[str, list[str]] = Field(default_factory=dict)
    would_delete: list[str] = Field(description="Backup ids the policy lets go, newest first.")
    deleted: list[str] = Field(default_factory=list, description="Backup ids actually deleted by this call.")
    pool_objects_deleted: int = 0
    pool_bytes_deleted: int = 0
    note: str = ""


def policy_of(settings: Settings) -> Policy:
    return Policy(
        last=settings.keep_last, daily=settings.keep_daily, weekly=settings.keep_weekly,
        monthly=settings.keep_monthly,
    )


def candidates(backups: Iterable[BackupSummary]) -> list[Candidate]:
    """What retention decides over: every complete backup, verified as its manifest says (the catalog uses this too)."""
    return [Candidate(b.backup_id, b.finished_at, b.verified) for b in backups]


async def apply_retention(repo: Repository, settings: Settings, *, prune: bool, confirm: bool) -> RetentionReport:
    policy = policy_of(settings)
    state = await scan(repo)
    decision = decide(candidates(state.backups), policy)
    report = RetentionReport(
        policy={"keep_last": policy.last, "keep_daily": policy.daily, "keep_weekly": policy.weekly,
                "keep_monthly": policy.monthly},
        keep=decision.keep, reasons=decision.reasons, would_delete=decision.delete,
    )
    if not decision.delete:
        report.note = "nothing to prune"
        return report
    if not (prune and confirm):
        report.note = (
            f"preview only: {len(decision.delete)} backup(s) would be deleted; run with prune=true and "
            "confirm=true to delete them"
        )
        return report
    for backup_id in decision.delete:
        folder = backup_prefix(backup_id)
        await repo.delete([manifest_key(backup_id)])
        await repo.delete([key async for key, _size in repo.list(folder)])
        report.deleted.append(backup_id)
    report.pool_objects_deleted, report.pool_bytes_deleted = await _collect_pool(repo, decision.keep)
    report.note = f"deleted {len(report.deleted)} backup(s)"
    return report


async def _collect_pool(repo: Repository, kept: list[str]) -> tuple[int, int]:
    async for _entry in repo.list(POOL):
        break
    else:
        return 0, 0  # no attachments were ever mirrored here
    # Every kept backup whose manifest says its attachments were mirrored must name its
    # inventory: one that has gone missing stops the collection (collect_garbage refuses)
    # instead of letting that backup's blobs be deleted as unreferenced.
    inventories: list[str] = []
    for backup_id in kept:
        manifest = Manifest.model_validate_json(await repo.get_bytes(manifest_key(backup_id)))
        if manifest.attachments.backend == "s3":
            inventories.append(inventory_key(backup_id, manifest.attachments.inventory or INVENTORY_NAME))
    # Blobs a restore copied aside (users its database did not know) are kept until the operator deletes
    # their protected/<run_id>/ folder: no backup may reference them, and they may be the only copy.
    inventories += [key async for key, _size in repo.list(PROTECTED) if key.endswith("/" + INVENTORY_NAME)]
    return await collect_garbage(repo, inventories)
