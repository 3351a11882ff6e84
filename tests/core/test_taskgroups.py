"""The one task-group helper: results in order, and a failure is the one exception that caused it."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from engram_recovery.core.errors import RecoveryError
from engram_recovery.core.taskgroups import gather


async def _after(delay: float, value: int) -> int:
    await anyio.sleep(delay)
    return value


async def _fails() -> int:
    await anyio.lowlevel.checkpoint()
    raise RecoveryError("the target is unreachable", "start it")


@pytest.mark.anyio
async def test_gather_runs_at_once_and_answers_in_the_order_asked() -> None:
    assert await gather(_after(0.05, 1), _after(0, 2), _after(0.02, 3)) == [1, 2, 3]
    assert await gather() == []


@pytest.mark.anyio
async def test_a_failure_inside_gather_is_the_operator_facing_error_not_an_exception_group() -> None:
    with pytest.raises(RecoveryError, match="unreachable"):
        await gather(_after(1, 1), _fails())
