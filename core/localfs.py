"""Local-file primitives of the directory repository: errors with their fix, durable writes, fast hashing."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import IO, Any

from .errors import RecoveryError, StoreUnreachable

HASH_BLOCK = 4 << 20


def os_error(exc: OSError, what: str, where: str) -> RecoveryError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreUnreachable(
            f"the backup repository {where} is full (while trying to {what})",
            "free space there or point ENGRAM_RECOVERY_REPOSITORY at a larger volume; nothing half-written was kept",
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreUnreachable(
            f"the backup repository {where} is not writable (while trying to {what}): {exc.strerror}",
            "give this process write access to ENGRAM_RECOVERY_REPOSITORY or choose another directory",
        )
    return StoreUnreachable(
        f"the backup repository {where} failed while trying to {what}: {exc.strerror or exc}",
        "check that ENGRAM_RECOVERY_REPOSITORY is a reachable, mounted directory",
    )


def write_hashed(handle: IO[bytes], digest: Any, chunk: bytes) -> None:
    digest.update(chunk)
    handle.write(chunk)


def hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(HASH_BLOCK)
    with path.open("rb", buffering=0) as handle, memoryview(buffer) as view:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
            size += count
    return size, digest.hexdigest()


def flush_sync(handle: IO[bytes]) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
