"""What a repository holds: the summary of each backup, the drill and verification records, and
the scan that reads them all (what retention, status, the catalog and the restore tools start from)."""


from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer

from ..errors import IntegrityError, StoreUnreachable
from ..settings import Settings
from . import open_repository
from .base import Repository
from .layout import BACKUPS, DRILLS, VERIFICATIONS, backup_id_of, manifest_key


@dataclass(frozen=True)
class BackupSummary:
    backup_id: str
    finished_at: datetime
    size_bytes: int
    verified: bool | None
    verified_at: datetime | None = None
    started_at: datetime | None = None


class DrillStep(BaseModel):
    name: str
    ok: bool
    seconds: float
    summary: str
    details: dict[str, Any] = Field(default_factory=dict)
    code: str | None = Field(default=None, description="Machine-readable verdict of a proof, e.g. "
                             "'previous_key_only' (the codes of plan_restore's checks).")


class DrillRecord(BaseModel):
    """A restore drill as restore_drill writes it (drills/<time>-<backup_id>.json) and status reads it."""

    model_config = ConfigDict(extra="ignore")

    at: datetime
    backup_id: str
    ok: bool
    rto_seconds: float | None = None
    scratch_database: str | None = None
    steps: list[DrillStep] = Field(default_factory=list)

    @field_serializer("at")
    def _at(self, at: datetime) -> str:
        return at.isoformat()

    @property
    def problem(self) -> str | None:
        """The first failed step, for a failed drill."""
        return next((f"{s.name}: {s.summary}"[:300] for s in self.steps if not s.ok), None)

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2).encode()


@dataclass(frozen=True)
class VerificationRecord:
    """A backup re-verified after it was written: every artifact's SHA-256, every mirrored blob's content."""

    at: datetime
    backup_id: str
    ok: bool
    how: str  # 'deep status'
    problems: list[str] = field(default_factory=list)
    bad_blobs: list[str] = field(default_factory=list)  # pool keys whose content did not verify

    def to_json(self) -> bytes:
        return json.dumps({"at": self.at.isoformat(), "backup_id": self.backup_id, "ok": self.ok, "how": self.how,
                           "problems": self.problems, "bad_blobs": self.bad_blobs}, indent=2).encode()  # fmt: skip


@dataclass(frozen=True)
class Verified:
    """The latest word on one backup: when it was last verified, how, and whether it held."""

    at: datetime
    how: str  # 'at write', 'deep status', 'drill'
    ok: bool
    problem: str | None = None


@dataclass(frozen=True)
class RepositoryState:
    location: str
    backups: list[BackupSummary] = field(default_factory=list)
    drills: list[DrillRecord] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list, metadata={"doc": "backup ids with no manifest"})
    verifications: list[VerificationRecord] = field(default_factory=list)

    def last_verdict(self, backup: BackupSummary) -> Verified | None:
        """The newest of: the write-time read-back, deep-status re-verifications, restore drills of `backup`."""
        found: list[Verified] = []
        if backup.verified is not None:
            found.append(Verified(backup.verified_at or backup.finished_at, "at write", bool(backup.verified),
                                 None if backup.verified else "its checksums did not verify when it was written"))
        found += [Verified(v.at, v.how, v.ok, "; ".join(v.problems[:3]) or None)
                  for v in self.verifications if v.backup_id == backup.backup_id]
        found += [Verified(d.at, "drill", d.ok, d.problem) for d in self.drills if d.backup_id == backup.backup_id]
        return max(found, key=lambda v: v.at, default=None)

    def failed_backups(self) -> dict[str, Verified]:
        """Backups whose latest verification or drill failed, by id."""
        out: dict[str, Verified] = {}
        for backup in self.backups:
            verdict = self.last_verdict(backup)
            if verdict is not None and not verdict.ok:
                out[backup.backup_id] = verdict
        return out

    @property
    def newest(self) -> BackupSummary | None:
        return max(self.backups, key=lambda b: b.finished_at, default=None)

    @property
    def newest_verified(self) -> BackupSummary | None:
        return max((b for b in self.backups if b.verified), key=lambda b: b.finished_at, default=None)

    @property
    def last_successful_drill(self) -> DrillRecord | None:
        return max((d for d in self.drills if d.ok), key=lambda d: d.at, default=None)


async def scan(repo: Repository) -> RepositoryState:
    """Complete backups (those with a manifest), leftovers of interrupted runs, and drill records."""
    folders: set[str] = set()
    complete: list[str] = []
    async for key, _size in repo.list(BACKUPS):
        backup_id = backup_id_of(key)
        if backup_id is None:
            continue
        folders.add(backup_id)
        if key == manifest_key(backup_id):
            complete.append(backup_id)
    backups = [summary_of(_json(await repo.get_bytes(manifest_key(backup_id)), backup_id))
               for backup_id in sorted(complete)]
    incomplete = sorted(folders - set(complete))
    return RepositoryState(location=repo.location, backups=backups, drills=await read_drills(repo),
                           incomplete=incomplete, verifications=await read_verifications(repo))


def summary_of(manifest: dict[str, Any]) -> BackupSummary:
    """What retention and the status read of a manifest (KeyError or ValueError when it lacks that)."""
    return BackupSummary(
        backup_id=str(manifest["backup_id"]),
        finished_at=datetime.fromisoformat(manifest["finished_at"]),
        size_bytes=int(manifest.get("total_bytes", 0)),
        verified=manifest.get("verified"),
        verified_at=datetime.fromisoformat(manifest["verified_at"]) if manifest.get("verified_at") else None,
        started_at=datetime.fromisoformat(manifest["started_at"]) if manifest.get("started_at") else None,
    )


async def read_drills(repo: Repository) -> list[DrillRecord]:
    """Every restore drill record in the repository."""
    drills: list[DrillRecord] = []
    async for key, _size in repo.list(DRILLS):
        if not key.endswith(".json"):
            continue
        data = _json(await repo.get_bytes(key), key)
        try:
            drills.append(DrillRecord.model_validate(data))
        except ValidationError as exc:
            raise IntegrityError(f"{key}: not a drill record ({exc.error_count()} problem(s))",
                                 "remove or restore that file") from exc
    return drills


async def read_verifications(repo: Repository) -> list[VerificationRecord]:
    """Every re-verification record in the repository."""
    verifications: list[VerificationRecord] = []
    async for key, _size in repo.list(VERIFICATIONS):
        if not key.endswith(".json"):
            continue
        data = _json(await repo.get_bytes(key), key)
        verifications.append(
            VerificationRecord(
                at=datetime.fromisoformat(data["at"]), backup_id=str(data["backup_id"]), ok=bool(data["ok"]),
                how=str(data.get("how") or "deep status"), problems=[str(p) for p in data.get("problems") or ()],
                bad_blobs=[str(b) for b in data.get("bad_blobs") or ()],
            )
        )
    return verifications


def _json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{what}: not valid JSON", "remove or restore that file") from exc
    if not isinstance(data, dict):
        raise IntegrityError(f"{what}: the manifest or record is not a JSON object", "remove or restore that file")
    return data


async def read_state(settings: Settings) -> RepositoryState:
    """What the configured repository holds; an absent local directory is an empty repository."""
    repo = open_repository(settings)
    problem = repo.unusable()
    if problem is not None:
        raise StoreUnreachable(problem, "point ENGRAM_RECOVERY_REPOSITORY at a directory")
    async with repo:
        return await scan(repo)
