"""ENGRAM_RECOVERY_PG_CLIENT_PREFIX: the clients run as `<prefix> pg_dump ...` (e.g. `docker compose exec -T
postgres`), their version is asked through the prefix, and a too-old client there is refused.

The prefix here is a real command: a script that logs how it was called and then runs what it was given with a
PATH holding only one PostgreSQL installation, the way `docker compose exec` runs the container's own clients.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from support import EngramDB, backup, engram_env

from engram_recovery.core.errors import ConfigurationError
from engram_recovery.core.progress import silent
from engram_recovery.core.repository.manifest import Manifest
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores.pgclient.versions import bundled_bindir, choose
from engram_recovery.tools.restore_drill import RestoreDrillInput, restore_drill
from engram_recovery.tools.run_backup import RunBackupInput, run_backup

pytestmark = pytest.mark.anyio


def prefix_command(tmp_path: Path, bindir: Path, name: str = "in-container") -> tuple[Path, Path]:
    """A prefix that logs its arguments, then execs them with only `bindir` on PATH; (script, log)."""
    log = tmp_path / f"{name}.log"
    script = tmp_path / name
    script.write_text(
        "#!/bin/sh\n"
        f"[ \"$1\" = --service ] && shift 2\n"  # stands for `exec -T postgres`: words the prefix itself takes
        f"echo \"$*\" >> {shlex.quote(str(log))}\n"
        f"PATH={shlex.quote(str(bindir))} exec \"$@\"\n"
    )
    script.chmod(0o755)
    return script, log


def old_clients(tmp_path: Path, major: int = 15) -> Path:
    """An installation whose pg_dump and pg_restore answer --version as PostgreSQL `major`."""
    bindir = tmp_path / f"pg{major}" / "bin"
    bindir.mkdir(parents=True)
    for tool in ("pg_dump", "pg_restore"):
        (bindir / tool).write_text(f"#!/bin/sh\necho '{tool} (PostgreSQL) {major}.8'\n")
        (bindir / tool).chmod(0o755)
    return bindir


def test_the_prefix_is_read_as_shell_words(tmp_path: Path) -> None:
    settings = load_settings(environ={"DATABASE_URL": "postgresql://u@h/db",
                                      "ENGRAM_RECOVERY_PG_CLIENT_PREFIX": "docker compose exec -T 'postgres'"})
    assert settings.pg_client_prefix == ("docker", "compose", "exec", "-T", "postgres")
    with pytest.raises(ConfigurationError) as caught:
        load_settings(environ={"DATABASE_URL": "postgresql://u@h/db",
                               "ENGRAM_RECOVERY_PG_CLIENT_PREFIX": "docker compose exec -T 'postgres"})
    assert "ENGRAM_RECOVERY_PG_CLIENT_PREFIX" in caught.value.message and caught.value.hint


async def test_the_version_is_asked_through_the_prefix_and_a_too_old_client_there_is_refused(tmp_path: Path) -> None:
    bundled = bundled_bindir()
    assert bundled is not None
    good, good_log = prefix_command(tmp_path, bundled, "good")
    choice = await choose("pg_dump", None, 18, "dump a PostgreSQL 18 server", (str(good), "--service", "pg"))
    assert choice.chosen is not None and choice.chosen.major == 18 and choice.chosen.origin == "prefix"
    assert choice.chosen.command == (str(good), "--service", "pg", "pg_dump")
    assert good_log.read_text().splitlines() == ["pg_dump --version"]

    old, old_log = prefix_command(tmp_path, old_clients(tmp_path), "old")
    refused = await choose("pg_dump", None, 18, "dump a PostgreSQL 18 server", (str(old),))
    assert refused.chosen is None and old_log.read_text().splitlines() == ["pg_dump --version"]
    assert refused.problem is not None and "pg_dump 15" in refused.problem
    assert "ENGRAM_RECOVERY_PG_CLIENT_PREFIX" in refused.problem
    # The bundled 18 is NOT silently used instead: the operator chose where the clients run.
    assert refused.fix is not None and "unset it" in refused.fix

    missing = await choose("pg_dump", None, 18, "dump", (str(tmp_path / "no-such-wrapper"),))
    assert missing.chosen is None and missing.problem is not None and "was not found" in missing.problem


async def test_a_whole_backup_and_its_drill_run_through_the_prefix(engram_db: EngramDB, tmp_path: Path) -> None:
    bundled = bundled_bindir()
    assert bundled is not None
    script, log = prefix_command(tmp_path, bundled)
    # PATH without any PostgreSQL client: only the prefix can find pg_dump / pg_restore.
    env = engram_env(engram_db, tmp_path, PATH="/usr/bin:/bin",
                     ENGRAM_RECOVERY_PG_CLIENT_PREFIX=f"{shlex.quote(str(script))} --service postgres")
    runtime = Runtime(load_settings(environ=env))
    try:
        result = await run_backup(runtime, RunBackupInput(), silent)
        assert result.verified and result.backup_id
        calls = log.read_text().splitlines()
        assert calls[0] == "pg_dump --version"
        assert any(c.startswith("pg_dump --format=c") for c in calls), calls
        manifest = Manifest.model_validate_json(
            (tmp_path / "repo" / "backups" / result.backup_id / "manifest.json").read_bytes()
        )
        assert manifest.database.pg_dump_path == f"{script} --service postgres pg_dump"

        drilled = await restore_drill(runtime, RestoreDrillInput(recovery_point=result.backup_id), silent)
        assert drilled.verdict == "ok", drilled.summary
        calls = log.read_text().splitlines()
        assert "pg_restore --version" in calls
        assert any(c.startswith("pg_restore --no-password --exit-on-error --single-transaction") for c in calls)
    finally:
        await runtime.aclose()


async def test_a_backup_through_a_prefix_whose_pg_dump_is_too_old_is_refused_before_writing(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    script, log = prefix_command(tmp_path, old_clients(tmp_path))
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_PG_CLIENT_PREFIX=str(script))
    with pytest.raises(ConfigurationError) as caught:
        await backup(env)
    assert "pg_dump 15" in caught.value.message and "ENGRAM_RECOVERY_PG_CLIENT_PREFIX" in caught.value.message
    assert log.read_text().splitlines() == ["pg_dump --version"]
    assert not (tmp_path / "repo" / "backups").exists() or not any((tmp_path / "repo" / "backups").iterdir())


async def test_a_directory_dump_is_refused_through_a_prefix_which_would_write_it_elsewhere(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    bundled = bundled_bindir()
    assert bundled is not None
    script, _log = prefix_command(tmp_path, bundled)
    plain = engram_env(engram_db, tmp_path)
    prefixed = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_PG_CLIENT_PREFIX=str(script))
    runtime = Runtime(load_settings(environ=prefixed))
    try:
        with pytest.raises(ConfigurationError) as caught:
            await run_backup(runtime, RunBackupInput(format="directory"), silent)
        assert "directory-format" in caught.value.message and "custom" in caught.value.hint
        assert not list((tmp_path / "repo").glob("backups/*"))  # nothing of the run is left
        # A directory backup made without the prefix is not drilled through it either.
        direct = Runtime(load_settings(environ=plain))
        try:
            made = await run_backup(direct, RunBackupInput(format="directory"), silent)
        finally:
            await direct.aclose()
        drilled = await restore_drill(runtime, RestoreDrillInput(recovery_point=str(made.backup_id)), silent)
        assert drilled.verdict == "fail" and "ENGRAM_RECOVERY_PG_CLIENT_PREFIX" in drilled.summary
        assert drilled.scratch_database is None  # refused before creating anything
    finally:
        await runtime.aclose()
