"""Streamed SHA-256 verification of backup artifacts.

`hashlib.sha256` is OpenSSL's implementation, which uses the CPU's SHA
extensions (SHA-NI on x86-64, the ARMv8 crypto extensions) where they exist:
several times faster than coreutils `sha256sum`. Two habits keep it there:
reading into one preallocated buffer in large blocks (no per-block allocation,
few system calls), and hashing in a worker thread, where OpenSSL runs with the
GIL released, so the event loop stays free and two artifacts hash on two cores.
bench/bench_verify.py measures it beside `sha256sum` on the same file.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread

from ..taskgroups import task_group
from .base import Repository, mismatch
from .localfs import hash_file
from .points import RecoveryPoint

# A thread per artifact up to this many: the machines this runs on have few cores.
DEFAULT_CONCURRENCY = 2


@dataclass(frozen=True)
class Digest:
    sha256: str
    size: int


@dataclass(frozen=True)
class ArtifactVerdict:
    name: str
    expected_sha256: str
    expected_size: int
    actual_sha256: str | None
    actual_size: int | None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def sha256_file(path: str | Path) -> Digest:
    """SHA-256 and size of a file, read in large blocks into one reused buffer (localfs.hash_file)."""
    size, sha256 = hash_file(Path(path))
    return Digest(sha256, size)


async def sha256_path(path: str | Path) -> Digest:
    """`sha256_file` in a worker thread, so the event loop keeps serving."""
    return await anyio.to_thread.run_sync(sha256_file, path)


async def sha256_stream(chunks: AsyncIterable[bytes]) -> Digest:
    """SHA-256 of a byte stream (an S3 body): large chunks are hashed off the event loop."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if len(chunk) >= 1 << 20:
            await anyio.to_thread.run_sync(digest.update, chunk)
        else:
            digest.update(chunk)
    return Digest(digest.hexdigest(), size)


def compare(name: str, expected_sha256: str, expected_size: int, actual: Digest | None) -> ArtifactVerdict:
    """Judge one artifact; the wording says what to do about each kind of mismatch."""
    if actual is None:
        return ArtifactVerdict(
            name, expected_sha256, expected_size, None, None,
            problem=f"{name} is missing from the repository: this recovery point is incomplete; choose another",
        )
    problem = mismatch(actual.size, actual.sha256, expected_size, expected_sha256)
    if problem is not None:
        problem = (f"{name}: {problem}: truncated, replaced or altered in storage; do not restore from it, choose "
                   "another recovery point")  # fmt: skip
    return ArtifactVerdict(name, expected_sha256, expected_size, actual.sha256, actual.size, problem)


async def verify_files(
    items: Sequence[tuple[str, Path, str, int]], concurrency: int = DEFAULT_CONCURRENCY
) -> list[ArtifactVerdict]:
    """Verify local artifacts `(name, path, sha256, size)`, `concurrency` at a time, in input order."""
    results: dict[int, ArtifactVerdict] = {}
    limiter = anyio.CapacityLimiter(max(1, concurrency))

    async def one(index: int, name: str, path: Path, sha: str, size: int) -> None:
        async with limiter:
            try:
                actual: Digest | None = await sha256_path(path)
            except FileNotFoundError:
                actual = None
        results[index] = compare(name, sha, size, actual)

    async with task_group() as tg:
        for index, (name, path, sha, size) in enumerate(items):
            tg.start_soon(one, index, name, path, sha, size)
    return [results[i] for i in range(len(items))]


async def verify_artifacts(repo: Repository, point: RecoveryPoint) -> list[ArtifactVerdict]:
    """Re-hash every artifact as stored; a local repository is read straight from disk, in large blocks."""
    artifacts = point.manifest.artifacts
    files = [repo.local_file(point.prefix + a.name) for a in artifacts]
    if all(path is not None for path in files):
        items = [(a.name, path, a.sha256, a.size) for a, path in zip(artifacts, files, strict=True) if path]
        return await verify_files(items)
    out: list[ArtifactVerdict] = []
    for a in artifacts:
        key = point.prefix + a.name
        actual: Digest | None = await sha256_stream(repo.get_stream(key)) if await repo.exists(key) else None
        out.append(compare(a.name, a.sha256, a.size, actual))
    return out
