"""The pg_dump / pg_restore command objects (their argv, checked without running anything) and the piped reader."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from engram_recovery.core.errors import RecoveryError
from engram_recovery.core.stores.pgclient.process import (
    COALESCE_BYTES,
    PgDumpCommand,
    PgRestoreCommand,
    PipedProcess,
    split_dsn,
)

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


# A child that writes the way pg_dump's stdio does (4 KiB at a time), more slowly than we read.
_TRICKLE = "import os, time\nfor i in range(512):\n    os.write(1, bytes([i % 251]) * 4096)\n    time.sleep(0.0002)\n"


def read_all(argv: list[str]) -> list[bytes]:
    """As the backup pipeline reads a dump: stdout in this thread, stderr drained by another."""
    process = PipedProcess(argv, dict(os.environ))
    drain = threading.Thread(target=process.drain_stderr)
    drain.start()
    try:
        blocks = []
        while block := process.read(1 << 20):
            blocks.append(bytes(block))
        drain.join()
        process.finished()
    finally:
        process.close()
    return blocks


def test_piped_output_arrives_in_coalesced_blocks_not_one_per_small_write() -> None:
    blocks = read_all([sys.executable, "-c", _TRICKLE])
    assert b"".join(blocks) == b"".join(bytes([i % 251]) * 4096 for i in range(512))
    # Without coalescing, nearly every read would return the one 4 KiB write that woke it.
    assert all(len(block) >= COALESCE_BYTES for block in blocks[:-1])
    assert len(blocks) <= (512 * 4096) // COALESCE_BYTES + 1


def test_the_piped_reader_ends_on_silence_and_reports_a_failed_exit() -> None:
    assert read_all([sys.executable, "-c", "pass"]) == []
    with pytest.raises(RecoveryError, match=r"exit code 3\): pg_dump: error: no such table"):
        read_all([sys.executable, "-c", "import sys; sys.stderr.write('pg_dump: error: no such table'); sys.exit(3)"])
