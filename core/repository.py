"""The backup repository: where recovery points live.

Layout (a local directory, or the same keys under an s3:// prefix):

    backups/<backup_id>/manifest.json   written last: its presence makes a backup complete
    backups/<backup_id>/<artifacts>
    drills/<timestamp>-<backup_id>.json restore drill records

This first version only reads a local repository; run_backup (issue 3) adds
writing and S3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .errors import StoreUnreachable
from .settings import Settings


@dataclass(frozen=True)
class BackupSummary:
    backup_id: str
    finished_at: datetime
    size_bytes: int
    verified: bool | None
    verified_at: datetime | None = None


@dataclass(frozen=True)
class DrillRecord:
    at: datetime
    backup_id: str
    ok: bool
    rto_seconds: float | None = None


@dataclass(frozen=True)
class RepositoryState:
    location: str
    backups: list[BackupSummary] = field(default_factory=list)
    drills: list[DrillRecord] = field(default_factory=list)

    @property
    def newest(self) -> BackupSummary | None:
        return max(self.backups, key=lambda b: b.finished_at, default=None)

    @property
    def last_successful_drill(self) -> DrillRecord | None:
        return max((d for d in self.drills if d.ok), key=lambda d: d.at, default=None)


def _local_root(settings: Settings) -> Path:
    return Path(settings.repository).expanduser()


async def read_state(settings: Settings) -> RepositoryState:
    if settings.repository.startswith("s3://"):
        raise StoreUnreachable(
            "reading an s3:// backup repository is not implemented yet", "use a local directory repository for now"
        )
    root = _local_root(settings)
    if root.exists() and not root.is_dir():
        raise StoreUnreachable(
            f"the backup repository {root} is not a directory", "point ENGRAM_RECOVERY_REPOSITORY at a directory"
        )
    backups: list[BackupSummary] = []
    for manifest in sorted((root / "backups").glob("*/manifest.json")):
        data = json.loads(manifest.read_text(encoding="utf-8"))
        backups.append(
            BackupSummary(
                backup_id=str(data["backup_id"]),
                finished_at=datetime.fromisoformat(data["finished_at"]),
                size_bytes=int(data.get("total_bytes", 0)),
                verified=data.get("verified"),
            )
        )
    drills: list[DrillRecord] = []
    for record in sorted((root / "drills").glob("*.json")):
        data = json.loads(record.read_text(encoding="utf-8"))
        drills.append(
            DrillRecord(
                at=datetime.fromisoformat(data["at"]),
                backup_id=str(data["backup_id"]),
                ok=bool(data["ok"]),
                rto_seconds=data.get("rto_seconds"),
            )
        )
    return RepositoryState(location=str(root), backups=backups, drills=drills)
