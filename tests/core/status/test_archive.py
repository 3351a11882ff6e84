"""backup_status's archive check against PostgreSQL 18 and a real Barman streaming archive: healthy, then the
RPO past its threshold, the receiver stopped, a segment lost; and every verdict, judged without Barman."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from archiving_support import archive_cluster, backup_under_writes, receiving, streaming_barman

from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.core.status import CHECK_TIMEOUT
from engram_recovery.core.status.archive import ArchiveStatus, check_archive, judge
from engram_recovery.core.status.common import Check, StatusContext
from engram_recovery.core.stores.barman_catalog import ArchiveCatalog, RestorableWindow, WalGap

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


async def archive_check(url: str, config: Path, **extra: str) -> tuple[Check, ArchiveStatus]:
    env = {"DATABASE_URL": url, "PATH": os.environ["PATH"], "ENGRAM_RECOVERY_BARMAN_CONFIG": str(config)} | extra
    async with Runtime(load_settings(environ=env)) as runtime:
        ctx = StatusContext(runtime, deep=False)
        with anyio.fail_after(CHECK_TIMEOUT):  # bounded like every check
            check = await check_archive(ctx)
    report = ctx.reports["archive"]
    assert isinstance(report, ArchiveStatus)
    return check, report


@pytest.mark.anyio
@pytest.mark.slow
async def test_the_archive_check_reports_window_and_rpo_then_fails_on_a_stale_archive_a_stopped_receiver_and_a_gap(
    tmp_path: Path,
) -> None:
    with archive_cluster("archive_timeout=60", "autovacuum=off") as archive:
        config, barman = await streaming_barman(archive, tmp_path / "barman")
        async with receiving(barman):
            async with backup_under_writes(barman, archive.url) as backup:
                conn = await asyncpg.connect(archive.url)
                try:
                    await conn.execute("CREATE TABLE marks (n int PRIMARY KEY)")
                    await conn.execute("INSERT INTO marks (n) VALUES (1)")
                finally:
                    await conn.close()
                # Three segments after the backup's (these two and the block's last switch), one of which
                # goes missing at the end.
                for _ in range(2):
                    await barman.switch_wal(archive_timeout=30)
            healthy, report = await archive_check(archive.url, config)
            assert healthy.status == "ok", healthy.summary
            assert healthy.summary.startswith(f"archive healthy: newest WAL {report.newest_wal}")
            assert report.configured and report.base_backups == 1 and report.gaps == [] and report.barman_failed == {}
            assert report.window is not None and report.window.end_is_exact
            assert backup.end_time is not None and report.window.start == backup.end_time
            assert report.last_commit == report.window.end
            assert report.rpo_seconds is not None and 0 < report.rpo_seconds < 60
            assert report.newest_wal_age_seconds is not None and 0 <= report.newest_wal_age_seconds < 60
            assert report.source is not None and report.source.slot == "barman" and report.source.slot_active
            assert report.source.receiver_state == "streaming" and report.source.archive_mode == "off"
            assert healthy.details["window"] == report.window.model_dump(mode="json")

            # A stale archive: the newest archived commit is older than the threshold allows.
            stale, _ = await archive_check(archive.url, config, ENGRAM_RECOVERY_MAX_RPO_SECONDS="0.01")
            assert stale.status == "fail" and "exceeds ENGRAM_RECOVERY_MAX_RPO_SECONDS=0.01" in stale.summary
            assert "fix: check that Barman receives WAL" in stale.summary
        stopped, report = await archive_check(archive.url, config)
        assert stopped.status == "fail" and stopped.summary.startswith("archive broken: ")
        assert "receive_wal_running FAILED" in stopped.summary and f"-c {config} cron" in stopped.summary
        assert "receive_wal_running" in report.barman_failed
        assert report.source is not None and report.source.slot_found and report.source.slot_active is False
        # What was archived before the receiver stopped is still restorable: the window is still reported.
        assert report.window is not None

        # A gap: a segment between the backup and the newest one lost from the archive (its file and its line in
        # Barman's WAL catalog), as when a slot lost WAL. Replay cannot cross it: no time can be targeted.
        server = await barman.run_json(barman.command.show_server())
        lost, after_it = lose_the_last_but_one_segment(server)
        gapped, report = await archive_check(archive.url, config)
        assert gapped.status == "fail" and "no restorable window (a gap in the WAL after every base backup)" \
            in gapped.summary and "backup --wait engram" in gapped.summary  # fmt: skip
        assert [(g.missing, g.before) for g in report.gaps] == [(1, after_it)] and lost < after_it
        assert report.window is None


def lose_the_last_but_one_segment(server: dict[str, Any]) -> tuple[str, str]:
    """Delete the last but one archived segment and its line in Barman's WAL catalog; it and the newest's names."""
    xlogdb = Path(str(server.get("xlogdb_directory") or server["wals_directory"])) / "engram-xlog.db"
    lines = xlogdb.read_text().splitlines(keepends=True)
    names = [line.split("\t")[0] for line in lines]
    segments = [name for name in names if len(name) == 24 and "." not in name]
    lines.pop(names.index(segments[-2]))
    xlogdb.write_text("".join(lines))
    for path in Path(str(server["wals_directory"])).rglob(f"{segments[-2]}*"):
        path.unlink()
    return segments[-2], segments[-1]


def _status(**update: object) -> tuple[ArchiveStatus, ArchiveCatalog]:
    window = RestorableWindow(start=T0, end=T0 + timedelta(hours=1), end_is_exact=True)
    status = ArchiveStatus(configured=True, server="engram", newest_wal="0" * 24, rpo_seconds=5, max_rpo_seconds=300,
                           window=window, base_backups=1)  # fmt: skip
    status = status.model_copy(update=update)
    return status, ArchiveCatalog(server="engram", backups=[], newest_wal=None)


def test_gaps_degrade_the_archive_while_a_window_remains_and_break_it_when_none_does() -> None:
    gap = WalGap(after="000000010000000000000004", before="000000010000000000000007", missing=2)
    assert judge(*_status(), "/etc/barman.conf") == ("ok", [])
    verdict, reasons = judge(*_status(gaps=[gap]), "/etc/barman.conf")
    assert verdict == "warn" and reasons[0].startswith("2 WAL segment(s) missing (after 000000010000000000000004)")
    verdict, reasons = judge(*_status(gaps=[gap], window=None), "/etc/barman.conf")
    assert verdict == "fail" and "no restorable window (a gap in the WAL after every base backup)" in reasons[0]
    assert "backup --wait engram" in reasons[0]
    verdict, reasons = judge(*_status(base_backups=0, window=None), "/etc/barman.conf")
    assert verdict == "fail" and reasons == ["no usable base backup; fix: `barman -c /etc/barman.conf backup --wait "
                                             "engram`"]  # fmt: skip
    verdict, reasons = judge(*_status(window=None), "/etc/barman.conf")
    assert verdict == "warn" and reasons[0].startswith("no commit archived since the oldest base backup ended")
    inexact = RestorableWindow(start=T0, end=T0, end_is_exact=False)
    assert judge(*_status(window=inexact), "/etc/barman.conf")[0] == "warn"
