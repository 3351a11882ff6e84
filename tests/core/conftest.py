"""Fixtures shared by the tests of core/: a repository of each kind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support import new_bucket

from engram_recovery.core.repository.base import Repository
from engram_recovery.core.repository.local import LocalRepository
from engram_recovery.core.repository.s3 import S3Repository
from engram_recovery.testbed.seaweedfs import SeaweedFS


@pytest.fixture(params=["local", "s3"])
async def repo(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Repository]:
    """An empty, writable repository: a local directory, then an S3 bucket under a prefix."""
    if request.param == "local":
        async with LocalRepository(tmp_path / "repo") as local:
            await local.check_writable()
            yield local
    else:
        # Asked for only here, so that a run of local cases alone never starts SeaweedFS.
        weed: SeaweedFS = request.getfixturevalue("weed")
        async with S3Repository(await new_bucket(weed), "site/backups") as remote:
            await remote.check_writable()
            yield remote
