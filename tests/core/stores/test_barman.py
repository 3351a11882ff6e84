"""Barman, the PITR engine: argv built without running it, its JSON and WAL catalog read into typed models,
and a real base backup plus streamed WAL recovered to a moment between two marked writes on PostgreSQL 18."""

from __future__ import annotations

import itertools
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import asyncpg
import pytest
from archiving_support import (
    archive_cluster,
    backup_under_writes,
    barman_for,
    receiving,
    streaming_barman,
    write_two_marks,
)

from engram_recovery.core.errors import ConfigurationError, RecoveryError
from engram_recovery.core.settings import load_settings
from engram_recovery.core.stores.barman import Barman, BarmanCommand
from engram_recovery.core.stores.barman_catalog import (
    ArchiveCatalog,
    ArchivedWal,
    BaseBackup,
    WalGap,
    find_gaps,
    parse_backup,
    parse_waldump,
    parse_xlogdb,
)
from engram_recovery.testbed import cluster

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


CONFIGURED = BarmanCommand("/opt/barman", "engram", "/etc/barman.d/engram.conf")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (CONFIGURED.list_backups(), ["/opt/barman", "-c", "/etc/barman.d/engram.conf", "-f", "json", "list-backups",
                                     "engram"]),
        (CONFIGURED.show_backup("20261125T094619")[-3:], ["show-backup", "engram", "20261125T094619"]),
        (BarmanCommand("barman", "engram").check(), ["barman", "-f", "json", "check", "engram"]),
        (CONFIGURED.backup(wait_timeout=30)[-4:], ["backup", "--wait", "--wait-timeout=30", "engram"]),
        (CONFIGURED.receive_wal(stop=True)[-3:], ["receive-wal", "--stop", "engram"]),
    ],
    ids=["list-backups", "show-backup", "check without a configuration file", "backup", "receive-wal --stop"],
)  # fmt: skip
def test_argv_names_the_configuration_and_asks_for_json_where_it_is_read(argv: list[str], expected: list[str]) -> None:
    assert argv == expected


def test_recover_sends_the_target_time_with_its_offset_and_promotes() -> None:
    target = datetime(2026, 11, 25, 10, 46, 22, 235345, tzinfo=UTC) + timedelta()
    argv = BarmanCommand("barman", "engram").recover("20261125T094619", "/srv/restore", target_time=target)
    assert argv == ["barman", "recover", "--target-time=2026-11-25T10:46:22.235345+00:00", "--target-action=promote",
                    "engram", "20261125T094619", "/srv/restore"]  # fmt: skip
    with pytest.raises(ValueError, match="time zone"):
        BarmanCommand("barman", "engram").recover("x", "/srv/restore", target_time=target.replace(tzinfo=None))


def test_the_wal_catalog_lists_segments_in_wal_order_and_skips_history_and_backup_labels() -> None:
    text = ("000000010000000000000004\t16539\t1795599979.9\tgzip\tNone\n"
            "00000002.history\t42\t1795600500.0\tNone\tNone\n"
            "000000010000000000000005.00000028.backup\t300\t1795600600.0\tNone\tNone\n"
            "000000020000000000000005\t18223\t1795600400.5\tgzip\tNone\n"
            "000000010000000000000006\t16866\t1795600300.0\tgzip\tNone\n")  # fmt: skip
    segments = parse_xlogdb(text)
    assert [s.name for s in segments] == ["000000010000000000000004", "000000020000000000000005",
                                          "000000010000000000000006"]  # fmt: skip
    assert segments[-1].archived_at == datetime.fromtimestamp(1795600300.0, UTC) and segments[-1].size_bytes == 16866
    assert parse_xlogdb("") == []


def test_the_newest_commit_or_abort_is_read_from_pg_waldump() -> None:
    listing = (
        "rmgr: Transaction len (rec/tot): 34/34, tx: 754, lsn: 0/06000268, prev 0/06000220, "
        "desc: COMMIT 2026-11-25 09:46:23.745550 UTC\n"
        "rmgr: Transaction len (rec/tot): 34/34, tx: 755, lsn: 0/06000300, prev 0/06000268, "
        "desc: ABORT 2026-11-25 09:46:24 UTC\n"
        "rmgr: Transaction len (rec/tot): 501/501, tx: 753, lsn: 0/06000028, prev 0/05001440, "
        "desc: COMMIT 2026-11-25 09:46:20.716983 UTC; inval msgs: catcache 82\n"
    )
    assert parse_waldump(listing) == datetime(2026, 11, 25, 9, 46, 24, tzinfo=UTC)
    assert parse_waldump("pg_waldump: error: error in WAL record at 0/6000300") is None


def _backup(backup_id: str, end: datetime, status: str = "DONE") -> BaseBackup:
    return BaseBackup(backup_id=backup_id, status=status, begin_time=end - timedelta(minutes=5), end_time=end,
                      begin_wal="000000010000000000000004", end_wal="000000010000000000000004", begin_lsn="0/4000028",
                      end_lsn="0/5000000", timeline=1, size_bytes=1, server_version=180006)  # fmt: skip


