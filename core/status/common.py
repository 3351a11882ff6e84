"""What backup_status's checks share: the check model, the context, small formatting helpers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Literal

import anyio
from pydantic import BaseModel, Field

from ..engram.schema_probe import SchemaProbe, probe
from ..errors import RecoveryError
from ..runtime import Runtime
from ..verdict import Verdict

Component = Literal["postgres", "last_backup", "master_key", "attachments", "qdrant", "oban", "restore_drill",
                    "archive"]


class Check(BaseModel):
    component: Component
    status: Verdict
    summary: str = Field(description="One line for a human.")
    details: dict[str, Any] = Field(default_factory=dict)
    estimates: list[str] = Field(default_factory=list, description="Which numbers in details are estimates.")
    elapsed_ms: float = 0.0


class StatusContext:
    """What several checks share: one probe of the database, taken once."""

    def __init__(self, runtime: Runtime, deep: bool) -> None:
        self.runtime = runtime
        self.deep = deep
        self._probe: SchemaProbe | None = None
        self._probe_error: RecoveryError | None = None
        self._lock = anyio.Lock()
        self.reports: dict[Component, BaseModel] = {}  # typed findings a check adds to the report (archive)

    async def probe(self) -> SchemaProbe:
        async with self._lock:
            if self._probe is None and self._probe_error is None:
                try:
                    async with self.runtime.pool.acquire() as conn:
                        self._probe = await probe(conn)
                except RecoveryError as exc:
                    self._probe_error = exc
            if self._probe_error is not None:
                raise self._probe_error
            assert self._probe is not None
            return self._probe


CheckFn = Callable[[StatusContext], Awaitable[Check]]


def format_size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def age_text(hours: float | None) -> str:
    """'25 min', '3.5 h', '4.2 days'."""
    hours = max(hours or 0.0, 0.0)
    if hours < 1 / 60:
        return "<1 min"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def format_age(delta: timedelta) -> str:
    return age_text(delta.total_seconds() / 3600)
