"""Where recovery points live, and everything about their keys and records.

open_repository (here) picks the configured kind. base.py (what every repository can do, its
capabilities included: callers ask, never switch on the type), local.py (a directory), s3.py (a
bucket), localfs.py (atomic, windowed files on a local disk); manifest.py (the document each backup
stores), records.py (the summaries, drill and verification records, and the scan that reads them),
points.py (resolving `latest`, an id or `before:<time>`);
pool.py (the shared attachments pool and its inventories), mirror.py (a bucket, or some of its
prefixes, into that pool, with an inventory); verify.py (artifacts against their
recorded SHA-256) and verification.py (re-verifying a backup and keeping the result); retention.py
(the pure policy) and prune.py (applying it).
"""

from __future__ import annotations

from pathlib import Path

from ..settings import Settings
from .base import Repository
from .local import LocalRepository

__all__ = ["open_repository"]


def open_repository(settings: Settings) -> Repository:
    """The configured repository (not yet connected: use it with `async with`)."""
    if settings.repository.startswith("s3://"):
        # Imported here: aioboto3 costs a local repository's `call` (cron) most of its start-up.
        from .s3 import S3Repository

        return S3Repository.from_settings(settings)
    return LocalRepository(Path(settings.repository).expanduser())