def test_the_window_runs_from_the_oldest_usable_backup_to_the_newest_commit_and_picks_the_base_backup() -> None:
    catalog = ArchiveCatalog(
        server="engram",
        backups=[_backup("a", T0 - timedelta(days=2), "FAILED"), _backup("b", T0 - timedelta(days=1)),
                 _backup("c", T0)],
        newest_wal=ArchivedWal(name="000000010000000000000009", archived_at=T0 + timedelta(hours=3), size_bytes=1),
        last_commit=T0 + timedelta(hours=2), commits_read=True,
    )  # fmt: skip
    window = catalog.window
    assert window is not None and window.end_is_exact
    assert (window.start, window.end) == (T0 - timedelta(days=1), T0 + timedelta(hours=2))
    # Past the newest commit PostgreSQL would stop with "recovery ended before configured recovery target".
    assert not window.contains(T0 + timedelta(hours=2, seconds=1)) and not window.contains(T0 - timedelta(days=2))
    assert catalog.base_backup_for(T0 - timedelta(hours=1)) == catalog.backups[1]
    assert catalog.base_backup_for(T0 + timedelta(hours=1)) == catalog.backups[2]
    assert catalog.base_backup_for(T0 - timedelta(days=3)) is None
    assert catalog.rpo_seconds(T0 + timedelta(hours=2, seconds=42)) == 42
    unread = catalog.model_copy(update={"last_commit": None, "commits_read": False}).window
    assert unread is not None and not unread.end_is_exact and unread.end == T0 + timedelta(hours=3)
    assert catalog.model_copy(update={"last_commit": T0 - timedelta(days=3)}).window is None
    # The WAL since the oldest backup holds no commit: no time can be reached by replay.
    assert catalog.model_copy(update={"last_commit": None, "commits_read": True}).window is None
    assert ArchiveCatalog(server="engram", backups=[], newest_wal=None).window is None


def _wal(name: str) -> ArchivedWal:
    return ArchivedWal(name=name, archived_at=T0, size_bytes=1)


def test_missing_segments_are_gaps_across_logs_and_timelines_and_cut_the_window() -> None:
    names = ["0000000100000000000000FE", "0000000100000000000000FF", "000000010000000100000000",  # log 0 -> 1
             "000000010000000100000003",  # 01 and 02 missing
             "000000020000000100000004", "000000020000000100000005"]  # a promotion: timeline 2 goes on
    segments = [_wal(n) for n in names]
    assert find_gaps(segments, "0000000100000000000000FE") == [
        WalGap(after="000000010000000100000000", before="000000010000000100000003", missing=2)]
    assert find_gaps(segments, "000000010000000100000003") == []
    # 64 MiB segments: 64 per log, so 3F is followed by the next log's 00.
    assert find_gaps([_wal("00000001000000000000003F"), _wal("000000010000000100000000")],
                     "00000001000000000000003F", 64 << 20) == []  # fmt: skip

    before = _backup("before", T0).model_copy(update={"begin_wal": "0000000100000000000000FE"})
    after = _backup("after", T0 + timedelta(hours=1)).model_copy(update={"begin_wal": "000000020000000100000004"})
    catalog = ArchiveCatalog(server="engram", backups=[before, after], newest_wal=segments[-1],
                             last_commit=T0 + timedelta(hours=2), commits_read=True,
                             gaps=find_gaps(segments, "0000000100000000000000FE"))  # fmt: skip
    # Replay from the older backup would stop at the gap: the window starts at the backup after it.
    assert catalog.replayable == [after]
    assert catalog.window is not None and catalog.window.start == T0 + timedelta(hours=1)
    assert catalog.base_backup_for(T0 + timedelta(minutes=30)) is None
    assert catalog.model_copy(update={"backups": [before]}).window is None


def test_show_backup_json_reads_into_a_base_backup() -> None:
    shown = {"backup_id": "20261125T094619", "status": "DONE", "postgresql_version": 180006,
             "base_backup_information": {"begin_time": "2026-11-25 09:46:19.577646+00:00",
                                         "end_time": "2026-11-25 09:46:20.113188+00:00", "begin_wal": "A" * 24,
                                         "end_wal": "B" * 24, "begin_lsn": "0/4000028", "end_lsn": "0/5000000",
                                         "timeline": 1, "backup_size_bytes": 23054552}}  # fmt: skip
    backup = parse_backup(shown)
    assert backup.end_time == datetime(2026, 11, 25, 9, 46, 20, 113188, tzinfo=UTC)
    assert backup.usable and backup.size_bytes == 23054552 and backup.server_version == 180006
    # A backup that failed early has no end: it is listed, not usable, and does not break the catalog.
    failed = parse_backup({"backup_id": "20261125T101500", "status": "FAILED", "postgresql_version": None,
                           "base_backup_information": {"begin_time": None, "end_time": None, "begin_wal": None}})
    assert not failed.usable and failed.end_time is None
    assert failed.begin_time == datetime(2026, 11, 25, 10, 15, tzinfo=UTC)


