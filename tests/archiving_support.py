"""Throwaway PostgreSQL 18 clusters with archiving off or on, and a Barman configured against them."""

from __future__ import annotations

import getpass
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import asyncpg

from engram_recovery.core.stores.barman import Barman, BarmanCommand, find_binary
from engram_recovery.core.stores.pgclient.versions import bundled_bindir
from engram_recovery.testbed import cluster

# What check_archiving asks for, on top of PostgreSQL 18's defaults (wal_level=replica, 10 senders, 10 slots).
ARCHIVING_ON = ("archive_timeout=60",)
# The most a server can turn off: no WAL for a base backup, no replication connection at all.
ARCHIVING_OFF = ("wal_level=minimal", "max_wal_senders=0", "max_replication_slots=0")
ROLE, SLOT, SERVER = "streaming_barman", "barman", "engram"


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


# Barman's ordinary connection, as docs/pitr.md grants it: no superuser.
BARMAN_ROLE_GRANTS = (
    "CREATE ROLE barman WITH LOGIN",
    "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO barman",
    "GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO barman",
    "GRANT EXECUTE ON FUNCTION pg_switch_wal() TO barman",
    "GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO barman",
    "GRANT pg_read_all_settings, pg_read_all_stats, pg_checkpoint TO barman",
)


async def create_replication_role(url: str, role: str = ROLE, slot: str | None = SLOT) -> None:
    """The roles Barman connects as (docs/pitr.md) and, as check_archiving advises, its slot reserving WAL."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"CREATE ROLE {role} WITH LOGIN REPLICATION")
        for statement in BARMAN_ROLE_GRANTS:
            await conn.execute(statement)
        if slot is not None:
            await conn.execute("SELECT pg_create_physical_replication_slot($1, true)", slot)
    finally:
        await conn.close()


def barman_config(archive: ArchiveCluster, home: Path) -> Path:
    """The configuration docs/pitr.md gives, pointed at this cluster."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "barman.conf"
    config.write_text(
        f"[barman]\nbarman_home = {home}\nbarman_user = {getpass.getuser()}\nlog_file = {home}/barman.log\n"
        "log_level = INFO\ncompression = gzip\n\n"
        f"[{SERVER}]\ndescription = Engram's PostgreSQL 18\n"
        f"conninfo = host=127.0.0.1 port={archive.pg.port} user=barman dbname=postgres\n"
        f"streaming_conninfo = host=127.0.0.1 port={archive.pg.port} user={ROLE}\n"
        f"backup_method = postgres\nstreaming_archiver = on\nslot_name = {SLOT}\ncreate_slot = auto\n"
        f"path_prefix = {bundled_bindir()}\n"
    )
    return config


def barman_for(config: Path) -> Barman:
    return Barman(BarmanCommand(find_binary(None), SERVER, str(config)))


@asynccontextmanager
async def steady_writes(url: str, every: float = 0.1) -> AsyncIterator[None]:
    """A trickle of flushed WAL records, as a live Engram writes, for as long as the block runs.

    pg_receivewal completes a segment only when the next one brings data; on an idle
    server that takes PostgreSQL's next background record (up to 15 s), so waits
    for an archived segment would dominate the test without this.
    """
    conn = await asyncpg.connect(url)
    try:
        async with anyio.create_task_group() as tg:

            async def tick() -> None:
                while True:
                    await conn.execute("SELECT pg_logical_emit_message(false, 'engram-recovery-test', 'tick', true)")
                    await anyio.sleep(every)

            tg.start_soon(tick)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
    finally:
        await conn.close()
