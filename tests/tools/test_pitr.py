"""Point-in-time recovery through plan_restore and restore_drill (`recovery_point="at:<ISO time>"`), on PostgreSQL 18
with Barman streaming: a seeded Engram database, a base backup, two marked writes; a drill to a time between
them shows the first and not the second and passes the Engram proofs; a time outside the window is refused
with the window named; the plan gives the window and the steps without recovering anything."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import archiving_support
import pytest
from archiving_support import archive_cluster, backup_under_writes, receiving, streaming_barman, write_two_marks
from mcp import Client
from support import EngramDB, engram_env, make_engram_db

from engram_recovery.core.errors import ConfigurationError, RecoveryError
from engram_recovery.core.progress import silent
from engram_recovery.core.restore import pitr
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.server.app import build_server
from engram_recovery.tools.plan_restore import PlanRestoreInput, PlanRestoreResult, plan_restore
from engram_recovery.tools.restore_drill import RestoreDrillInput, RestoreDrillResult, restore_drill


@dataclass(frozen=True)
class Archived(archiving_support.Archived):
    second: datetime  # the second mark's commit: the archive's newest


@pytest.fixture(scope="module")
async def archived(master_key: bytes, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Archived]:
    # track_commit_timestamp: the second mark's commit time; autovacuum off: no commit after it.
    with archive_cluster("archive_timeout=60", "track_commit_timestamp=on", "autovacuum=off") as archive:
        config, barman = await streaming_barman(archive, tmp_path_factory.mktemp("barman"))
        async for db in make_engram_db(archive.url, master_key):
            async with receiving(barman):
                async with backup_under_writes(barman, archive.url) as backup:
                    between, second = await write_two_marks(db.dsn, "pitr_marks")
            yield Archived(db, config, barman, backup, between, second)


def env_of(archived: Archived, tmp_path: Path) -> dict[str, str]:
    return engram_env(archived.db, tmp_path, ENGRAM_RECOVERY_BARMAN_CONFIG=str(archived.config),
                      ENGRAM_RECOVERY_BARMAN_SERVER="engram")  # fmt: skip


async def drill(env: dict[str, str], point: str) -> RestoreDrillResult:
    runtime = Runtime(load_settings(environ=env))
    try:
        return await restore_drill(runtime, RestoreDrillInput(recovery_point=point, sample_notes=20), silent)
    finally:
        await runtime.aclose()


async def plan(env: dict[str, str], point: str, target: str | None = None) -> PlanRestoreResult:
    runtime = Runtime(load_settings(environ=env))
    try:
        return await plan_restore(runtime, PlanRestoreInput(recovery_point=point, target_database=target, work_dir=str(
            Path(env["ENGRAM_RECOVERY_REPOSITORY"]).parent / "work")), silent)  # fmt: skip
    finally:
        await runtime.aclose()


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_drill_to_a_time_between_two_marked_writes_shows_the_first_only_and_the_engram_proofs_pass(
    archived: Archived, tmp_path: Path
) -> None:
    result = await drill(env_of(archived, tmp_path), f"at:{archived.between.isoformat()}")
    steps = {s.name: s for s in result.steps}
    assert result.verdict == "ok", result.summary
    assert [s.name for s in result.steps] == ["survey", "recover", "replay", "prove_canary", "prove_row_counts",
                                              "prove_notes", "prove_attachments", "remove_server"]  # fmt: skip
    # The recovered server holds the first mark and not the second: replay stopped at the time asked.
    counts: dict[str, Any] = steps["prove_row_counts"].details["counts"]
    assert counts["pitr_marks"] == 1
    assert counts["notes"] == archived.db.report.counts["notes"] and steps["prove_row_counts"].code == "no_reference"
    assert steps["prove_canary"].code == "ok" and result.key_verdict == "ok"
    assert steps["prove_notes"].ok and steps["prove_notes"].details["sampled"] == 20
    assert steps["prove_attachments"].ok and steps["prove_attachments"].details["sampled"] > 0
    assert archived.backup.backup_id in steps["survey"].summary
    # Replay went up to the last transaction at or before the time (a steady-writes tick), never past it.
    replayed = datetime.fromisoformat(steps["replay"].summary.split("transaction of ")[1].split(" (target")[0])
    assert archived.between - timedelta(seconds=1) < replayed <= archived.between
    # The PITR RTO: recover + replay + proofs, recorded like the dump drill's.
    rto = sum(steps[n].seconds for n in ("recover", "replay", "prove_canary", "prove_row_counts", "prove_notes",
                                         "prove_attachments"))  # fmt: skip
    assert result.rto_seconds is not None and abs(result.rto_seconds - rto) < 0.01 and result.rto_seconds > 0
    assert result.backup_id == f"pitr-{archived.backup.backup_id}" and result.scratch_dropped
    assert result.scratch_database is not None and not Path(result.scratch_database).parent.exists()
    assert result.record is not None
    record = json.loads((tmp_path / "repo" / result.record).read_bytes())
    assert record["ok"] and record["rto_seconds"] == result.rto_seconds and record["backup_id"] == result.backup_id


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_time_outside_the_window_or_without_a_zone_is_refused_with_the_window_named(
    archived: Archived, tmp_path: Path
) -> None:
    env = env_of(archived, tmp_path)
    past = archived.second + timedelta(minutes=5)
    for call in (drill, plan):
        with pytest.raises(ConfigurationError) as refused:
            await call(env, f"at:{past.isoformat()}")
        assert "past the newest archived commit: the restorable window is" in refused.value.message
        assert archived.second.isoformat() in refused.value.message  # the window's end, exact
        assert "choose a time inside the window" in refused.value.hint
    assert archived.backup.end_time is not None
    with pytest.raises(ConfigurationError, match="before the oldest base backup ended") as early:
        await plan(env, f"at:{(archived.backup.end_time - timedelta(seconds=1)).isoformat()}")
    assert archived.backup.end_time.isoformat() in early.value.message  # the window's start
    with pytest.raises(ConfigurationError, match="has no time zone") as naive:
        await drill(env, f"at:{archived.between.replace(tzinfo=None).isoformat()}")
    assert "at:" in naive.value.hint and "Z" in naive.value.hint
    # Nothing was recovered: no drill record was written.
    assert not (tmp_path / "repo" / "drills").exists()


@pytest.mark.anyio
@pytest.mark.slow
async def test_plan_restore_at_a_time_gives_the_window_the_base_backup_and_the_steps_without_recovering(
    archived: Archived, tmp_path: Path
) -> None:
    env = env_of(archived, tmp_path)
    moment = archived.between
    result = await plan(env, f"at:{moment.isoformat()}", "engram_pitr_planned")
    assert result.verdict == "ok" and result.executable, result.summary
    pitr = result.point_in_time
    assert pitr is not None and pitr.base_backup.backup_id == archived.backup.backup_id
    assert pitr.window.end == archived.second and pitr.window.end_is_exact
    assert pitr.window.start == archived.backup.end_time and pitr.target_time == moment
    assert pitr.wal_segments >= 1 and pitr.wal_first == archived.backup.begin_wal
    statuses = {c.name: c.status for c in result.checks}
    assert statuses == {"window": "ok", "base_backup": "ok", "wal": "ok", "server": "ok", "master_key": "ok",
                        "target": "ok", "target_server": "ok"}  # fmt: skip
    assert next(c for c in result.checks if c.name == "master_key").code == "ok"  # the live canary opens
    assert [s.id for s in result.steps] == ["archive_wal", "recover", "start_server", "wait_for_promotion", "prove",
                                            "restore"]  # fmt: skip
    recover = result.steps[1].commands[0]
    assert f"--target-time={moment.isoformat()}" in recover and archived.backup.backup_id in recover
    assert str(archived.config) in recover and "--target-action=promote" in recover
    assert "pg_ctl" in result.steps[2].commands[1] and "archive_mode=off" in result.steps[2].commands[1]
    assert f"recovery_point=at:{moment.isoformat()}" in result.steps[4].commands[0]
    assert result.recovery_point.backup_id == archived.backup.backup_id
    # The token binds the target run_restore moves the recovered database into, and the time.
    assert result.premises.target_state == "absent" and result.plan_token.startswith("ptk2.")
    assert result.premises.point_in_time == moment and result.premises.target_database == "engram_pitr_planned"
    assert "run_restore" in result.steps[5].commands[0]
    # Into the live (non-empty) database only by choice, as for a dump.
    live = await plan(env, f"at:{moment.isoformat()}")
    assert not live.executable and next(c for c in live.checks if c.name == "target").code == "target_not_empty"
    # Read-only: nothing was recovered into the work directory.
    assert not (tmp_path / "work").exists()


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_recovery_that_cannot_reach_its_target_fails_with_the_server_log_and_leaves_no_server(
    archived: Archived, tmp_path: Path
) -> None:
    # What the window's refusal prevents, forced past it: Barman accepts the recovery, PostgreSQL will not open.
    within = pitr.choose(await archived.barman.catalog(), archived.between, "engram")
    beyond = within.model_copy(update={"target_time": archived.second + timedelta(minutes=5)})
    root = Path(tempfile.mkdtemp(prefix="engram-pitr-test-"))
    try:
        await pitr.recover(archived.barman, beyond, root / "pgdata")
        with pytest.raises(RecoveryError) as failed:
            await pitr.serve(root, root / "pgdata", archived.db.dsn, limit=60)
        assert "recovery ended before configured recovery target was reached" in failed.value.message
        assert "window" in failed.value.hint
        assert not (root / "pgdata" / "postmaster.pid").exists()  # nothing left running
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.anyio
async def test_through_mcp_a_naive_time_or_no_barman_is_the_same_error_result_for_both_tools(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path)  # no ENGRAM_RECOVERY_BARMAN_CONFIG
    async with Client(build_server(load_settings(environ=env))) as client:
        for point, cause, fix in (
            ("at:2026-11-25T10:00:00", "has no time zone", "at:2026-11-25T10:00:00Z"),
            ("at:2026-11-25T10:00:00Z", "no Barman configuration is set", "ENGRAM_RECOVERY_BARMAN_CONFIG"),
        ):
            texts = []
            for tool in ("plan_restore", "restore_drill"):
                result = await client.call_tool(tool, {"recovery_point": point})
                assert result.is_error and result.structured_content is None
                texts.append(str(getattr(result.content[0], "text", "")))
            cause_line, fix_line = texts[0].splitlines()[:2]
            assert texts[0] == texts[1] and cause in cause_line and fix_line.startswith("Fix: ") and fix in fix_line
