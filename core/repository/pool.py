"""The attachments pool of a repository: where mirrored blobs live, and the inventories naming them.

Blobs are shared by all recovery points, addressed by the source key and ETag:

    attachments/pool/<h[:2]>/<h>/<etag>     h = sha256 of the source key

Each recovery point records its exact inventory (JSON lines: key, size, etag, version_id,
repo_key, and the blob's content checksum) under its own folder; a restore that copies aside the
blobs of users its database does not know records theirs under protected/<run_id>/. Writing the pool
is mirror.py's; reading the inventories, re-checking the blobs and collecting the ones no kept
inventory references belong here, which retention, restore and status all use.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import anyio

from ..errors import IntegrityError, RecoveryError
from ..taskgroups import task_group
from .base import Repository
from .layout import POOL


@dataclass(frozen=True)
class InventoryEntry:
    key: str
    size: int
    etag: str
    version_id: str | None
    repo_key: str
    sha256: str | None = None  # of the blob's bytes, taken while they were streamed into the repository
    md5: str | None = None  # of the blob's bytes: computed while streaming, or the source's own ETag

    @property
    def checksum(self) -> tuple[str, str] | None:
        """(algorithm, hex) to check the stored blob's content with; None: size only (an older inventory)."""
        if self.sha256:
            return "sha256", self.sha256
        return ("md5", self.md5) if self.md5 else None

    def to_json(self) -> str:
        data: dict[str, Any] = {"key": self.key, "size": self.size, "etag": self.etag}
        if self.version_id is not None:
            data["version_id"] = self.version_id
        data["repo_key"] = self.repo_key
        if self.sha256 is not None:
            data["sha256"] = self.sha256
        if self.md5 is not None:
            data["md5"] = self.md5
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


async def read_inventory(repo: Repository, key: str) -> AsyncIterator[InventoryEntry]:
    """The entries of the inventory stored under repository key `key`."""
    pending = b""
    async for chunk in repo.get_stream(key):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield _entry(line, key)
    if pending.strip():
        yield _entry(pending, key)


def _entry(line: bytes, where: str) -> InventoryEntry:
    try:
        data = json.loads(line)
        return InventoryEntry(
            key=str(data["key"]),
            size=int(data["size"]),
            etag=str(data["etag"]),
            version_id=data.get("version_id"),
            repo_key=str(data["repo_key"]),
            sha256=data.get("sha256"),
            md5=data.get("md5"),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(
            f"the attachments inventory {where} has a malformed line", "restore that file from a copy of the repository"
        ) from exc


async def collect_garbage(repo: Repository, kept_inventories: Iterable[str]) -> tuple[int, int]:
    """Delete pool entries that no kept inventory references; return (objects, bytes) deleted.

    `kept_inventories` are the repository keys of the inventories of every backup
    retention keeps (`inventory_key(backup_id)`), including backups whose run is
    still in progress. A kept inventory that cannot be read stops the collection
    before anything is deleted: guessing would delete blobs a backup needs.
    """
    referenced: set[str] = set()
    for key in kept_inventories:
        if not await repo.exists(key):
            raise IntegrityError(
                f"the attachments inventory {key} of a kept backup is missing; nothing was deleted",
                "pass only inventories that exist (backups mirrored from S3), or repair the backup",
            )
        async for entry in read_inventory(repo, key):
            referenced.add(entry.repo_key)
    doomed: list[tuple[str, int]] = [(k, size) async for k, size in repo.list(POOL) if k not in referenced]
    for start in range(0, len(doomed), 1000):
        await repo.delete([k for k, _size in doomed[start : start + 1000]])
    return len(doomed), sum(size for _k, size in doomed)


@dataclass(frozen=True)
class BlobCheck:
    """The mirrored blobs of one inventory, re-read and checked against it."""

    objects: int
    by_content: int  # checked against a recorded checksum
    size_only: int  # named by an older inventory without checksums: only their size could be checked
    bad: list[tuple[str, str]]  # (pool key, what is wrong), in inventory order

    @property
    def how(self) -> str:
        if not self.size_only:
            return "content (checksums)"
        return "size only" if not self.by_content else f"content, {self.size_only} by size only (older inventory)"


async def verify_blobs(repo: Repository, entries: list[InventoryEntry], concurrency: int = 8) -> BlobCheck:
    """Re-read every blob `entries` name and compare its content with the checksum the inventory recorded."""
    problems: dict[int, str] = {}
    sizes = {key: size async for key, size in repo.list(POOL)}
    limiter = anyio.CapacityLimiter(max(1, concurrency))

    async def one(index: int, entry: InventoryEntry) -> None:
        stored = sizes.get(entry.repo_key)
        if stored is None:
            problems[index] = "missing from the repository"
            return
        if stored != entry.size:
            problems[index] = f"{stored} bytes stored, {entry.size} recorded"
            return
        checksum = entry.checksum
        if checksum is None:
            return
        algorithm, expected = checksum
        async with limiter:
            try:
                _size, actual = await repo.checksum(entry.repo_key, algorithm)
            except RecoveryError as exc:
                problems[index] = f"unreadable: {exc.message}"
                return
        if actual != expected:
            problems[index] = (f"content differs from what was copied ({algorithm} {actual[:12]}..., recorded "
                               f"{expected[:12]}...)")  # fmt: skip

    # In batches: a million blobs must not mean a million tasks at once.
    for start in range(0, len(entries), 1000):
        async with task_group() as tg:
            for index in range(start, min(start + 1000, len(entries))):
                tg.start_soon(one, index, entries[index])
    size_only = sum(1 for e in entries if e.checksum is None)
    return BlobCheck(
        objects=len(entries), by_content=len(entries) - size_only, size_only=size_only,
        bad=[(entries[i].repo_key, problems[i]) for i in sorted(problems)],
    )
