"""Point-in-time recovery's pieces without Barman: `at:` parsing, the window's refusals and the WAL chosen, the
scratch server's connection string, and attachments as of a time from a real versioned SeaweedFS bucket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import asyncpg
import pytest
from support import EngramDB, bucket_env, engram_env, make_engram_db, new_bucket

from engram_recovery.core.errors import ConfigurationError
from engram_recovery.core.repository.points import point_in_time, resolve
from engram_recovery.core.restore import drill, pitr
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores import s3
from engram_recovery.core.stores.barman_catalog import ArchiveCatalog, ArchivedWal, BaseBackup
from engram_recovery.core.stores.pgserver import at_port
from engram_recovery.core.stores.s3 import S3Location
from engram_recovery.testbed.seaweedfs import SeaweedFS

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def test_at_takes_an_iso_time_with_its_zone_and_refuses_a_naive_one_with_the_fix() -> None:
    assert point_in_time("at:2026-11-25T09:00:00Z") == T0
    assert point_in_time(" at:2026-11-25T10:00:00+01:00 ") == T0
    assert point_in_time("latest") is None and point_in_time("before:2026-11-25T09:00:00Z") is None
    with pytest.raises(ConfigurationError) as naive:
        point_in_time("at:2026-11-25T09:00:00")
    assert "no time zone" in naive.value.message and "at:2026-11-25T09:00:00Z" in naive.value.hint
    with pytest.raises(ConfigurationError, match="does not hold an ISO time"):
        point_in_time("at:yesterday")


@pytest.mark.anyio
async def test_a_point_in_time_is_not_a_repository_backup_and_says_where_it_goes() -> None:
    with pytest.raises(ConfigurationError) as refused:
        await resolve(None, "at:2026-11-25T09:00:00Z")  # type: ignore[arg-type]  # refused before any read
    assert "WAL archive" in refused.value.message and "restore_drill" in refused.value.hint


def _backup(backup_id: str, end: datetime, begin_wal: str) -> BaseBackup:
    return BaseBackup(backup_id=backup_id, status="DONE", begin_time=end - timedelta(minutes=1), end_time=end,
                      begin_wal=begin_wal, end_wal=begin_wal, begin_lsn="0/1", end_lsn="0/2", timeline=1,
                      size_bytes=1, server_version=180006)  # fmt: skip


def _catalog() -> ArchiveCatalog:
    names = [f"0000000100000000000000{n:02X}" for n in range(3, 10)]
    segments = [ArchivedWal(name=n, archived_at=T0 + timedelta(minutes=10 * i), size_bytes=100)
                for i, n in enumerate(names)]  # fmt: skip
    backups = [_backup("a", T0 - timedelta(minutes=5), names[0]), _backup("b", T0 + timedelta(minutes=25), names[3])]
    return ArchiveCatalog(server="engram", backups=backups, newest_wal=segments[-1], segments=segments,
                          last_commit=T0 + timedelta(minutes=55), commits_read=True)  # fmt: skip


def test_the_newest_backup_before_the_time_and_the_wal_up_to_the_segment_holding_it_are_chosen() -> None:
    catalog = _catalog()
    chosen = pitr.choose(catalog, T0 + timedelta(minutes=35), "engram")
    assert chosen.base_backup.backup_id == "b"
    # Backup b starts in segment 06 (archived at +30 min); 07 (+40 min) completes after the target and holds it.
    assert (chosen.wal_first, chosen.wal_last, chosen.wal_segments) == ("000000010000000000000006",
                                                                        "000000010000000000000007", 2)  # fmt: skip
    assert chosen.replay_seconds_of_writes == 600 and chosen.newest_wal == "000000010000000000000009"
    early = pitr.choose(catalog, T0 + timedelta(minutes=1), "engram")
    assert early.base_backup.backup_id == "a" and early.wal_first == "000000010000000000000003"
    # Another target, another archive end: another plan.
    assert chosen.premises_sha256 != early.premises_sha256


def test_a_time_outside_the_window_is_refused_naming_both_ends_and_no_window_says_why() -> None:
    catalog = _catalog()
    for moment, where in ((T0 + timedelta(minutes=56), "past the newest archived commit"),
                          (T0 - timedelta(minutes=6), "before the oldest base backup ended")):  # fmt: skip
        with pytest.raises(ConfigurationError) as refused:
            pitr.choose(catalog, moment, "engram")
        assert where in refused.value.message
        assert (f"the restorable window is {(T0 - timedelta(minutes=5)).isoformat()} to "
                f"{(T0 + timedelta(minutes=55)).isoformat()}") in refused.value.message  # fmt: skip
    inexact = catalog.model_copy(update={"last_commit": None, "commits_read": False})
    with pytest.raises(ConfigurationError, match="approximate"):
        pitr.choose(inexact, T0 + timedelta(hours=2), "engram")
    with pytest.raises(ConfigurationError, match="no usable base backup") as none:
        pitr.choose(catalog.model_copy(update={"backups": []}), T0, "engram")
    assert "barman backup --wait engram" in none.value.hint
    quiet = catalog.model_copy(update={"last_commit": None, "commits_read": True})
    with pytest.raises(ConfigurationError, match="no commit was archived"):
        pitr.choose(quiet, T0, "engram")


def test_the_scratch_server_is_reached_with_the_same_credentials_on_loopback() -> None:
    # The scratch server runs without TLS, on loopback: the ssl options are dropped, the others kept.
    assert at_port("postgresql://engram:p%40ss@db.internal:5432/engram?sslmode=require&application_name=x", 54321) \
        == "postgresql://engram:p%40ss@127.0.0.1:54321/engram?application_name=x"  # fmt: skip
    assert at_port("postgresql://engram@/engram?host=/var/run/postgresql&port=5433", 7) == \
        "postgresql://engram@127.0.0.1:7/engram"  # fmt: skip
    assert at_port("postgresql://postgres@127.0.0.1:5432/engram", 1, "postgres") == \
        "postgresql://postgres@127.0.0.1:1/postgres"  # fmt: skip


@pytest.fixture
async def s3_db(admin_dsn: str, master_key: bytes) -> AsyncIterator[EngramDB]:
    async for db in make_engram_db(admin_dsn, master_key, storage="s3", notes=10, attachments=6):
        yield db


async def _as_of(db: EngramDB, where: S3Location, tmp_path: Path, moment: datetime) -> drill.Proof:
    env = engram_env(db, tmp_path, **bucket_env(where))
    runtime = Runtime(load_settings(environ=env))
    conn = await asyncpg.connect(db.dsn)
    try:
        return await pitr.attachments_as_of(runtime, conn, drill.Keys(db.master_key), moment, 50)
    finally:
        await conn.close()
        await runtime.aclose()


@pytest.mark.anyio
async def test_attachments_as_of_a_time_come_from_the_versions_the_bucket_had_then(
    s3_db: EngramDB, weed: SeaweedFS, tmp_path: Path
) -> None:
    before = datetime.now(UTC) - timedelta(seconds=2)
    where = await new_bucket(weed, s3_db.report.attachment_objects, versioned=True)
    await anyio.sleep(1.2)  # S3 times are whole seconds
    moment = datetime.now(UTC)
    await anyio.sleep(1.2)
    # After the moment: one blob overwritten with garbage, another deleted. As of the moment both were good.
    (spoiled, _), (deleted, _) = s3_db.report.attachment_objects[:2]
    async with s3.client(where) as c:
        await c.put_object(Bucket=where.bucket, Key=spoiled, Body=b"not the attachment")
        await c.delete_object(Bucket=where.bucket, Key=deleted)
    proof = await _as_of(s3_db, where, tmp_path, moment)
    assert proof.ok, proof.summary
    assert proof.details["versioned"] and proof.details["lacking"] == 0 and proof.details["sampled"] >= 2
    assert "have their object's version as of that time" in proof.summary
    # Now: the spoiled version fails its content check (it is the newest), and the deleted one lacks a version.
    now = await _as_of(s3_db, where, tmp_path, datetime.now(UTC) + timedelta(seconds=1))
    assert not now.ok and now.details["lacking_keys"] == [deleted] and "failed" in now.details
    # Before any upload: every live attachment lacks its object.
    empty = await _as_of(s3_db, where, tmp_path, before)
    assert not empty.ok and empty.code == "lacking_versions" and empty.details["lacking"] == empty.details["rows"] > 0


@pytest.mark.anyio
async def test_an_unversioned_bucket_is_named_as_such(s3_db: EngramDB, weed: SeaweedFS, tmp_path: Path) -> None:
    where = await new_bucket(weed, s3_db.report.attachment_objects, versioned=False)
    proof = await _as_of(s3_db, where, tmp_path, datetime.now(UTC))
    assert proof.code == "bucket_not_versioned" and "is not versioned" in proof.summary
    assert proof.details["rows"] > 0 and proof.details["absent_now"] == []
