"""One backup run, step by step: checks, lock, leftovers, snapshot, dump, mirror, verify, manifest.

The order is what makes a recovery point trustworthy: everything that can
refuse (pg_dump too old, a role that cannot see RLS rows, an unwritable
repository, another run holding the lock) refuses before anything is written;
artifacts are written and re-read before the manifest; the manifest goes last
and is itself re-read. Any failure or cancellation before that leaves a folder
without a manifest, which no reader counts as a backup and the next run deletes.
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio

from ..artifact import encryption as backup_crypto
from ..artifact.codec import ENCRYPTED_SUFFIX, Encoder
from ..artifact.compression import SUFFIX, Compression
from ..engram.keys import MasterKeys
from ..engram.schema_probe import SchemaProbe, probe
from ..errors import ConfigurationError, IntegrityError, RecoveryError
from ..progress import Progress
from ..repository.base import Repository
from ..repository.layout import artifact_key, backup_id_of, backup_prefix, manifest_key
from ..repository.manifest import Artifact, QdrantInfo
from ..repository.records import scan
from ..runtime import Runtime
from ..stores import qdrant
from ..stores.advisory import database_lock
from ..stores.pgclient.commands import DumpFormat, PgDumpCommand
from ..stores.pgclient.process import spawn
from ..stores.pgclient.versions import ClientVersion, choose
from ..taskgroups import task_group
from .facts import DatabaseFacts, counted_facts, exported_snapshot, quick_facts
from .lock import BACKUP
from .pipeline import Stored, dump_to_repository, file_to_repository

QDRANT_TIMEOUT = 10.0


def new_backup_id(now: datetime) -> str:
    # Sorts by time; the suffix keeps two ids distinct even within one second.
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)


def dump_name(fmt: DumpFormat, compression: Compression, encrypted: bool) -> str:
    base = {"custom": "db.dump", "plain": "db.sql", "directory": "db.dir"}[fmt]
    return base + SUFFIX[compression] + (ENCRYPTED_SUFFIX if encrypted else "")


def backup_key(runtime: Runtime) -> bytes | None:
    return backup_crypto.backup_key(runtime.settings)


async def preflight(runtime: Runtime) -> tuple[SchemaProbe, ClientVersion]:
    """Everything that must refuse before a byte is written."""
    settings = runtime.settings
    async with runtime.pool.acquire() as conn:
        p = await probe(conn)
    if not p.looks_like_engram:
        raise ConfigurationError(
            f"database {settings.database_name} has no users/vaults/notes tables: it is not Engram's database",
            "point DATABASE_URL at Engram's database",
        )
    if not p.sees_all_rows:
        raise ConfigurationError(
            f"role {p.role} is neither superuser nor BYPASSRLS, so it cannot read the rows of the tables under "
            f"FORCE ROW LEVEL SECURITY ({', '.join(sorted(p.forced_rls))}); a dump would fail or be empty",
            "back up as a superuser or a role with BYPASSRLS (e.g. ALTER ROLE <backup role> BYPASSRLS), "
            "and put that role in DATABASE_URL",
        )
    choice = await choose("pg_dump", settings.pg_dump, p.server_major,
                          f"dump a PostgreSQL {p.server_major} server ({p.server_version})",
                          settings.pg_client_prefix)  # fmt: skip
    return p, choice.require()


@contextlib.asynccontextmanager
async def locks(runtime: Runtime, repo: Repository) -> AsyncIterator[None]:
    """The database's advisory lock and the repository's own (a local directory's flock)."""
    async with database_lock(runtime.dsn, BACKUP), repo.lock(BACKUP.hint):
        yield


async def clean_leftovers(repo: Repository) -> list[str]:
    """Delete the folders of interrupted runs (no manifest) and temporary files; call under the lock."""
    state = await scan(repo)
    for backup_id in state.incomplete:
        await repo.purge(backup_prefix(backup_id))
    # A run killed during its first write leaves only a temporary file (or an open upload) in its folder.
    swept = {backup_id_of(key) for key in await repo.sweep_temporary()}
    return sorted(set(state.incomplete) | {b for b in swept if b})


async def discard(repo: Repository, backup_id: str) -> None:
    """Best effort: delete an unfinished backup's folder (never one whose manifest was written)."""
    folder = backup_prefix(backup_id)
    with contextlib.suppress(RecoveryError, OSError):
        if await repo.exists(manifest_key(backup_id)):
            return
        await repo.purge(folder)


@dataclass
class DumpOutcome:
    artifacts: list[Artifact] = field(default_factory=list)
    dump_bytes: int = 0
    stored_bytes: int = 0
    seconds: float = 0.0


def _artifact(name: str, stored: Stored, compression: Compression, encrypted: bool) -> Artifact:
    return Artifact(
        name=name, kind="database", size=stored.size, sha256=stored.sha256, compression=compression,
        encryption=backup_crypto.FORMAT_NAME if encrypted else None, plain_size=stored.plain_size,
    )


@dataclass(frozen=True)
class DumpJob:
    """What a backup's dump needs: the deployment, where it goes, how it is encoded, which pg_dump runs it."""

    runtime: Runtime
    repo: Repository
    backup_id: str
    fmt: DumpFormat
    compression: Compression
    key: bytes | None  # the backup key; None: unencrypted
    pg_dump: ClientVersion
    progress: Progress


async def dump_database(job: DumpJob, snapshot_id: str, total: float | None = None) -> DumpOutcome:
    runtime, repo, backup_id, fmt, compression, key = (job.runtime, job.repo, job.backup_id, job.fmt,
                                                       job.compression, job.key)  # fmt: skip
    progress, pg_dump = job.progress, job.pg_dump
    name = dump_name(fmt, compression, key is not None)
    outcome = DumpOutcome()
    started = time.monotonic()

    async def report(done: int) -> None:
        await progress(done, total, f"dumping the database: {done / 2**20:,.0f} MiB")

    if fmt != "directory":
        command = PgDumpCommand(pg_dump.path, runtime.dsn, fmt, snapshot_id, prefix=pg_dump.prefix)
        stored = await dump_to_repository(
            command, repo, artifact_key(backup_id, name), Encoder(compression, key), report
        )
        outcome.artifacts.append(_artifact(name, stored, compression, key is not None))
    else:
        # pg_dump writes a directory dump itself (no stdout): it needs local scratch space the
        # size of the uncompressed dump; each file then goes through the same pipeline.
        with tempfile.TemporaryDirectory(prefix="engram-dump-") as scratch:
            target = Path(scratch) / "dump"
            command = PgDumpCommand(pg_dump.path, runtime.dsn, fmt, snapshot_id, output=str(target), jobs=2)
            async with spawn(command) as running:
                async for _ in running.stdout:
                    pass
                await running.finished()
            files = sorted(p for p in target.iterdir() if p.is_file())
            for number, path in enumerate(files, start=1):
                member = f"{name}/{path.name}{SUFFIX[compression]}" + (ENCRYPTED_SUFFIX if key is not None else "")
                stored = await file_to_repository(
                    _read_file(path), repo, artifact_key(backup_id, member), Encoder(compression, key)
                )
                outcome.artifacts.append(_artifact(member, stored, compression, key is not None))
                await progress(number, len(files), f"storing the directory dump: {number}/{len(files)} files")
    outcome.dump_bytes = sum(a.plain_size or 0 for a in outcome.artifacts)
    outcome.stored_bytes = sum(a.size for a in outcome.artifacts)
    outcome.seconds = time.monotonic() - started
    return outcome


async def _read_file(path: Path) -> AsyncIterator[bytes]:
    handle = await anyio.to_thread.run_sync(path.open, "rb")
    try:
        while chunk := await anyio.to_thread.run_sync(handle.read, 1 << 20):
            yield chunk
    finally:
        handle.close()


async def verify_artifacts(repo: Repository, backup_id: str, artifacts: list[Artifact]) -> list[str]:
    """Re-read every artifact and compare size and SHA-256 with what was recorded; return the mismatches."""
    problems: list[str] = []
    for artifact in artifacts:
        try:
            problem = await repo.verify(artifact_key(backup_id, artifact.name), artifact.size, artifact.sha256)
        except RecoveryError as exc:
            problem = exc.message
        if problem is not None:
            problems.append(f"{artifact.name}: {problem}")
    return problems


async def require_verified(repo: Repository, backup_id: str, artifacts: list[Artifact]) -> None:
    problems = await verify_artifacts(repo, backup_id, artifacts)
    if problems:
        raise IntegrityError(
            "what was written to the backup repository does not read back identically: " + "; ".join(problems),
            "the repository's storage is corrupting data; check its disk or bucket, then run the backup again",
        )


async def qdrant_info(runtime: Runtime) -> tuple[QdrantInfo, str | None]:
    """Qdrant is derived data: its state is recorded when it answers, and its absence is only a warning."""
    settings = runtime.settings
    if not settings.qdrant_configured:
        return QdrantInfo(configured=False), None
    info = QdrantInfo(configured=True, collection=settings.qdrant_collection)
    try:
        with anyio.fail_after(QDRANT_TIMEOUT):
            state = await qdrant.collection_state(runtime.qdrant(), settings.qdrant_collection)
    except (*qdrant.QDRANT_ERRORS, TimeoutError, RecoveryError) as exc:
        why = exc.message if isinstance(exc, RecoveryError) else f"Qdrant did not answer ({exc.__class__.__name__})"
        return info, (
            f"{why}: its collection is not recorded in this recovery point (it can be rebuilt from Postgres with "
            "reindex_qdrant)"
        )
    return info.model_copy(update={
        "exists": state.exists, "points": state.points, "dense_size": state.dense_size,
        "distance": state.dense_distance, "sparse": list(state.sparse),
    }), None


async def gather_and_dump(job: DumpJob, p: SchemaProbe) -> tuple[DatabaseFacts, DumpOutcome, str | None, datetime]:
    """Snapshot, cheap facts, then the dump and the exact counts at once, both in that snapshot."""
    runtime = job.runtime
    settings = runtime.settings
    if job.fmt == "directory" and job.pg_dump.prefix:
        # pg_dump would write the directory where the prefix runs it (a container), out of our reach.
        raise ConfigurationError(
            "a directory-format dump cannot go through ENGRAM_RECOVERY_PG_CLIENT_PREFIX: pg_dump would write its "
            "files where the prefix runs it",
            "use format 'custom' (the default) or 'plain', or unset the prefix to use the bundled pg_dump",
        )
    async with exported_snapshot(runtime.dsn) as snap:
        facts = await quick_facts(snap.conn, p, MasterKeys.from_settings(settings))
        outcome = DumpOutcome()

        async def run_dump() -> None:
            nonlocal outcome
            # No total: pg_dump's output is not the database's size (bytea doubles as hex text, indexes
            # vanish), and a progress bar that overshoots its total misleads more than none.
            outcome = await dump_database(job, snap.snapshot_id)

        async with task_group() as tg:
            tg.start_soon(run_dump)
            await counted_facts(snap.conn, p, facts, blobs_in_database=settings.storage_backend == "database")
    return facts, outcome, snap.wal_lsn, snap.taken_at


def utcnow() -> datetime:
    return datetime.now(UTC)