async def _marks(url: str) -> list[int]:
    """The marks, read once the server has promoted (it answers earlier, while replay may not yet be at the target)."""
    conn = await asyncpg.connect(url)
    try:
        with anyio.fail_after(30):
            for _ in itertools.count():
                if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                    break
                await anyio.sleep(0.05)
        return [int(r["n"]) for r in await conn.fetch("SELECT n FROM marks ORDER BY n")]
    finally:
        await conn.close()


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_base_backup_plus_streamed_wal_recovers_to_a_time_between_two_marked_writes(tmp_path: Path) -> None:
    # Commit timestamps to compare the window's end with; no autovacuum commit after the second mark.
    with archive_cluster("archive_timeout=60", "track_commit_timestamp=on", "autovacuum=off") as archive:
        _config, barman = await streaming_barman(archive, tmp_path / "barman")
        async with receiving(barman):
            async with backup_under_writes(barman, archive.url) as backup:
                between, second = await write_two_marks(archive.url, "marks")
            checks = await barman.check()
            assert all(passed for passed, _hint in checks.values()), checks
            catalog = await barman.catalog()
        # With the receiver stopped, Barman's own check says so: a finding, not an error.
        assert (await barman.check())["receive_wal_running"][0] is False
        assert [b.backup_id for b in catalog.backups] == [backup.backup_id]
        assert backup.usable and backup.server_version == catalog.backups[0].server_version
        assert backup.end_time is not None and backup.end_wal is not None and backup.server_version is not None
        assert backup.server_version // 10000 == 18 and backup.begin_time <= backup.end_time < between
        window = catalog.window
        assert window is not None and window.contains(between) and catalog.base_backup_for(between) == backup
        # The second mark is the newest commit: the window ends exactly there, read from the WAL itself.
        assert window.end_is_exact and window.end == second and catalog.commits_read and catalog.gaps == []
        assert catalog.newest_wal is not None and catalog.newest_wal.name > backup.end_wal

        restored = archive.root / "restored"
        await barman.recover(backup.backup_id, restored, target_time=between)
        with pytest.raises(ConfigurationError, match="already exists"):
            await barman.recover(backup.backup_id, restored, target_time=between)
        with pytest.raises(RecoveryError) as early:
            await barman.recover(backup.backup_id, archive.root / "early", target_time=backup.begin_time)
        assert early.value.message.startswith("barman recover failed (exit code 1): The requested target time")
        assert "is before the backup end time" in early.value.message and "Starting" not in early.value.message
        cluster.adopt(restored)
        scratch = cluster.start(restored, fast=True)
        try:
            assert await _marks(scratch.admin_url) == [1]
        finally:
            scratch.stop()


@pytest.mark.anyio
async def test_barman_failures_carry_its_message_and_a_fix(tmp_path: Path) -> None:
    config = tmp_path / "barman.conf"
    config.write_text(f"[barman]\nbarman_home = {tmp_path}\nbarman_user = {__import__('getpass').getuser()}\n"
                      f"log_file = {tmp_path}/barman.log\n")  # fmt: skip
    with pytest.raises(RecoveryError) as failed:
        await barman_for(config).catalog()
    assert "barman list-backups failed" in failed.value.message and "engram" in failed.value.message
    assert "ENGRAM_RECOVERY_BARMAN_SERVER" in failed.value.hint


def test_settings_name_barman_its_configuration_and_server_and_none_is_refused_with_a_fix(tmp_path: Path) -> None:
    base = {"DATABASE_URL": "postgresql://postgres@127.0.0.1/engram", "PATH": os.environ["PATH"]}
    with pytest.raises(ConfigurationError) as missing:
        Barman.from_settings(load_settings(environ=base))
    assert "ENGRAM_RECOVERY_BARMAN_CONFIG" in missing.value.hint
    settings = load_settings(environ=base | {"ENGRAM_RECOVERY_BARMAN_CONFIG": "/etc/barman.conf",
                                             "ENGRAM_RECOVERY_BARMAN_SERVER": "engram-prod"})  # fmt: skip
    command = Barman.from_settings(settings).command
    assert command.check()[1:] == ["-c", "/etc/barman.conf", "-f", "json", "check", "engram-prod"]
    with pytest.raises(ConfigurationError, match="ENGRAM_RECOVERY_BARMAN_SERVER"):
        load_settings(environ=base | {"ENGRAM_RECOVERY_BARMAN_SERVER": "two words"})
    with pytest.raises(ConfigurationError, match="Barman was not found"):
        Barman.from_settings(load_settings(environ=base | {"ENGRAM_RECOVERY_BARMAN_CONFIG": "/etc/barman.conf",
                                                           "ENGRAM_RECOVERY_BARMAN": str(tmp_path / "x")}))  # fmt: skip
