"""Every tool, in the order a client lists them."""

from __future__ import annotations

from typing import Any

from . import backup_status, plan_restore, reindex_qdrant, run_backup
from .base import ToolSpec

ALL: list[ToolSpec[Any, Any]] = [
    backup_status.SPEC,
    run_backup.SPEC,
    plan_restore.SPEC,
    reindex_qdrant.SPEC,
]

BY_NAME = {spec.name: spec for spec in ALL}
