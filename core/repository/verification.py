"""Re-verifying a backup after it was written, and recording the result in the repository.

A backup is verified once when it is written (every artifact read back). Storage
can rot or be tampered with afterwards, so `backup_status deep=true` verifies it
again: every artifact's SHA-256 against the manifest and every mirrored blob's
content against the inventory. The result is kept as
`verifications/<time>-<backup_id>.json`, like a drill record, so a later
default status can say when the backup was last proven good, and how, and
run_backup re-copies the blobs it found bad.
"""

from __future__ import annotations

from datetime import UTC, datetime

from ..errors import RecoveryError
from .base import Repository
from .layout import verification_record_key
from .points import resolve
from .pool import read_inventory, verify_blobs
from .records import VerificationRecord
from .verify import verify_artifacts


async def reverify(repo: Repository, backup_id: str, how: str) -> VerificationRecord:
    """Every artifact's SHA-256 and every mirrored blob's content; a failure is a record with problems."""
    at = datetime.now(UTC)
    try:
        point = await resolve(repo, backup_id)
    except RecoveryError as exc:
        return VerificationRecord(at, backup_id, False, how, problems=[exc.message])
    problems = [v.problem for v in await verify_artifacts(repo, point) if v.problem]
    bad: list[str] = []
    att = point.manifest.attachments
    inventory = point.manifest.artifact(att.inventory) if att.inventory else None
    # An inventory that fails its own SHA-256 was already named; its lines cannot be trusted to check blobs by.
    if inventory is not None and not any(p.startswith(inventory.name) for p in problems):
        entries = [e async for e in read_inventory(repo, point.prefix + inventory.name)]
        checked = await verify_blobs(repo, entries)
        bad = [key for key, _why in checked.bad]
        problems += [f"mirrored blob {key}: {why}" for key, why in checked.bad[:20]]
        if len(checked.bad) > 20:
            problems.append(f"... and {len(checked.bad) - 20} more mirrored blob(s)")
    return VerificationRecord(at, backup_id, not problems, how, problems=problems, bad_blobs=bad)


async def record(repo: Repository, verification: VerificationRecord) -> str:
    """Store the record; return its repository key."""
    key = verification_record_key(verification.at, verification.backup_id)
    await repo.put_bytes(key, verification.to_json())
    return key
