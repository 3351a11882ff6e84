"""Every tool, in the order a client lists them.

A tool's module is imported only when its spec is asked for: `engram-recovery call backup_status`
(from cron) loads backup_status alone, not run_backup's S3 client or reindex_qdrant's Qdrant client.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ..core.errors import RecoveryError
from .base import ToolSpec

NAMES: tuple[str, ...] = (
    "backup_status",
    "list_backups",
    "run_backup",
    "plan_restore",
    "restore_drill",
    "run_restore",
    "reindex_qdrant",
    "check_archiving",
)


def load(name: str) -> ToolSpec[Any, Any]:
    """The spec of one tool, importing only that tool's module."""
    if name not in NAMES:
        raise RecoveryError(f"there is no tool named {name!r}", f"choose one of: {', '.join(sorted(NAMES))}")
    spec: ToolSpec[Any, Any] = import_module(f"{__package__}.{name}").SPEC
    return spec


def all_specs() -> list[ToolSpec[Any, Any]]:
    """Every tool's spec, in listing order (imports every tool module: for the server, not for `call`)."""
    return [load(name) for name in NAMES]
