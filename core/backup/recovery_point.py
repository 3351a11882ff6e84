"""run_backup: one consistent recovery point (database dump, attachments, key check), verified.

The order of the steps, and the manifest that records them; the steps themselves live in run.py
(preflight, locks, the dump in the facts' snapshot), pipeline.py, facts.py and
core/repository/mirror.py.
tools/run_backup.py is the MCP adapter.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from typing import Literal

import anyio
from pydantic import BaseModel, Field

from ..artifact import encryption as backup_crypto
from ..engram import crypto as engram_crypto
from ..engram.keys import MasterKeys
from ..engram.schema_probe import SchemaProbe
from ..errors import RecoveryError
from ..progress import Progress
from ..repository import open_repository
from ..repository.base import Repository
from ..repository.layout import manifest_key
from ..repository.manifest import Artifact, AttachmentsInfo, DatabaseInfo, Manifest
from ..repository.mirror import MirrorOptions, MirrorReport, mirror_attachments
from ..repository.prune import RetentionReport, apply_retention
from ..repository.records import scan
from ..runtime import Runtime
from ..stores.pgclient.versions import ClientVersion
from ..taskgroups import task_group
from ..verdict import Verdict
from .facts import LACKING_SHOWN, DatabaseFacts
from .run import (
    DumpJob,
    backup_key,
    clean_leftovers,
    discard,
    gather_and_dump,
    locks,
    new_backup_id,
    preflight,
    qdrant_info,
    require_verified,
    utcnow,
)

TOOL_VERSION = "0.1.0"


UNENCRYPTED = (
    "ENGRAM_RECOVERY_BACKUP_KEY is not set, so this backup is not encrypted: its dump holds Engram's users, "
    "refresh tokens, API keys and every wrapped data key in the clear (note contents stay encrypted by Engram). "
    "Set ENGRAM_RECOVERY_BACKUP_KEY_FILE to a file holding `openssl rand -base64 32`, kept with the master key"
)


@dataclass(frozen=True)
class BackupRequest:
    """What run_backup was asked (the tool's input, validated)."""

    dry_run: bool = False
    format: Literal["custom", "directory", "plain"] = "custom"
    compression: Literal["zstd", "gzip", "none"] = "zstd"
    prune: bool = False
    confirm: bool = False


@dataclass
class BackupRun:
    """One run's context: what every step of it reads (ten of them, too many to pass one by one)."""

    runtime: Runtime
    repo: Repository
    params: BackupRequest
    key: bytes | None
    probe: SchemaProbe
    client: ClientVersion
    timings: dict[str, float]
    progress: Progress
    backup_id: str
    cleaned: list[str]


class AttachmentsResult(BaseModel):
    backend: Literal["database", "s3"]
    summary: str
    objects: int = 0
    bytes: int = 0
    copied_objects: int = 0
    copied_bytes: int = 0
    inventory: str | None = None
    versioned: bool | None = None
    seconds: float = 0.0


# (No docstring: the tool's result inherits this model, and its schema must not gain a description.)
class BackupReport(BaseModel):
    verdict: Verdict = Field(description="'ok', or 'warn' when the backup succeeded with warnings to read.")
    summary: str
    dry_run: bool
    backup_id: str | None = Field(description="The new recovery point (None for a dry run).")
    repository: str
    format: str
    compression: str
    encrypted: bool
    database_bytes: int | None = Field(default=None, description="pg_database_size: what the dump reads.")
    dump_bytes: int = Field(default=0, description="Bytes pg_dump wrote, before compression and encryption.")
    stored_bytes: int = Field(default=0, description="Bytes written to the repository for this backup.")
    compression_ratio: float | None = Field(default=None, description="stored / dumped bytes of the database.")
    throughput_mib_s: float | None = Field(default=None, description="Dumped MiB per second of dump time.")
    durations: dict[str, float] = Field(default_factory=dict, description="Seconds per step.")
    artifacts: list[Artifact] = Field(default_factory=list)
    attachments: AttachmentsResult | None = None
    verified: bool = False
    warnings: list[str] = Field(default_factory=list)
    cleaned_leftovers: list[str] = Field(
        default_factory=list, description="Folders of interrupted runs (no manifest) that this run deleted."
    )
    retention: RetentionReport | None = None


async def backup(runtime: Runtime, params: BackupRequest, progress: Progress) -> BackupReport:
    """One recovery point (or, dry, what it would be): checks, the locks, leftovers, then the steps of `_backup`."""
    settings = runtime.settings
    timings: dict[str, float] = {}
    clock = time.monotonic()
    key = backup_key(runtime)
    p, client = await preflight(runtime)
    timings["checks"] = round(time.monotonic() - clock, 3)
    async with open_repository(settings) as repo:
        if params.dry_run:
            return await _dry_run(runtime, repo, params, key is not None, timings)
        await repo.check_writable()
        async with locks(runtime, repo):
            cleaned = await clean_leftovers(repo)
            backup_id = new_backup_id(utcnow())
            try:
                return await _backup(BackupRun(runtime, repo, params, key, p, client, timings, progress, backup_id,
                                               cleaned))
            except BaseException:
                # Failed or cancelled before its manifest: remove what this run wrote, now rather than
                # at the next run (which would also do it, should this fail too).
                with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                    await discard(repo, backup_id)
                raise


async def _backup(run: BackupRun) -> BackupReport:
    runtime, repo, params, key, p, client = run.runtime, run.repo, run.params, run.key, run.probe, run.client
    timings, progress, backup_id, cleaned = run.timings, run.progress, run.backup_id, run.cleaned
    settings = runtime.settings
    started_at = utcnow()
    attachments = _database_attachments()
    mirror_artifacts: list[Artifact] = []
    attachments_result: AttachmentsResult
    mirror_report: MirrorReport | None = None

    async def mirror() -> None:
        nonlocal mirror_report
        source = runtime.attachments_location()
        if source is None:
            return
        mirror_report = await mirror_attachments(source, repo, backup_id, progress)

    dump_clock = time.monotonic()
    async with task_group() as tg:
        # The mirror runs beside the dump: the two describe the same moment as closely as possible.
        tg.start_soon(mirror)
        job = DumpJob(runtime, repo, backup_id, params.format, params.compression, key, client, progress)
        facts, outcome, lsn, snapshot_at = await gather_and_dump(job, p)
        timings["dump"] = round(time.monotonic() - dump_clock, 3)
    if mirror_report is not None:
        timings["mirror"] = round(mirror_report.seconds, 3)
        attachments, mirror_artifacts, attachments_result = _s3_attachments(runtime, mirror_report)
    else:
        attachments_result = AttachmentsResult(
            backend="database", objects=facts.row_counts.get("storage_objects", 0),
            summary="STORAGE_BACKEND=database: the attachment bytes are rows of storage_objects, inside the dump",
        )
        attachments = attachments.model_copy(update={"objects": attachments_result.objects})
    artifacts = outcome.artifacts + mirror_artifacts
    clock = time.monotonic()
    await progress(0, None, "verifying what was written")
    await require_verified(repo, backup_id, artifacts)
    timings["verify"] = round(time.monotonic() - clock, 3)
    qinfo, qwarning = await qdrant_info(runtime)
    warnings = facts.warnings + ([qwarning] if qwarning else [])
    if key is None:
        warnings.append(UNENCRYPTED)
    lacking = _lacking(facts, mirror_report)
    if lacking is not None:
        count, first = lacking
        attachments = attachments.model_copy(update={"lacking": count, "lacking_keys": first})
        if count:
            where = f"bucket {settings.storage_bucket}" if mirror_report is not None else "storage_objects"
            warnings.append(
                f"{count} live attachment(s) have no blob in {where}, so this backup lacks them (first: "
                f"{', '.join(first[:5])}): Engram cannot serve those files now either; restore them from an older "
                "backup or the bucket's versions, or have their owners upload them again"
            )
    master = MasterKeys.from_settings(settings).current
    master_fp = engram_crypto.key_fingerprint(master) if facts.canary.matches_configured_key and master else None
    manifest = Manifest(
        backup_id=backup_id, tool_version=TOOL_VERSION, started_at=started_at, finished_at=utcnow(),
        database=DatabaseInfo(
            name=settings.database_name, server_version=p.server_version, server_major=p.server_major,
            pg_dump_version=client.text, pg_dump_path=shlex.join(client.command), dump_format=params.format,
            wal_lsn_start=lsn,
            engram_schema_version=facts.engram_schema_version, oban_version=p.oban_version, role=p.role,
            row_counts=facts.row_counts, roles_referenced=facts.roles_referenced, size_bytes=facts.size_bytes,
            owner=facts.owner, object_owners=facts.object_owners, extensions=facts.extensions,
            row_security_tables=facts.row_security_tables,
            snapshot_at=snapshot_at, dump_artifacts=[a.name for a in outcome.artifacts],
            dump_bytes=outcome.dump_bytes,
        ),
        attachments=attachments, canary=facts.canary, qdrant=qinfo, oban=facts.oban,
        master_key_fingerprint=master_fp,
        backup_key_fingerprint=backup_crypto.fingerprint(key) if key is not None else None,
        artifacts=artifacts, total_bytes=sum(a.size for a in artifacts), durations=timings,
        verified=True, verified_at=utcnow(), warnings=warnings,
    )
    raw = manifest.model_dump_json(indent=2).encode()
    # Last write of the run: only now does the backup exist for every reader.
    size, digest = await repo.put_bytes(manifest_key(backup_id), raw)
    if await repo.verify(manifest_key(backup_id), size, digest) is not None:
        raise RecoveryError(f"the manifest of {backup_id} did not read back identically", "check the repository")
    retention = await apply_retention(repo, settings, prune=params.prune, confirm=params.confirm)
    ratio = outcome.stored_bytes / outcome.dump_bytes if outcome.dump_bytes else None
    throughput = outcome.dump_bytes / 2**20 / outcome.seconds if outcome.seconds else None
    summary = (
        f"backup {backup_id} written and verified: {outcome.dump_bytes / 2**20:,.1f} MiB dumped, "
        f"{manifest.total_bytes / 2**20:,.1f} MiB stored in {repo.location}"
    )
    if warnings:
        summary += f"; {len(warnings)} warning(s)"
    return BackupReport(
        verdict="warn" if warnings else "ok", summary=summary, dry_run=False, backup_id=backup_id,
        repository=repo.location, format=params.format, compression=params.compression, encrypted=key is not None,
        database_bytes=facts.size_bytes, dump_bytes=outcome.dump_bytes, stored_bytes=manifest.total_bytes,
        compression_ratio=round(ratio, 4) if ratio else None,
        throughput_mib_s=round(throughput, 1) if throughput else None, durations=timings, artifacts=artifacts,
        attachments=attachments_result, verified=True, warnings=warnings, cleaned_leftovers=cleaned,
        retention=retention,
    )


def _lacking(facts: DatabaseFacts, mirror: MirrorReport | None) -> tuple[int, list[str]] | None:
    """Live attachment rows whose blob is not in this backup: (count, first keys), or None when not measurable."""
    if mirror is None:
        return facts.lacking_in_database
    if facts.live_attachment_keys is None:
        return None
    missing = sorted(k for k in set(facts.live_attachment_keys) if k not in mirror.keys)
    return len(missing), missing[:LACKING_SHOWN]


def _database_attachments() -> AttachmentsInfo:
    return AttachmentsInfo(backend="database", in_database_dump=True)


def _s3_attachments(
    runtime: Runtime, report: MirrorReport
) -> tuple[AttachmentsInfo, list[Artifact], AttachmentsResult]:
    settings = runtime.settings
    artifacts = [
        Artifact(name=report.inventory_name, kind="attachments_inventory", size=report.inventory_size,
                 sha256=report.inventory_sha256)
    ] if report.inventory_name else []
    info = AttachmentsInfo(
        backend="s3", source_bucket=settings.storage_bucket, source_endpoint=settings.storage_endpoint,
        source_versioned=report.versioned, inventory=report.inventory_name, objects=report.objects,
        bytes=report.bytes, repository_prefix="attachments/", inventory_sha256=report.inventory_sha256,
        copied_objects=report.copied_objects, copied_bytes=report.copied_bytes,
    )
    result = AttachmentsResult(
        backend="s3", objects=report.objects, bytes=report.bytes, copied_objects=report.copied_objects,
        copied_bytes=report.copied_bytes, inventory=report.inventory_name, versioned=report.versioned,
        seconds=round(report.seconds, 3),
        summary=f"mirrored bucket {settings.storage_bucket}: {report.objects} objects, {report.copied_objects} "
        f"new or changed copied ({report.copied_bytes / 2**20:,.1f} MiB)"
        + (f", {report.recopied_objects} of them copied again because the repository's copy could no longer be "
           "trusted (changed since it was written, or found bad by a verification)" if report.recopied_objects else ""),
    )  # fmt: skip
    return info, artifacts, result


async def _dry_run(
    runtime: Runtime, repo: Repository, params: BackupRequest, encrypted: bool, timings: dict[str, float]
) -> BackupReport:
    from ..progress import silent

    state = await scan(repo)  # proves the repository is reachable and readable, writes nothing
    async with runtime.pool.acquire() as conn:
        size = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
    attachments = AttachmentsResult(
        backend="database", summary="STORAGE_BACKEND=database: the attachments would be inside the dump"
    )
    source = runtime.attachments_location()
    if source is not None:
        report = await mirror_attachments(source, repo, "dry-run", silent, MirrorOptions(dry_run=True))
        attachments = AttachmentsResult(
            backend="s3", objects=report.objects, bytes=report.bytes, copied_objects=report.copied_objects,
            copied_bytes=report.copied_bytes, versioned=report.versioned, seconds=round(report.seconds, 3),
            summary=f"would mirror bucket {runtime.settings.storage_bucket}: {report.objects} objects, "
            f"{report.copied_objects} new or changed ({report.copied_bytes / 2**20:,.1f} MiB) to copy",
        )
    retention = await apply_retention(repo, runtime.settings, prune=params.prune, confirm=False)
    summary = (
        f"dry run: would dump database {runtime.settings.database_name} ({size / 2**20:,.1f} MiB on disk) as "
        f"{params.format}, {params.compression}{', encrypted' if encrypted else ''}, into {repo.location}; "
        f"{attachments.summary}"
    )
    if state.incomplete:
        summary += f"; would delete {len(state.incomplete)} leftover folder(s) of interrupted runs"
    warnings = [] if encrypted else [UNENCRYPTED]
    return BackupReport(
        verdict="warn" if warnings else "ok", warnings=warnings, summary=summary, dry_run=True, backup_id=None,
        repository=repo.location,
        format=params.format, compression=params.compression, encrypted=encrypted, database_bytes=size,
        durations=timings, attachments=attachments, retention=retention,
    )
