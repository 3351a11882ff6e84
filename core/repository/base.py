"""The backup repository: where recovery points live.

Layout (a local directory, or the same keys under an s3://bucket/prefix):

    backups/<backup_id>/manifest.json   written last: its presence makes a backup complete
    backups/<backup_id>/<artifacts>     a folder without a manifest is an interrupted run's leftover
    attachments/...                     the shared, content-addressed pool of mirrored attachment blobs
    drills/<timestamp>-<backup_id>.json restore drill records
    verifications/<timestamp>-<backup_id>.json   re-verifications of a backup after it was written (deep status)

Every write is atomic: a local file is written under a temporary name in the
same directory, fsynced and renamed; an S3 object is one PutObject or a
multipart upload completed only after its last part. A reader therefore never
sees a half-written object under its final key.

Use a repository as an async context manager (`async with open_repository(s) as
repo:`), which opens and closes the S3 client once for all operations.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, Any, Self

import anyio

from ..errors import ConfigurationError, IntegrityError, StoreUnreachable
from ..settings import Settings
from ..stores.s3 import S3Location
from .localfs import WINDOW, Checkpoint, HashedWriter, differing_windows, fsync_dir, hash_file, os_error

BACKUPS = "backups/"
DRILLS = "drills/"
VERIFICATIONS = "verifications/"
ATTACHMENTS = "attachments/"
MANIFEST_NAME = "manifest.json"
READ_CHUNK = 1 << 20
_TMP_MARK = ".tmp-"
# Threads that re-read one local file's windows at once: the cores, up to 4 (reading is from the page cache).
VERIFY_THREADS = max(1, min(4, os.cpu_count() or 1))


def check_key(key: str) -> str:
    """Refuse keys that could escape the repository or collide with temporary files."""
    path = PurePosixPath(key)
    if not key or key.startswith("/") or ".." in path.parts or key.endswith("/") or _TMP_MARK in path.name:
        raise ConfigurationError(f"invalid repository key {key!r}", "use a relative path such as backups/<id>/x")
    return key


class Repository(ABC):
    """The primitives run_backup, the attachments mirror and the restore tools share."""

    location: str
    s3_location: S3Location | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    @abstractmethod
    async def check_writable(self) -> None:
        """Fail now, with the fix named, if a backup could not be written (missing, read-only, bad credentials)."""

    @abstractmethod
    async def put_stream(self, key: str, chunks: AsyncIterator[bytes]) -> tuple[int, str]:
        """Store the stream under `key` atomically; return (size, sha256 hex) of the stored bytes."""

    async def put_bytes(self, key: str, data: bytes) -> tuple[int, str]:
        async def one() -> AsyncIterator[bytes]:
            yield data

        return await self.put_stream(key, one())

    @abstractmethod
    def get_stream(self, key: str, chunk_size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """The stored bytes of `key`, in chunks (StoreUnreachable if it does not exist)."""

    async def get_bytes(self, key: str) -> bytes:
        return b"".join([chunk async for chunk in self.get_stream(key)])

    @abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        """(key, size) of every stored object whose key starts with `prefix`, temporary files excluded."""

    @abstractmethod
    async def delete(self, keys: Iterable[str]) -> int:
        """Delete these keys (missing ones are ignored); return how many were asked for."""

    async def sha256(self, key: str) -> tuple[int, str]:
        """Re-read `key` and hash it."""
        digest = hashlib.sha256()
        size = 0
        async for chunk in self.get_stream(key):
            digest.update(chunk)
            size += len(chunk)
        return size, digest.hexdigest()

    async def checksum(self, key: str, algorithm: str) -> tuple[int, str]:
        """Re-read `key` and hash it with `algorithm` ('sha256' or 'md5')."""
        digest = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
        size = 0
        async for chunk in self.get_stream(key):
            digest.update(chunk)
            size += len(chunk)
        return size, digest.hexdigest()

    async def list_modified(self, prefix: str) -> AsyncIterator[tuple[str, int, float | None]]:
        """As `list`, with each object's modification time (epoch seconds) where the store keeps one cheaply."""
        async for key, size in self.list(prefix):
            yield key, size, None

    async def verify(self, key: str, size: int, sha256: str) -> str | None:
        """Re-read every byte of `key`: None when it is exactly `size` bytes hashing to `sha256`, else what differs.

        The verification step of a backup. StoreUnreachable when `key` cannot be read at all.
        """
        actual_size, actual = await self.sha256(key)
        if (actual_size, actual) == (size, sha256):
            return None
        return (
            f"stored {actual_size} bytes with SHA-256 {actual[:16]}..., recorded {size} bytes with {sha256[:16]}..."
        )

    async def sweep_temporary(self) -> builtins.list[str]:
        """Remove what interrupted writes left behind (temporary files, open multipart uploads); return their keys."""
        return []


