"""The dump pipeline into a local repository: the dump is re-read while it is written (issue 11)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anyio
import pytest
from support import EngramDB, pg_bin

from engram_recovery.core.artifact.codec import Encoder
from engram_recovery.core.backup.pipeline import dump_to_repository
from engram_recovery.core.repository.local import LocalRepository
from engram_recovery.core.stores.pgclient.commands import PgDumpCommand

WINDOW = 64 << 10
KEY = "backups/b1/db.dump"


async def nothing(_done: int) -> None:
    return None


@pytest.mark.anyio
async def test_the_dump_is_read_back_window_by_window_while_it_is_written(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    repo = LocalRepository(tmp_path / "repo", window=WINDOW)
    command = PgDumpCommand(pg_bin("pg_dump"), engram_db.dsn, "custom")
    stored = await dump_to_repository(command, repo, KEY, Encoder("none", None), nothing)
    path = tmp_path / "repo" / KEY
    assert stored.size > 4 * WINDOW
    assert (stored.size, stored.sha256) == (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    # The pipeline asked for the read-back: a thread re-reads the windows as they are written ...
    reader = repo._written[KEY].reader
    assert reader is not None
    with anyio.fail_after(30):
        while reader.reread < stored.size // WINDOW:  # noqa: ASYNC110 (a thread's progress, no event to wait on)
            await anyio.sleep(0.01)
    # ... and the verification after the dump counts what it found.
    assert await repo.verify(KEY, stored.size, stored.sha256) is None
