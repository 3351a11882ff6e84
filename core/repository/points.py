"""A recovery point named by an operator (`latest`, a backup id, `before:<ISO time>`), resolved to
its manifest and the SHA-256 of the manifest's bytes (which a plan token binds)."""

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


async def resolve(repo: Repository, recovery_point: str) -> RecoveryPoint:
    """`latest`, a backup id, or `before:<ISO time>` (the newest backup whose snapshot is older than that)."""
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
