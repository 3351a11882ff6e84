"""Point-in-time recovery (`recovery_point="at:<ISO time>"`): the engine plan_restore, restore_drill and
run_restore share.

Barman (core/stores/barman.py) holds base backups and the WAL streamed since; a recovery
to a time is Barman's `recover --target-time` of the newest base backup that ended by
then, into a NEW data directory, served by the bundled PostgreSQL 18
(core/stores/pgserver.py) until replay reaches the target and the server promotes.

* `survey`: read-only (bar `barman archive-wal`, which files the segments Barman already
  received): the window, refusal of a time outside it, the base backup and the WAL to replay.
* `recover` then `serve`: the recovery and the server on it; the drill times each step.
* `attachments_as_of`: the attachments the restored rows reference, in the bucket as it was at
  that time (object versions), for a versioned bucket.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field

from ..errors import ConfigurationError
from ..runtime import Runtime
from ..settings import Settings
from ..stores import pgserver, postgres
from ..stores.barman import Barman
from ..stores.barman_catalog import ArchiveCatalog, BaseBackup, RestorableWindow
from ..stores.pgclient.versions import bundled_bindir
from . import drill


class PitrSurvey(BaseModel):
    """What a recovery to `target_time` will use, read from Barman's archive before anything is restored."""

    target_time: datetime
    server: str = Field(description="Barman's name for the PostgreSQL server (ENGRAM_RECOVERY_BARMAN_SERVER).")
    window: RestorableWindow
    base_backup: BaseBackup = Field(description="The newest base backup that ended at or before the target time.")
    wal_first: str | None = Field(description="The first WAL segment replayed (the base backup's own).")
    wal_last: str | None = Field(description="The segment holding the first commit after the target time.")
    wal_segments: int = Field(description="Segments Barman restores for replay.")
    wal_bytes: int = Field(description="Their size in Barman's archive (compressed).")
    newest_wal: str | None
    replay_seconds_of_writes: float = Field(description="From the base backup's end to the target: writes replayed.")

    @property
    def premises_sha256(self) -> str:
        """What a plan binds: the base backup, the target and the archive's end (a new segment is a new plan)."""
        canonical = json.dumps({"backup": self.base_backup.backup_id, "target": self.target_time.isoformat(),
                                "newest_wal": self.newest_wal, "window_end": self.window.end.isoformat()},
                               sort_keys=True)  # fmt: skip
        return hashlib.sha256(canonical.encode()).hexdigest()


def window_text(window: RestorableWindow) -> str:
    end = window.end.isoformat() + ("" if window.end_is_exact else " (approximate: the newest segment's arrival)")
    return f"{window.start.isoformat()} to {end}"


def choose(catalog: ArchiveCatalog, moment: datetime, server: str) -> PitrSurvey:
    """Refuse a time outside the restorable window (naming it), else the base backup and the WAL to replay."""
    window = catalog.window
    if window is None:
        backups = sum(b.usable for b in catalog.backups)
        cause = ("Barman holds no usable base backup" if not backups else
                 "the archive has a gap after every base backup" if not catalog.replayable else
                 "no commit was archived since the oldest base backup ended")  # fmt: skip
        raise ConfigurationError(f"no time can be recovered from Barman's archive for server {server!r}: {cause}",
                                 f"take a base backup (`barman backup --wait {server}`) and let a write be archived;"
                                 " backup_status's archive check shows the window")  # fmt: skip
    if not window.contains(moment):
        where = "before the oldest base backup ended" if moment < window.start else "past the newest archived commit"
        raise ConfigurationError(f"at:{moment.isoformat()} is {where}: the restorable window is "
                                 f"{window_text(window)}",
                                 "choose a time inside the window (a time past its end has no WAL to replay yet: "
                                 "wait for the next segment, or `barman switch-wal --archive`)")  # fmt: skip
    backup = catalog.base_backup_for(moment)
    assert backup is not None and backup.end_time is not None  # the window starts at the oldest one's end
    wal = catalog.wal_to_replay(backup, moment)
    return PitrSurvey(
        target_time=moment, server=server, window=window, base_backup=backup,
        wal_first=wal[0].name if wal else backup.begin_wal, wal_last=wal[-1].name if wal else None,
        wal_segments=len(wal), wal_bytes=sum(s.size_bytes for s in wal),
        newest_wal=catalog.newest_wal.name if catalog.newest_wal else None,
        replay_seconds_of_writes=round((moment - backup.end_time).total_seconds(), 3),
    )  # fmt: skip


