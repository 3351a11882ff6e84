"""STAND-IN for core/restore/fences.py (issue 13, branch i13-fences), so run_restore runs in this branch.

It only has the interface the fences module promises (snapshot_live, fence_tokens, fence_sync,
protect_orphans, LiveSnapshot, FenceResult); it changes nothing and says so. When the real module is
merged, run.py imports `from . import fences` instead and this file is deleted.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ..progress import Progress
from ..repository.base import Repository
from ..stores.s3 import S3Location

_SAID = "not applied: the fences module has not landed in this build (stand-in)"


class LiveSnapshot(BaseModel):
    readable: bool
    why: str | None = None


class FenceResult(BaseModel):
    name: str
    changed: int
    details: list[str]
    said: str


async def snapshot_live(dsn: str | None) -> LiveSnapshot:
    return LiveSnapshot(readable=False, why=_SAID)


async def fence_tokens(conn: Any, snapshot: LiveSnapshot) -> FenceResult:
    return FenceResult(name="tokens", changed=0, details=[], said=_SAID)


async def fence_sync(conn: Any, snapshot: LiveSnapshot) -> FenceResult:
    return FenceResult(name="sync", changed=0, details=[], said=_SAID)


async def protect_orphans(
    conn: Any, bucket: S3Location | None, repo: Repository, run_id: str, progress: Progress
) -> FenceResult:
    return FenceResult(name="orphans", changed=0, details=[], said=_SAID)