# --- local directory ----------------------------------------------------------------------------------


class LocalRepository(Repository):
    def __init__(self, root: Path, window: int = WINDOW) -> None:
        self.root = root
        self.location = str(root)
        self._window = window
        # The hash checkpoints of what this instance wrote, for `verify` to re-read in parallel.
        self._written: dict[str, list[Checkpoint]] = {}

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def check_writable(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreUnreachable(
                f"the backup repository {self.root} is not a directory",
                "point ENGRAM_RECOVERY_REPOSITORY at a directory",
            )
        try:
            await anyio.to_thread.run_sync(lambda: self.root.mkdir(parents=True, exist_ok=True))
            await self.put_bytes(".write-check", b"ok")
            await self.delete([".write-check"])
        except OSError as exc:
            raise os_error(exc, "create it", str(self.root)) from exc

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes]) -> tuple[int, str]:
        final = self._path(key)
        temp = final.with_name(f".{final.name}{_TMP_MARK}{secrets.token_hex(6)}")
        handle: IO[bytes] | None = None
        try:
            await anyio.to_thread.run_sync(lambda: final.parent.mkdir(parents=True, exist_ok=True))
            handle = await anyio.to_thread.run_sync(lambda: temp.open("wb"))
            writer = HashedWriter(handle, self._window)
            async for chunk in chunks:
                # Hashing beside the write, in the worker thread, keeps the event loop free.
                await anyio.to_thread.run_sync(writer.write, chunk)
            digest = await anyio.to_thread.run_sync(writer.finish)
            size = writer.size
            handle.close()
            handle = None
            await anyio.to_thread.run_sync(os.replace, temp, final)
            await anyio.to_thread.run_sync(fsync_dir, final.parent)
            if len(writer.checkpoints) > 2:
                # Only files of several windows gain from a parallel re-read, and only they are kept: a
                # mirror writing a million small blobs must not hold a million hash states.
                self._written[key] = writer.checkpoints
        except OSError as exc:
            raise os_error(exc, f"write {key}", str(self.root)) from exc
        finally:
            # Also on cancellation: nothing half-written stays behind under any name.
            if handle is not None:
                handle.close()
            if temp.exists():
                temp.unlink(missing_ok=True)
        return size, digest

    async def get_stream(self, key: str, chunk_size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        path = self._path(key)
        with self._reading(key):
            handle = await anyio.to_thread.run_sync(lambda: path.open("rb"))
        try:
            while chunk := await anyio.to_thread.run_sync(handle.read, chunk_size):
                yield chunk
        finally:
            handle.close()

    async def exists(self, key: str) -> bool:
        return await anyio.to_thread.run_sync(self._path(key).is_file)

    async def sha256(self, key: str) -> tuple[int, str]:
        # One thread call reading into one reused buffer: no per-block allocation or event-loop hop.
        path = self._path(key)
        with self._reading(key):
            return await anyio.to_thread.run_sync(hash_file, path)

    async def checksum(self, key: str, algorithm: str) -> tuple[int, str]:
        path = self._path(key)
        with self._reading(key):
            return await anyio.to_thread.run_sync(hash_file, path, algorithm)

    async def verify(self, key: str, size: int, sha256: str) -> str | None:
        """As Repository.verify; a file this instance wrote is re-read window by window on several cores."""
        checkpoints = self._written.get(key)
        if not checkpoints or (checkpoints[-1].offset, checkpoints[-1].state.hexdigest()) != (size, sha256):
            return await super().verify(key, size, sha256)
        path = self._path(key)
        with self._reading(key):
            stored = await anyio.to_thread.run_sync(lambda: path.stat().st_size)
            if stored != size:
                return f"stored {stored} bytes, {size} were written"
            differing = await differing_windows(path, checkpoints, VERIFY_THREADS)
        if not differing:
            return None
        ranges = ", ".join(f"{a}-{b}" for a, b in differing)
        return f"bytes {ranges} do not read back as written (recorded {size} bytes with SHA-256 {sha256[:16]}...)"

    @contextmanager
    def _reading(self, key: str) -> Iterator[None]:
        """A failed read as an operator-facing error: a missing file means a damaged or pruned backup."""
        try:
            yield
        except FileNotFoundError as exc:
            raise StoreUnreachable(
                f"{key} is missing from the backup repository {self.root}",
                "the backup is damaged or was pruned: choose another recovery point",
            ) from exc
        except OSError as exc:
            raise os_error(exc, f"read {key}", str(self.root)) from exc

    async def list(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        found = await anyio.to_thread.run_sync(self._list_sync, prefix)
        for key, size, _modified in found:
            yield key, size

    async def list_modified(self, prefix: str) -> AsyncIterator[tuple[str, int, float | None]]:
        # The same stat call that gives the size gives the time: nothing more is read.
        for item in await anyio.to_thread.run_sync(self._list_sync, prefix):
            yield item

    def _list_sync(self, prefix: str) -> builtins.list[tuple[str, int, float | None]]:
        # Walk only the directory the prefix names, not the whole repository.
        base = self.root / prefix[: prefix.rfind("/") + 1] if "/" in prefix else self.root
        out: builtins.list[tuple[str, int, float | None]] = []
        if not base.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if _TMP_MARK in name:
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    stat = full.stat()
                    out.append((key, stat.st_size, stat.st_mtime))
        out.sort()
        return out

    async def delete(self, keys: Iterable[str]) -> int:
        paths = [self._path(k) for k in keys]

        def remove() -> None:
            parents: set[Path] = set()
            for path in paths:
                path.unlink(missing_ok=True)
                parents.add(path.parent)
            # Empty backup folders go too, so a pruned backup leaves no trace.
            for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
                while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()
                    parent = parent.parent

        try:
            await anyio.to_thread.run_sync(remove)
        except OSError as exc:
            raise os_error(exc, "delete old files", str(self.root)) from exc
        return len(paths)

    async def sweep_temporary(self) -> builtins.list[str]:
        def sweep() -> builtins.list[str]:
            swept: builtins.list[str] = []
            if not self.root.is_dir():
                return swept
            for dirpath, _dirs, files in os.walk(self.root, topdown=False):
                directory = Path(dirpath)
                for name in files:
                    if _TMP_MARK in name:
                        (directory / name).unlink(missing_ok=True)
                        swept.append((directory / name).relative_to(self.root).as_posix())
                # A folder an interrupted run created but never filled.
                if directory != self.root and not any(directory.iterdir()):
                    directory.rmdir()
            return swept

        return await anyio.to_thread.run_sync(sweep)


def open_repository(settings: Settings) -> Repository:
    """The configured repository (not yet connected: use it with `async with`)."""
    if settings.repository.startswith("s3://"):
        from .s3 import S3Repository

        return S3Repository.from_settings(settings)
    return LocalRepository(Path(settings.repository).expanduser())


# --- what is in it ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupSummary:
    backup_id: str
    finished_at: datetime
    size_bytes: int
    verified: bool | None
    verified_at: datetime | None = None
    started_at: datetime | None = None


@dataclass(frozen=True)
class DrillRecord:
    at: datetime
    backup_id: str
    ok: bool
    rto_seconds: float | None = None
    problem: str | None = None  # the first failed step, for a failed drill


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


def backup_id_of(key: str) -> str | None:
    """'backups/<id>/anything' -> '<id>'."""
    parts = key.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] == "backups" else None


async def scan(repo: Repository) -> RepositoryState:
    """Complete backups (those with a manifest), leftovers of interrupted runs, and drill records."""
    folders: set[str] = set()
    complete: list[str] = []
    async for key, _size in repo.list(BACKUPS):
        backup_id = backup_id_of(key)
        if backup_id is None:
            continue
        folders.add(backup_id)
        if key == f"{BACKUPS}{backup_id}/{MANIFEST_NAME}":
            complete.append(backup_id)
    backups = [summary_of(_json(await repo.get_bytes(f"{BACKUPS}{backup_id}/{MANIFEST_NAME}"), backup_id))
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
        drills.append(
            DrillRecord(
                at=datetime.fromisoformat(data["at"]),
                backup_id=str(data["backup_id"]),
                ok=bool(data["ok"]),
                rto_seconds=data.get("rto_seconds"),
                problem=next((f"{s.get('name')}: {s.get('summary')}"[:300] for s in data.get("steps") or ()
                              if isinstance(s, dict) and not s.get("ok")), None),
            )
        )
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
    if isinstance(repo, LocalRepository) and repo.root.exists() and not repo.root.is_dir():
        raise StoreUnreachable(
            f"the backup repository {repo.root} is not a directory", "point ENGRAM_RECOVERY_REPOSITORY at a directory"
        )
    async with repo:
        return await scan(repo)