async def survey(barman: Barman, moment: datetime) -> PitrSurvey:
    """File what Barman received (`archive-wal`, as its cron would within the minute), then read and choose."""
    await barman.archive_wal()
    return choose(await barman.catalog(), moment, barman.command.server)


async def recover(barman: Barman, plan: PitrSurvey, datadir: Path) -> None:
    """Barman's recovery of the chosen backup to the target time into `datadir`, which must not exist."""
    await barman.recover(plan.base_backup.backup_id, datadir, target_time=plan.target_time)


@dataclass(frozen=True)
class Served:
    server: pgserver.ScratchServer
    dsn: str  # DATABASE_URL's credentials and database on the scratch server (it has the source's roles)
    last_replayed: datetime | None  # the newest transaction replayed: at or before the target


async def serve(root: Path, datadir: Path, dsn: str, *, limit: float = 3600) -> Served:
    """Start the bundled server on the recovered directory and wait for replay to reach the target and promote.

    The caller stops it (`server.stop()`, then removes `root`); when this raises, it is already stopped.
    """
    server = await pgserver.start(root, datadir, limit=limit)
    scratch = pgserver.at_port(dsn, server.port)
    try:
        await server.wait_promoted(scratch, limit)
        async with postgres.connection(scratch, database="postgres") as conn:
            last: datetime | None = await conn.fetchval("SELECT pg_last_xact_replay_timestamp()")
    except BaseException:
        await server.stop()
        raise
    return Served(server, scratch, last)


def commands(settings: Settings, plan: PitrSurvey, datadir: str) -> list[list[str]]:
    """The shell commands of a recovery, in order, as plan_restore prints them."""
    barman = Barman.from_settings(settings).command
    recover_argv = barman.recover(plan.base_backup.backup_id, datadir, target_time=plan.target_time)
    options = "-p <free port> " + " ".join(f"-c {s}" for s in pgserver.OVERRIDES)
    ctl = f"{bundled_bindir() or '<PostgreSQL 18 bin>'}/pg_ctl"
    return [
        [shlex.join(barman.archive_wal())],
        [shlex.join(recover_argv)],
        [
            f"chown -R postgres {shlex.quote(datadir)} && chmod 0700 {shlex.quote(datadir)}   # only when Barman ran "
            "as another OS user than the server",
            f"runuser -u postgres -- {shlex.quote(ctl)} -D {shlex.quote(datadir)} -l {shlex.quote(datadir)}/"
            f"{pgserver.LOG_NAME} -w -o {shlex.quote(options)} start",
        ],
        [
            "psql 'postgresql://<DATABASE_URL user>@127.0.0.1:<port>/postgres' -Atc 'SELECT pg_is_in_recovery()'   "
            "# repeat until it prints f: replay reached the target and the server promoted"
        ],
    ]


async def count_rows(conn: postgres.Connection) -> dict[str, int]:
    tables = [r["t"] for r in await conn.fetch(
        "SELECT c.relname AS t FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1")]  # fmt: skip
    return {t: int(await conn.fetchval(f"SELECT count(*) FROM {postgres.quote_ident(t)}")) for t in tables}


