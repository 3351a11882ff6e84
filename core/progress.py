"""Progress reporting that does not care who listens (MCP client, terminal, or nobody)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol


class Progress(Protocol):
    async def __call__(self, done: float, total: float | None = None, message: str | None = None) -> None: ...


async def silent(done: float, total: float | None = None, message: str | None = None) -> None:
    """For callers that do not want progress."""


ProgressFn = Callable[[float, float | None, str | None], Awaitable[None]]
