"""The one place that runs PostgreSQL's client binaries (pg_dump, pg_restore).

Each binary is wrapped in a small command object whose argv can be inspected
and tested without running it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import anyio
from anyio.abc import ByteReceiveStream, Process

from ...errors import ConfigurationError, RecoveryError, scrub
from ...taskgroups import task_group

# Re-exported for callers that need to run the binaries synchronously in a thread.
CalledProcessError = subprocess.CalledProcessError


# --- running pg_dump ------------------------------------------------------------------------------

DumpFormat = Literal["custom", "directory", "plain"]
_FORMAT_FLAG: dict[str, str] = {"custom": "c", "directory": "d", "plain": "p"}
STDERR_KEEP = 16 << 10
_REDIRECTING = frozenset(
    {"PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGSERVICE", "PGOPTIONS"}
)


def split_dsn(dsn: str) -> tuple[str, str | None]:
    """(the URL without its password, the password): the password travels in PGPASSWORD, never in argv."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn, None
    netloc = (quote(unquote(parts.username or ""), safe="") + "@" if parts.username else "") + (
        f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname or ""
    ) + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), unquote(parts.password)


@dataclass(frozen=True)
class PgDumpCommand:
    """pg_dump, uncompressed (we compress in the pipeline), at an exported snapshot when one is given."""

    binary: str
    dsn: str
    format: DumpFormat = "custom"
    snapshot: str | None = None
    output: str | None = None  # the directory for format="directory"; stdout otherwise
    jobs: int = 1
    prefix: tuple[str, ...] = ()  # ENGRAM_RECOVERY_PG_CLIENT_PREFIX: pg_dump runs as `<prefix> <binary> ...`

    @property
    def argv(self) -> list[str]:
        url, _password = split_dsn(self.dsn)
        argv = [*self.prefix, self.binary, f"--format={_FORMAT_FLAG[self.format]}", "--compress=0", "--no-password"]
        if self.snapshot:
            argv.append(f"--snapshot={self.snapshot}")
        if self.format == "plain":
            # What Engram's documented restore (`psql < file`) expects of a plain dump.
            argv += ["--clean", "--if-exists"]
        if self.format == "directory":
            if not self.output:
                raise ValueError("a directory-format dump needs an output directory")
            argv += [f"--file={self.output}", f"--jobs={self.jobs}"]
        argv.append(f"--dbname={url}")
        return argv

    @property
    def env(self) -> dict[str, str]:
        _url, password = split_dsn(self.dsn)
        # Only variables that would point the dump elsewhere are dropped; TLS settings (PGSSL*) still apply.
        env = {k: v for k, v in os.environ.items() if k not in _REDIRECTING}
        env["PGAPPNAME"] = "engram-recovery run_backup"
        if password is not None:
            env["PGPASSWORD"] = password
        return env


@dataclass(frozen=True)
class PgRestoreCommand:
    """Stock pg_restore of a custom/directory dump into an existing (empty) database."""

    binary: str
    dsn: str
    source: str
    jobs: int = 1
    no_owner: bool = False
    prefix: tuple[str, ...] = ()

    @property
    def argv(self) -> list[str]:
        url, _password = split_dsn(self.dsn)
        argv = [*self.prefix, self.binary, "--no-password", "--exit-on-error", f"--dbname={url}", f"--jobs={self.jobs}"]
        if self.no_owner:
            argv += ["--no-owner", "--no-privileges"]
        return [*argv, self.source]

    @property
    def env(self) -> dict[str, str]:
        return PgDumpCommand(self.binary, self.dsn).env


