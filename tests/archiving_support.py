"""Throwaway PostgreSQL 18 clusters with archiving off or on, and a Barman configured against them."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import anyio
import asyncpg
from support import EngramDB

from engram_recovery.core.stores.barman import Barman
from engram_recovery.core.stores.barman_catalog import BaseBackup
from engram_recovery.testbed import barman as testbed_barman
from engram_recovery.testbed import cluster

# Re-exported: the tests import all archiving set-up from here.
from engram_recovery.testbed.barman import BARMAN_ROLE_GRANTS as BARMAN_ROLE_GRANTS
from engram_recovery.testbed.barman import ROLE as ROLE
from engram_recovery.testbed.barman import SERVER as SERVER
from engram_recovery.testbed.barman import SLOT as SLOT
from engram_recovery.testbed.barman import barman_for as barman_for
from engram_recovery.testbed.barman import create_replication_role as create_replication_role
from engram_recovery.testbed.barman import steady_writes as steady_writes

# What check_archiving asks for, on top of PostgreSQL 18's defaults (wal_level=replica, 10 senders, 10 slots).
ARCHIVING_ON = ("archive_timeout=60",)
# The most a server can turn off: no WAL for a base backup, no replication connection at all.
ARCHIVING_OFF = ("wal_level=minimal", "max_wal_senders=0", "max_replication_slots=0")


@dataclass(frozen=True)
class Archived:
    """An Engram database Barman archives: its base backup, then two marked writes."""

    db: EngramDB
    config: Path
    barman: Barman
    backup: BaseBackup
    between: datetime  # after the first mark's commit, before the second's


@dataclass(frozen=True)
class ArchiveCluster:
    root: Path  # reachable by the postgres OS user: recoveries go beside the data directory
    pg: cluster.Cluster

    @property
    def url(self) -> str:
        return self.pg.admin_url


@contextmanager
def archive_cluster(*settings: str, conf: tuple[str, ...] = (), hba: str | None = None) -> Iterator[ArchiveCluster]:
    """A fast cluster of its own (a slot, a checkpoint or wal_level must not touch the session's server).

    `settings` go on the command line; `conf` lines into postgresql.conf and `hba` replaces
    pg_hba.conf, as an operator's files would be (ALTER SYSTEM overrides those, not the command line).
    """
    root = Path(tempfile.mkdtemp(prefix="engram-pitr-"))
    root.chmod(0o711)
    try:
        pg = cluster.start(root / "data", fast=True, extra=settings)
        try:
            if conf or hba is not None:
                pg.stop()
                with (pg.datadir / "postgresql.conf").open("a") as out:
                    out.write("".join(f"{line}\n" for line in conf))
                if hba is not None:
                    (pg.datadir / "pg_hba.conf").write_text(hba)
                pg = cluster.start(pg.datadir, pg.port, fast=True, extra=settings)
            yield ArchiveCluster(root, pg)
        finally:
            cluster.stop(root / "data")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def restart(archive: ArchiveCluster) -> None:
    archive.pg.stop()
    cluster.start(archive.pg.datadir, archive.pg.port, fast=True)


def barman_config(archive: ArchiveCluster, home: Path) -> Path:
    """The configuration docs/pitr.md gives, pointed at this cluster."""
    return testbed_barman.barman_config(archive.pg.port, home)


async def streaming_barman(archive: ArchiveCluster, home: Path) -> tuple[Path, Barman]:
    """Barman against `archive` as docs/pitr.md sets it up (its roles, its slot, its configuration in `home`)."""
    await create_replication_role(archive.url)
    config = barman_config(archive, home)
    return config, barman_for(config)


@asynccontextmanager
async def receiving(barman: Barman) -> AsyncIterator[None]:
    """Barman's WAL receiver, started by its cron, for as long as the block runs.

    The slot reserves WAL from its creation, so the receiver cron starts in the background
    streams it all, whenever it connects.
    """
    await barman.cron()
    try:
        yield
    finally:
        await barman.stop_receiving()


@asynccontextmanager
async def backup_under_writes(barman: Barman, url: str) -> AsyncIterator[BaseBackup]:
    """Under steady writes: a WAL switch, a base backup (yielded), the block's writes, then a WAL switch.

    The last switch archives the segment holding the block's writes, so the archive covers them.
    """
    async with steady_writes(url):
        await barman.switch_wal(archive_timeout=30)
        yield await barman.backup(wait_timeout=60)
        await barman.switch_wal(archive_timeout=30)


async def write_two_marks(dsn: str, table: str, pause: float = 0.0) -> tuple[datetime, datetime]:
    """Two committed rows in a new `table`: a time between their commits, and the second's commit time.

    The commit time needs track_commit_timestamp=on; `pause` seconds go either side of the time
    in between (S3 keeps whole seconds).
    """
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE TABLE {table} (n int PRIMARY KEY)")
        await conn.execute(f"INSERT INTO {table} (n) VALUES (1)")
        await anyio.sleep(pause)
        between: datetime = await conn.fetchval("SELECT clock_timestamp()")
        await anyio.sleep(pause)
        await conn.execute(f"INSERT INTO {table} (n) VALUES (2)")
        second: datetime = await conn.fetchval(f"SELECT pg_xact_commit_timestamp(xmin) FROM {table} WHERE n = 2")
    finally:
        await conn.close()
    return between, second
