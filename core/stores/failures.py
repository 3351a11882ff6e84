"""The last line of defence: any exception a tool did not anticipate, as a cause and a fix.

Stores translate their own failures where they happen (core/stores/postgres.py,
core/stores/s3.py, core/repository/localfs.py). What escapes them anyway (a driver error raised
in a place nobody wrapped, a full disk under a temporary file, a bug) reaches
the operator here as one line and a fix, never as a traceback or as the SDK's
bare "Error executing tool X". The traceback goes to the debug log only.
"""

from __future__ import annotations

import errno
import sys

import asyncpg

from ..errors import RecoveryError, StoreUnreachable, scrub
from . import postgres

REPORT_HINT = (
    "run the same call with `engram-recovery --debug ...` (or --log-file PATH) to see the traceback, "
    "and report it with that output"
)


def _first_line(exc: BaseException) -> str:
    text = scrub(str(exc)).strip().splitlines()
    return text[0][:300] if text else ""


def explain(exc: BaseException, tool: str) -> RecoveryError:
    """`exc` as an operator-facing error (a RecoveryError passes through unchanged)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]  # a task group's failure: explain the first of its causes
    if isinstance(exc, RecoveryError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        return postgres.describe(exc)
    if isinstance(exc, BrokenPipeError):
        return RecoveryError(f"{tool}: the reader of the output went away", "keep the output open until it ends")
    if isinstance(exc, asyncpg.InterfaceError | ConnectionError):
        return StoreUnreachable(
            f"{tool}: the connection to PostgreSQL broke: {_first_line(exc)}",
            "check that the database server is still running, then run it again; nothing half-written was kept",
        )
    if _is_boto_error(exc):
        return StoreUnreachable(
            f"{tool}: S3 failed: {_first_line(exc)}", "check the S3 endpoint, bucket, region and credentials"
        )
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreUnreachable(
                f"{tool}: the disk is full{where}",
                "free space there (or point TMPDIR / ENGRAM_RECOVERY_REPOSITORY at a larger volume)",
            )
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return StoreUnreachable(
                f"{tool}: permission denied{where}: {exc.strerror}",
                "give this process access to that path, or choose another directory",
            )
        return StoreUnreachable(f"{tool}: {exc.strerror or _first_line(exc)}{where}", REPORT_HINT)
    return RecoveryError(
        f"{tool} failed unexpectedly: {exc.__class__.__name__}: {_first_line(exc)}", REPORT_HINT
    )


def _is_boto_error(exc: BaseException) -> bool:
    """A botocore failure, asked without importing botocore: a process that never loaded it (a `call`
    of backup_status against a local repository, for cron) cannot have raised one, and the import
    costs a large part of such a run."""
    loaded = sys.modules.get("botocore.exceptions")
    return loaded is not None and isinstance(exc, loaded.ClientError | loaded.BotoCoreError)
