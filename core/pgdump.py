"""The one place that runs PostgreSQL's client binaries (pg_dump, pg_restore).

Each binary is wrapped in a small command object whose argv can be inspected
and tested without running it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

import anyio

from .errors import ConfigurationError

_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
_version_cache: dict[str, ClientVersion] = {}


@dataclass(frozen=True)
class ClientVersion:
    binary: str
    path: str
    major: int
    text: str


async def client_version(binary: str) -> ClientVersion:
    """`pg_dump --version` (cached per binary: the status tool asks on every call)."""
    cached = _version_cache.get(binary)
    if cached is not None:
        return cached
    path = shutil.which(binary)
    if path is None:
        raise ConfigurationError(
            f"{binary} was not found",
            "install the PostgreSQL client package matching your server (e.g. postgresql-client-15) "
            "or set ENGRAM_RECOVERY_PG_DUMP / ENGRAM_RECOVERY_PG_RESTORE to its path",
        )
    result = await anyio.run_process([path, "--version"], check=False)
    text = result.stdout.decode(errors="replace").strip()
    match = _VERSION.search(text)
    if result.returncode != 0 or match is None:
        raise ConfigurationError(f"{path} --version did not report a PostgreSQL version", f"check {binary}")
    version = ClientVersion(binary=binary, path=path, major=int(match.group(1)), text=text)
    _version_cache[binary] = version
    return version


def server_major(version_num: int) -> int:
    return version_num // 10000


# Re-exported for callers that need to run the binaries synchronously in a thread.
CalledProcessError = subprocess.CalledProcessError