async def prove_counts(conn: postgres.Connection, plan: PitrSurvey) -> drill.Proof:
    """Row counts as of the target. A dump's manifest counts its own snapshot, not this moment: no reference
    exists to compare with, so the counts are reported (they show what the recovery holds) and pass."""
    counts = await count_rows(conn)
    return drill.Proof("row_counts", True, f"{len(counts)} table(s) counted as of {plan.target_time.isoformat()} "
                       f"({sum(counts.values())} rows); no reference exists for a point in time (a dump's manifest "
                       "counts its own snapshot)", {"counts": counts}, code="no_reference")  # fmt: skip


LIVE_ATTACHMENTS = "FROM attachments a WHERE a.deleted_at IS NULL AND a.storage_key IS NOT NULL"


async def attachments_as_of(runtime: Runtime, conn: postgres.Connection, keys: drill.Keys, moment: datetime,
                            sample: int) -> drill.Proof:  # fmt: skip
    """The attachments of the restored rows as they were at `moment`.

    With the database backend their blobs are rows, recovered with the rest. With S3, a
    versioned bucket still holds each object's version of that time: every live attachment
    row must find one, and a sample decrypts and matches its content hash. An unversioned
    bucket holds only today's objects: said, and the rows checked against those.
    """
    if runtime.settings.storage_backend == "database":
        return await drill.prove_attachments_in_db(conn, keys, sample)
    location = runtime.attachments_location()
    if location is None:
        return drill.Proof("attachments", False, "STORAGE_BACKEND=s3 but the bucket's credentials are not set",
                           code="not_configured")  # fmt: skip
    from ..stores import s3

    wanted = [str(r["k"]) for r in await conn.fetch(f"SELECT a.storage_key AS k {LIVE_ATTACHMENTS}")]
    bucket = location.bucket
    try:
        async with s3.client(location) as client:
            if await s3.versioning_status(client, bucket) == "Disabled":
                current = {o.key async for o in s3.list_objects(client, bucket)}
                absent = sorted(k for k in wanted if k not in current)
                return drill.Proof(
                    "attachments", True, f"the bucket {bucket} is not versioned: attachments as of "
                    f"{moment.isoformat()} cannot be read back, only today's objects; of {len(wanted)} live "
                    f"attachment row(s) restored, {len(absent)} have no object in the bucket now",
                    {"versioned": False, "rows": len(wanted), "absent_now": absent[:20]}, code="bucket_not_versioned",
                )  # fmt: skip
            versions = await s3.versions_as_of(client, bucket, moment)
            lacking = sorted(k for k in wanted if k not in versions)
            rows = await conn.fetch(
                "SELECT a.id::text AS id, a.user_id::text AS user_id, a.dek_version, a.content_nonce AS nonce, "
                "a.content_hash, a.storage_key, u.encrypted_dek FROM attachments a JOIN users u ON u.id = a.user_id "
                "WHERE a.deleted_at IS NULL AND a.content_nonce IS NOT NULL AND a.storage_key = ANY($2::text[]) "
                "ORDER BY random() LIMIT $1", sample, [k for k in wanted if k in versions],
            )  # fmt: skip
            pairs = [(r, await s3.get_version(client, bucket, r["storage_key"], versions[r["storage_key"]]))
                     for r in rows]  # fmt: skip
    except s3.S3_ERRORS as exc:
        raise s3.translate(exc, "read the attachments' object versions", location) from exc
    proof = drill._attachment_proof(keys, pairs)  # the dump drill's check: decrypt, content hash
    proof.details |= {"versioned": True, "rows": len(wanted), "lacking": len(lacking), "lacking_keys": lacking[:20]}
    if lacking:
        proof.ok, proof.code = False, "lacking_versions"
        proof.summary = (
            f"{len(lacking)} of {len(wanted)} live attachment(s) had no version in {bucket} at "
            f"{moment.isoformat()} (e.g. {', '.join(lacking[:3])}); " + proof.summary
        )
    else:
        proof.summary += f"; all {len(wanted)} live attachment(s) have their object's version as of that time"
    return proof
