"""The pg_dump / pg_restore command objects: their argv, checked without running anything."""

from __future__ import annotations

import pytest

from engram_recovery.core.pgdump import PgDumpCommand, PgRestoreCommand, split_dsn

DSN = "postgresql://backup%40ops:s3cr%2Ft@db.internal:6432/engram?sslmode=require"


def test_the_password_travels_in_the_environment_never_in_argv() -> None:
    command = PgDumpCommand("pg_dump", DSN, "custom", snapshot="00000003-0000001B-1")
    assert not any("s3cr" in arg for arg in command.argv)
    assert command.env["PGPASSWORD"] == "s3cr/t"
    assert command.argv[-1] == "--dbname=postgresql://backup%40ops@db.internal:6432/engram?sslmode=require"


def test_custom_dumps_are_uncompressed_at_the_snapshot() -> None:
    argv = PgDumpCommand("/usr/bin/pg_dump", DSN, "custom", snapshot="00000003-0000001B-1").argv
    assert argv[:4] == ["/usr/bin/pg_dump", "--format=c", "--compress=0", "--no-password"]
    assert "--snapshot=00000003-0000001B-1" in argv


def test_plain_dumps_carry_clean_if_exists_and_directory_dumps_a_target() -> None:
    assert {"--clean", "--if-exists"} <= set(PgDumpCommand("pg_dump", DSN, "plain").argv)
    argv = PgDumpCommand("pg_dump", DSN, "directory", output="/tmp/x", jobs=2).argv
    assert "--format=d" in argv and "--file=/tmp/x" in argv and "--jobs=2" in argv


def test_inherited_pg_variables_cannot_redirect_the_dump(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "elsewhere")
    monkeypatch.setenv("PGPASSWORD", "inherited")
    env = PgDumpCommand("pg_dump", "postgresql://postgres@127.0.0.1/engram").env
    assert "PGHOST" not in env and "PGPASSWORD" not in env


def test_pg_restore_argv() -> None:
    argv = PgRestoreCommand("pg_restore", DSN, "/x/db.dump", jobs=4, no_owner=True).argv
    assert argv[0] == "pg_restore" and argv[-1] == "/x/db.dump" and "--jobs=4" in argv and "--no-owner" in argv
    assert not any("s3cr" in arg for arg in argv)


def test_split_dsn_without_password_is_unchanged() -> None:
    assert split_dsn("postgresql://postgres@127.0.0.1/engram") == ("postgresql://postgres@127.0.0.1/engram", None)