class Running:
    """A started client binary: read `stdout`, then `await finished()` (raises with its stderr on failure)."""

    def __init__(self, process: Process, name: str) -> None:
        self.process = process
        self.name = name
        self.stderr = bytearray()

    @property
    def stdout(self) -> ByteReceiveStream:
        assert self.process.stdout is not None
        return self.process.stdout

    async def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk
            # Keep the tail only: the final error is what an operator needs.
            del self.stderr[:-STDERR_KEEP]

    def error_text(self) -> str:
        return scrub(self.stderr.decode(errors="replace").strip())

    async def finished(self) -> None:
        code = await self.process.wait()
        if code != 0:
            raise RecoveryError(
                f"{self.name} failed (exit code {code}): {self.error_text() or 'no message'}",
                "see pg_dump's message above; nothing was kept of this run",
            )


@asynccontextmanager
async def spawn(argv: list[str], env: dict[str, str]) -> AsyncIterator[Running]:
    """Start argv with stdout piped; on leaving early (error, cancellation) the process is killed."""
    try:
        process = await anyio.open_process(argv, env=env, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise ConfigurationError(f"cannot start {argv[0]}: {exc.strerror}", "check ENGRAM_RECOVERY_PG_DUMP") from exc
    running = Running(process, os.path.basename(argv[0]))
    try:
        async with task_group() as tg:
            tg.start_soon(running._drain_stderr)
            try:
                yield running
            finally:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                with anyio.CancelScope(shield=True):
                    await process.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()


# --- the streaming dump's process, read by a worker thread ---------------------------------------

# Linux lets an unprivileged process grow a pipe to 1 MiB (/proc/sys/fs/pipe-max-size).
_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
# A read that returns less than this waits COALESCE_PAUSE for more before reading again.
COALESCE_BYTES = 256 << 10
COALESCE_PAUSE = 0.001


class PipedProcess:
    """A client binary whose stdout a worker thread reads in large, coalesced blocks.

    pg_dump's stdio writes 4 KiB at a time into a pipe (glibc sizes the buffer by the
    pipe's st_blksize): ~340,000 writes for a 2 GiB dump. A reader that is faster
    than pg_dump is woken by nearly every one of them, and each wake-up costs both
    processes a context switch. So `read` reads the raw pipe and, after a short
    read, pauses a millisecond (pg_dump fills at most a few hundred KiB of the
    1 MiB pipe meanwhile, so it never blocks on us) instead of going straight back
    to sleep on the next 4 KiB: about 9,000 reads instead of 220,000, and half the
    reader's CPU (docs/benchmarks.md, run_backup).
    """

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.name = os.path.basename(argv[0])
        try:
            self.process = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot start {argv[0]}: {exc.strerror}", "check ENGRAM_RECOVERY_PG_DUMP"
            ) from exc
        assert self.process.stdout is not None and self.process.stderr is not None
        self.stdout = self.process.stdout
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.stdout.fileno(), _F_SETPIPE_SZ, PIPE_SIZE)
        self.stderr = bytearray()

    def read(self, size: int) -> bytearray:
        """Blocking: the next block of stdout, at most `size` bytes, empty at the end."""
        block = bytearray(size)
        filled = 0
        with memoryview(block) as view:
            while filled < size:
                # Straight from the pipe into the block: `read` does its own batching.
                count = os.readv(self.stdout.fileno(), [view[filled:]])
                if not count:
                    break
                filled += count
                if filled >= COALESCE_BYTES:
                    break
                time.sleep(COALESCE_PAUSE)
        del block[filled:]
        return block

    def drain_stderr(self) -> None:
        """Blocking: keep the tail of stderr (run in a thread so pg_dump never blocks on it)."""
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr += line
            del self.stderr[:-STDERR_KEEP]

    def finished(self) -> None:
        """Blocking: wait for the exit; raise with the scrubbed stderr on failure."""
        code = self.process.wait()
        if code != 0:
            message = scrub(self.stderr.decode(errors="replace").strip()) or "no message"
            raise RecoveryError(
                f"{self.name} failed (exit code {code}): {message}",
                "see pg_dump's message above; nothing was kept of this run",
            )

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    def close(self) -> None:
        self.kill()
        self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
