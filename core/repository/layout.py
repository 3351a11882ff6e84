"""Every key of a repository, built here and nowhere else.

    backups/<backup_id>/manifest.json   written last: its presence makes a backup complete
    backups/<backup_id>/<artifacts>     a folder without a manifest is an interrupted run's leftover
    attachments/pool/<h[:2]>/<h>/<etag> mirrored attachment blobs, shared by all points (h = sha256 of the source key)
    drills/<timestamp>-<backup_id>.json restore drill records
    verifications/<timestamp>-<backup_id>.json   re-verifications of a backup after it was written (deep status)
    protected/<run_id>/attachments-inventory.jsonl   blobs a restore copied aside (users it lacks), in the pool
    restores/<run_id>/log.json          a run_restore's step log (run_id derived from its plan token: resume finds it)

The same keys serve a local directory and an s3://bucket/prefix.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from pathlib import PurePosixPath

from ..errors import ConfigurationError

BACKUPS = "backups/"
DRILLS = "drills/"
VERIFICATIONS = "verifications/"
RESTORES = "restores/"
POOL = "attachments/pool/"
PROTECTED = "protected/"
MANIFEST_NAME = "manifest.json"
INVENTORY_NAME = "attachments-inventory.jsonl"
TMP_MARK = ".tmp-"
_SAFE_ETAG = re.compile(r"^[A-Za-z0-9-]{1,128}$")


def check_key(key: str) -> str:
    """Refuse keys that could escape the repository or collide with temporary files."""
    path = PurePosixPath(key)
    if not key or key.startswith("/") or ".." in path.parts or key.endswith("/") or TMP_MARK in path.name:
        raise ConfigurationError(f"invalid repository key {key!r}", "use a relative path such as backups/<id>/x")
    return key


def backup_prefix(backup_id: str) -> str:
    """The folder of a backup: every key of it starts with this."""
    return f"{BACKUPS}{backup_id}/"


def artifact_key(backup_id: str, name: str) -> str:
    return f"{BACKUPS}{backup_id}/{name}"


def manifest_key(backup_id: str) -> str:
    return artifact_key(backup_id, MANIFEST_NAME)


def inventory_key(backup_id: str, name: str = INVENTORY_NAME) -> str:
    return artifact_key(backup_id, name)


def backup_id_of(key: str) -> str | None:
    """'backups/<id>/anything' -> '<id>'."""
    parts = key.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] + "/" == BACKUPS else None


def pool_key(key: str, etag: str) -> str:
    """Where the blob of (`key`, `etag`) lives in the repository."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    # An ETag is normally hex (with "-N" for multipart uploads); anything else is hashed
    # so that no server can hand us a path component.
    tag = etag if _SAFE_ETAG.match(etag) else "x" + hashlib.sha256(etag.encode("utf-8")).hexdigest()
    return f"{POOL}{digest[:2]}/{digest}/{tag}"


def protected_inventory_key(run_id: str) -> str:
    """The inventory of the blobs restore run `run_id` copied aside before OrphanSweep could delete them.

    Kept by retention (its blobs stay in the pool) until the operator deletes the folder.
    """
    if not run_id or "/" in run_id or run_id in (".", "..") or TMP_MARK in run_id:
        raise ConfigurationError(f"invalid restore run id {run_id!r}", "use the run id run_restore reported")
    return check_key(f"{PROTECTED}{run_id}/{INVENTORY_NAME}")


def drill_record_key(at: datetime, backup_id: str) -> str:
    return f"{DRILLS}{at.strftime('%Y%m%dT%H%M%SZ')}-{backup_id}.json"


def verification_record_key(at: datetime, backup_id: str) -> str:
    return f"{VERIFICATIONS}{at.strftime('%Y%m%dT%H%M%S%fZ')}-{backup_id}.json"


def restore_prefix(run_id: str) -> str:
    """The folder of one run_restore: its step log and what its fences set aside."""
    if not re.fullmatch(r"[0-9a-f]{8,64}", run_id):
        raise ConfigurationError(f"invalid restore run id {run_id!r}", "a run id is the hex digest run_restore derives")
    return f"{RESTORES}{run_id}/"


def restore_log_key(run_id: str) -> str:
    return restore_prefix(run_id) + "log.json"
