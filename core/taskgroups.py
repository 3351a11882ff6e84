"""A task group whose failure is the one exception that caused it, not an ExceptionGroup.

Callers catch `RecoveryError` and driver errors by type; anyio always wraps a
task group's failures in an ExceptionGroup, which would slip past those
handlers and reach the operator as a traceback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .errors import RecoveryError


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


@asynccontextmanager
async def task_group() -> AsyncIterator[TaskGroup]:
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except BaseExceptionGroup as group:
        cancelled = anyio.get_cancelled_exc_class()
        real = [e for e in _leaves(group) if not isinstance(e, cancelled)]
        if not real:
            raise
        # The operator-facing error wins over the driver error that it may have caused downstream.
        chosen = next((e for e in real if isinstance(e, RecoveryError)), real[0])
        raise chosen from chosen.__cause__


async def gather(*jobs: Awaitable[Any]) -> list[Any]:
    """Run independent awaitables at once (hashing, the target, the live database), results in order;
    a failure is the one exception that caused it, as for `task_group`."""
    results: list[Any] = [None] * len(jobs)

    async def one(i: int, job: Awaitable[Any]) -> None:
        results[i] = await job

    async with task_group() as tg:
        for i, job in enumerate(jobs):
            tg.start_soon(one, i, job)
    return results
