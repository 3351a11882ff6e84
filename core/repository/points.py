"""A recovery point named by an operator (`latest`, a backup id, `before:<ISO time>`), resolved to
its manifest and the SHA-256 of the manifest's bytes (which a plan token binds); and `at:<ISO time>`,
a moment for point-in-time recovery from the WAL archive (parsed here, recovered by core/restore/pitr.py)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from ..errors import ConfigurationError, IntegrityError
from .base import Repository
from .layout import backup_prefix, manifest_key
from .manifest import Manifest
from .records import scan


@dataclass(frozen=True)
class RecoveryPoint:
    manifest: Manifest
    manifest_sha256: str
    prefix: str  # repository key prefix of the backup's folder


PITR_PREFIX = "at:"


def point_in_time(recovery_point: str) -> datetime | None:
    """The moment of `at:<ISO time>`, None for any other recovery point.

    The time must carry its zone: a naive time would be read in some server's zone, and an
    hour's difference is an hour of notes restored or lost.
    """
    spec = recovery_point.strip()
    if not spec.startswith(PITR_PREFIX):
        return None
    text = spec.removeprefix(PITR_PREFIX).strip()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigurationError(f"{spec!r} does not hold an ISO time",
                                 "write it as at:2026-11-23T18:00:00Z (with its zone)") from None  # fmt: skip
    if moment.tzinfo is None:
        raise ConfigurationError(f"{spec!r} has no time zone: it could be read in any zone",
                                 f"add the zone, e.g. at:{text}Z for UTC or at:{text}+01:00")  # fmt: skip
    return moment


async def resolve(repo: Repository, recovery_point: str) -> RecoveryPoint:
    """`latest`, a backup id, or `before:<ISO time>` (the newest backup whose snapshot is older than that)."""
    if point_in_time(recovery_point) is not None:
        raise ConfigurationError(f"{recovery_point.strip()!r} is a point in time in the WAL archive, not a backup "
                                 "in the repository", "use it with plan_restore or restore_drill (point-in-time "
                                 "recovery through Barman), or name a backup: 'latest', 'before:<ISO time>' or a "
                                 "backup id")  # fmt: skip
    state = await scan(repo)
    if not state.backups:
        raise ConfigurationError(
            f"the backup repository {repo.location} holds no complete backup", "run run_backup first"
        )
    spec = recovery_point.strip()
    if spec == "latest":
        chosen = state.newest
    elif spec.startswith("before:"):
        try:
            limit = datetime.fromisoformat(spec.removeprefix("before:").strip())
        except ValueError:
            raise ConfigurationError(
                f"{spec!r} does not hold an ISO time", "write it as before:2026-11-23T18:00:00Z"
            ) from None
        limit = limit if limit.tzinfo else limit.replace(tzinfo=UTC)
        # A backup holds the data of its snapshot, taken at its start: it qualifies if it started before the limit.
        chosen = max((b for b in state.backups if (b.started_at or b.finished_at) < limit),
                     key=lambda b: b.finished_at, default=None)  # fmt: skip
    else:
        chosen = next((b for b in state.backups if b.backup_id == spec), None)
    if chosen is None:
        known = ", ".join(b.backup_id for b in sorted(state.backups, key=lambda b: b.finished_at)[-5:])
        raise ConfigurationError(
            f"no complete backup matches {spec!r}", f"use 'latest', 'before:<ISO time>' or one of: {known}"
        )
    prefix = backup_prefix(chosen.backup_id)
    raw = await repo.get_bytes(manifest_key(chosen.backup_id))
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValueError as exc:
        raise IntegrityError(
            f"the manifest of {chosen.backup_id} is not a valid manifest", "choose another recovery point"
        ) from exc
    return RecoveryPoint(manifest, hashlib.sha256(raw).hexdigest(), prefix)
