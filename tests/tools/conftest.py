"""Fixtures the tools' tests share."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support import BACKUP_KEY, EngramDB, engram_env, make_engram_db

from engram_recovery.core.progress import silent
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.tools.run_backup import RunBackupInput, run_backup


@pytest.fixture(scope="module")
async def backed_up(admin_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[EngramDB, Path]]:
    """One seeded database and one backup of it (encrypted with BACKUP_KEY), per test module: shared by
    the tests that only read them."""
    async for db in make_engram_db(admin_dsn, secrets.token_bytes(32)):
        base = tmp_path_factory.mktemp("backed-up")
        settings = load_settings(environ=engram_env(db, base, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY))
        async with Runtime(settings) as runtime:
            assert (await run_backup(runtime, RunBackupInput(), silent)).verified
        yield db, base
