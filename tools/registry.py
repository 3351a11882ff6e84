"""Every tool, in the order a client lists them."""

from __future__ import annotations

from typing import Any

from . import backup_status, check_archiving, list_backups, plan_restore, reindex_qdrant, restore_drill, run_backup
from .base import ToolSpec

ALL: list[ToolSpec[Any, Any]] = [
    backup_status.SPEC,
    list_backups.SPEC,
    run_backup.SPEC,
    plan_restore.SPEC,
    restore_drill.SPEC,
    reindex_qdrant.SPEC,
    check_archiving.SPEC,
]

BY_NAME = {spec.name: spec for spec in ALL}
