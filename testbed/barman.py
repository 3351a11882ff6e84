"""Barman 3 in streaming mode against a throwaway cluster, as docs/pitr.md sets it up.

The tests (tests/archiving_support.py) and bench/bench_pitr.py configure the same Barman: one
place for its roles, its slot and its configuration file, so that the two cannot drift apart.
"""

from __future__ import annotations

import getpass
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import asyncpg

from engram_recovery.core.stores.barman import Barman, BarmanCommand, find_binary
from engram_recovery.core.stores.pgclient.versions import bundled_bindir

ROLE, SLOT, SERVER = "streaming_barman", "barman", "engram"

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


def barman_config(port: int, home: Path, description: str = "Engram's PostgreSQL 18") -> Path:
    """The configuration docs/pitr.md gives, pointed at the cluster on `port`."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "barman.conf"
    config.write_text(
        f"[barman]\nbarman_home = {home}\nbarman_user = {getpass.getuser()}\nlog_file = {home}/barman.log\n"
        "log_level = INFO\ncompression = gzip\n\n"
        f"[{SERVER}]\ndescription = {description}\n"
        f"conninfo = host=127.0.0.1 port={port} user=barman dbname=postgres\n"
        f"streaming_conninfo = host=127.0.0.1 port={port} user={ROLE}\n"
        f"backup_method = postgres\nstreaming_archiver = on\nslot_name = {SLOT}\ncreate_slot = auto\n"
        f"path_prefix = {bundled_bindir()}\n"
    )
    return config


def barman_for(config: Path) -> Barman:
    return Barman(BarmanCommand(find_binary(None), SERVER, str(config)))


# A flushed WAL record that touches no table.
TICK = "SELECT pg_logical_emit_message(false, 'engram-recovery-test', 'tick', true)"


@asynccontextmanager
async def steady_writes(url: str, every: float = 0.1, statement: str = TICK) -> AsyncIterator[None]:
    """`statement` every `every` seconds, as a live Engram writes, for as long as the block runs.

    pg_receivewal completes a segment only when the next one brings data; on an idle
    server that takes PostgreSQL's next background record (up to 15 s), so waits
    for an archived segment would dominate without this.
    """
    conn = await asyncpg.connect(url)
    try:
        async with anyio.create_task_group() as tg:

            async def tick() -> None:
                while True:
                    await conn.execute(statement)
                    await anyio.sleep(every)

            tg.start_soon(tick)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
    finally:
        await conn.close()
