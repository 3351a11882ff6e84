"""The pg_dump / pg_restore command objects (their argv, checked without running anything) and the piped reader."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engram_recovery.core.errors import RecoveryError
from engram_recovery.core.stores.pgclient.commands import (
    PgClientCommand,
    PgDumpCommand,
    PgRestoreCommand,
    PsqlCommand,
    RestoreClients,
    split_dsn,
    stdin_restore,
)
from engram_recovery.core.stores.pgclient.process import COALESCE_BYTES, PIPE_SIZE, Feed, PipedProcess, feed_all

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


@pytest.mark.parametrize("command", [
    PgDumpCommand("pg_dump", DSN),
    PgRestoreCommand("pg_restore", DSN, "/x/db.dump"),
    PgRestoreCommand("pg_restore", DSN, list_only=True),
    PsqlCommand("psql", DSN),
], ids=lambda c: " ".join(c.argv[:2]))  # fmt: skip
def test_every_client_gets_the_same_environment_filter(command: object, monkeypatch: pytest.MonkeyPatch) -> None:
    # What points a client elsewhere or changes its session is dropped; what secures the DSN's connection passes.
    dropped = ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE", "PGOPTIONS", "PGTZ", "PGCLIENTENCODING")
    for name in dropped:
        monkeypatch.setenv(name, "elsewhere")
    for name in ("PGSSLMODE", "PGSSLROOTCERT", "PGGSSENCMODE", "PGCONNECT_TIMEOUT", "PGPASSFILE"):
        monkeypatch.setenv(name, "kept")
    monkeypatch.setenv("PGPASSWORD", "inherited")
    assert isinstance(command, PgDumpCommand | PgRestoreCommand | PsqlCommand)
    env = command.env
    assert not set(dropped) & set(env)
    assert all(env[name] == "kept" for name in ("PGSSLMODE", "PGSSLROOTCERT", "PGGSSENCMODE", "PGCONNECT_TIMEOUT",
                                                 "PGPASSFILE"))  # fmt: skip
    assert env["PGPASSWORD"] == "s3cr/t" and env["PATH"] == os.environ["PATH"]


def test_the_client_prefix_comes_before_every_binary() -> None:
    prefix = ("docker", "compose", "exec", "-T", "postgres")
    restore = stdin_restore("custom", RestoreClients("pg_restore", "psql", prefix), DSN)
    for command in (PgDumpCommand("pg_dump", DSN, prefix=prefix), restore):
        assert command.argv[:6] == [*prefix, command.binary]


def test_a_stdin_restore_is_one_transaction_with_psql_for_plain_dumps() -> None:
    plain = stdin_restore("plain", RestoreClients("/pg/bin/pg_restore", "/pg/bin/psql"), DSN).argv
    assert plain[0] == "/pg/bin/psql" and "ON_ERROR_STOP=1" in plain and plain[-2:] == ["-f", "-"]
    custom = stdin_restore("custom", RestoreClients("/pg/bin/pg_restore", "/pg/bin/psql"), DSN).argv
    assert custom[0] == "/pg/bin/pg_restore" and "--single-transaction" in custom and "--exit-on-error" in custom
    assert not any("s3cr" in arg for arg in plain + custom)


def test_pg_restore_sections_use_lists_and_listings() -> None:
    argv = PgRestoreCommand("pg_restore", DSN, "/x/head", jobs=3, sections=("post-data",)).argv
    assert argv[-3:] == ["--jobs=3", "--section=post-data", "/x/head"]
    assert "--use-list=/x/share-1.list" in PgRestoreCommand("pg_restore", DSN, use_list="/x/share-1.list").argv
    assert PgRestoreCommand("pg_restore", list_only=True).argv == ["pg_restore", "--list"]


def test_split_dsn_without_password_is_unchanged() -> None:
    assert split_dsn("postgresql://postgres@127.0.0.1/engram") == ("postgresql://postgres@127.0.0.1/engram", None)


# A child that writes the way pg_dump's stdio does (4 KiB at a time), more slowly than we read.
_TRICKLE = "import os, time\nfor i in range(512):\n    os.write(1, bytes([i % 251]) * 4096)\n    time.sleep(0.0002)\n"


@dataclass(frozen=True)
class Script(PgClientCommand):
    """A Python child in the client-command family: its environment passes the one filter, as pg_dump's does."""

    script: str = ""

    def arguments(self) -> list[str]:
        return ["-c", self.script]


