"""Shared fixtures: real PostgreSQL, a real SeaweedFS S3 server, Engram-shaped databases.

The PostgreSQL comes from ENGRAM_TEST_ADMIN_URL (scripts/test sets it; the
default is the machine's 127.0.0.1:5432). Every test database is created for the
test and dropped after it.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from support import ADMIN_URL, EngramDB, engram_env, make_engram_db

from engram_recovery.core.settings import Settings, load_settings
from engram_recovery.testbed.seaweedfs import SeaweedFS, seaweedfs


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def admin_dsn() -> str:
    import anyio

    async def ping() -> None:
        conn = await asyncpg.connect(ADMIN_URL, timeout=5)
        await conn.close()

    try:
        anyio.run(ping)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.exit(f"PostgreSQL at {ADMIN_URL} does not answer ({exc}); run the tests through scripts/test", 2)
    return ADMIN_URL


@pytest.fixture(scope="session")
def weed() -> Iterator[SeaweedFS]:
    with seaweedfs() as server:
        yield server


@pytest.fixture(scope="session")
def master_key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
async def engram_db(admin_dsn: str, master_key: bytes) -> AsyncIterator[EngramDB]:
    async for db in make_engram_db(admin_dsn, master_key):
        yield db


@pytest.fixture
def settings_for(tmp_path: Path) -> Callable[..., Settings]:
    def build(db: EngramDB, **extra: str) -> Settings:
        return load_settings(environ=engram_env(db, tmp_path, **extra))

    return build
