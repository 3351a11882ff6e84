"""Runtime is an async context manager: leaving it closes the database pool and the Qdrant client."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import EngramDB, engram_env

from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings


@pytest.mark.anyio
async def test_leaving_the_runtime_closes_what_it_opened(engram_db: EngramDB, tmp_path: Path) -> None:
    env = engram_env(engram_db, tmp_path)
    async with Runtime(load_settings(environ=env)) as runtime:
        async with runtime.pool.acquire() as conn:
            assert await conn.fetchval("SELECT 1") == 1
        runtime.qdrant()
        pool = runtime.pool._pool
        assert pool is not None
    assert pool.is_closing()
    assert runtime._qdrant is None