def read_all(script: str, dsn: str = "") -> list[bytes]:
    """As the backup pipeline reads a dump: stdout in this thread, stderr drained by another."""
    process = PipedProcess(Script(sys.executable, dsn, script=script))
    drain = threading.Thread(target=process.drain_stderr)
    drain.start()
    try:
        blocks = [bytes(block) for block in process.blocks(1 << 20, 1)]
        drain.join()
        process.finished()
    finally:
        process.close()
    return blocks


_BURST = "import os\ndata = bytes(range(256)) * 4096 * 6\nwhile data:\n    data = data[os.write(1, data):]\n"


def test_blocks_are_read_ahead_so_the_child_never_waits_on_a_slow_consumer() -> None:
    # 6 MiB: six times what the pipe holds. Read ahead by up to 8 blocks, the child can write it all and
    # exit while the consumer still holds its first block; read block by block, it would wait forever.
    process = PipedProcess(Script(sys.executable, "", script=_BURST))
    drain = threading.Thread(target=process.drain_stderr)
    drain.start()
    try:
        blocks = process.blocks(1 << 20, 8)
        first = bytes(next(blocks))
        process.process.wait(timeout=30)
        rest = b"".join(bytes(block) for block in blocks)
        drain.join()
        process.finished()
    finally:
        process.close()
    assert first + rest == bytes(range(256)) * 4096 * 6


def test_piped_output_arrives_in_coalesced_blocks_not_one_per_small_write() -> None:
    blocks = read_all(_TRICKLE)
    assert b"".join(blocks) == b"".join(bytes([i % 251]) * 4096 for i in range(512))
    # Without coalescing, nearly every read would return the one 4 KiB write that woke it.
    assert all(len(block) >= COALESCE_BYTES for block in blocks[:-1])
    assert len(blocks) <= (512 * 4096) // COALESCE_BYTES + 1


def test_the_piped_reader_ends_on_silence_and_reports_a_failed_exit() -> None:
    assert read_all("pass") == []
    with pytest.raises(RecoveryError, match=r"exit code 3\): pg_dump: error: no such table"):
        read_all("import sys; sys.stderr.write('pg_dump: error: no such table'); sys.exit(3)")


def test_the_piped_reader_runs_the_command_with_its_filtered_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "elsewhere.invalid")  # would point a client at another server
    monkeypatch.setenv("PGSSLMODE", "verify-full")  # secures the DSN's own connection: passes
    shown = "import os; print(os.environ.get('PGHOST'), os.environ.get('PGSSLMODE'), os.environ.get('PGPASSWORD'))"
    assert b"".join(read_all(shown, DSN)).split() == [b"None", b"verify-full", b"s3cr/t"]


# --- clients fed on stdin ---------------------------------------------------------------------------

# A child that reports its stdin pipe's size and a digest of every byte it read (as pg_restore reads a dump).
_READER = (
    "import fcntl, hashlib, os, sys\n"
    "size = fcntl.fcntl(0, 1032)\n"
    "digest = hashlib.sha256()\n"
    "while block := os.read(0, 1 << 16):\n"
    "    digest.update(block)\n"
    "print(size, digest.hexdigest())\n"
)


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


@pytest.mark.anyio
async def test_a_fed_client_reads_every_byte_through_a_1_mib_pipe() -> None:
    parts = [os.urandom(n) for n in (1, 3 << 20, 70_000, 2 << 20, 5)]
    feed = Feed(Script(sys.executable, script=_READER), "fix", keep_stdout=True)
    assert await feed_all(feed, _chunks(parts)) == sum(map(len, parts))
    size, digest = feed.stdout.split()
    assert digest.decode() == hashlib.sha256(b"".join(parts)).hexdigest()
    # Linux lets an unprivileged process grow a pipe to pipe-max-size: pg_restore then reads 1 MiB per wake-up.
    limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())  # noqa: ASYNC240 (a tiny proc file)
    assert int(size) == (PIPE_SIZE if limit >= PIPE_SIZE else 65536)


@pytest.mark.anyio
async def test_a_fed_client_may_stop_reading_early_and_its_failure_is_reported() -> None:
    parts = [os.urandom(1 << 20) for _ in range(8)]
    stops = Feed(Script(sys.executable, script="import os; os.read(0, 10)"), "fix")
    assert await feed_all(stops, _chunks(parts)) > 0  # no BrokenPipeError: its exit code (0) says all is well
    fails = Feed(Script(sys.executable, script="import sys; sys.stderr.write('pg_restore: error: bad'); sys.exit(3)"),
                 "drop and retry")  # fmt: skip
    with pytest.raises(RecoveryError, match=r"exit 3\): pg_restore: error: bad"):
        await feed_all(fails, _chunks(parts))
