"""restore_drill at a point in time (`at:<ISO time>`): Barman's recovery into a scratch data directory,
served by the bundled PostgreSQL 18, then the dump drill's Engram proofs, then stop and remove it all.

The PITR RTO is what an operator waits for before reading the restored data: Barman's
recovery, the server's replay to the target (start to promotion) and the proofs.
drill_run.py hands `at:` recovery points here and reports the result as any drill's;
the drill is recorded in the repository beside the dump drills (backup id `pitr-<Barman's id>`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from ..engram.schema_probe import probe
from ..errors import IntegrityError, RecoveryError, scrub
from ..progress import Progress
from ..repository import open_repository
from ..repository.layout import drill_record_key
from ..repository.records import DrillRecord, DrillStep
from ..runtime import Runtime
from ..stores import pgserver, postgres
from ..stores.barman import Barman
from . import drill, pitr
from . import observe as rc

RTO_STEPS = ("recover", "replay", "prove_canary", "prove_row_counts", "prove_notes", "prove_attachments")


async def run_pitr_drill(runtime: Runtime, moment: datetime, sample_notes: int, sample_attachments: int,
                         progress: Progress) -> dict[str, Any]:  # fmt: skip
    """The drill; returns restore_drill's report fields (drill_run.DrillReport)."""
    settings = runtime.settings
    keys = rc.drill_keys(settings)
    barman = Barman.from_settings(settings)
    started, now = time.perf_counter(), datetime.now(UTC)
    # A time outside the window, or no window, is the caller's input: an error with the window named.
    plan = await pitr.survey(barman, moment)
    run = drill.Steps(progress)
    run.steps.append(DrillStep(name="survey", ok=True, seconds=round(time.perf_counter() - started, 3),
                               summary=f"base backup {plan.base_backup.backup_id} then {plan.wal_segments} WAL "
                               f"segment(s) {plan.wal_first}..{plan.wal_last} to {moment.isoformat()}; window "
                               f"{pitr.window_text(plan.window)}"))  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="engram-pitr-drill-"))
    datadir = root / "pgdata"
    server: pgserver.ScratchServer | None = None
    try:
        await run.step("recover", lambda: pitr.recover(barman, plan, datadir),
                      lambda _: f"barman recover {plan.base_backup.backup_id} --target-time={moment.isoformat()} "
                      f"into {datadir}")  # fmt: skip
        served = await run.step("replay", lambda: pitr.serve(root, datadir, runtime.dsn),
                               lambda s: f"the bundled PostgreSQL 18 on 127.0.0.1:{s.server.port} replayed up to "
                               f"the transaction of {s.last_replayed.isoformat() if s.last_replayed else 'none'} "
                               f"(target {moment.isoformat()}) and promoted")  # fmt: skip
        server = served.server
        proofs = Proofs(runtime, keys, plan, run, sample_notes, sample_attachments)
        await prove_recovered(proofs, served.dsn)
    except (RecoveryError, postgres.PostgresError) as exc:
        text = str(exc) if isinstance(exc, RecoveryError) else scrub(f"PostgreSQL error: {exc}")
        if not run.steps or run.steps[-1].ok:
            run.steps.append(DrillStep(name="drill", ok=False, seconds=0.0, summary=text.replace("\n", " ")))
    finally:
        with anyio.CancelScope(shield=True):
            t0 = time.perf_counter()
            if server is not None:
                await server.stop()
            removed = await anyio.to_thread.run_sync(_remove, root)
            run.steps.append(DrillStep(name="remove_server", ok=removed, seconds=round(time.perf_counter() - t0, 3),
                                       summary=f"stopped the scratch server and removed {root}" if removed
                                       else f"{root} could not be removed"))  # fmt: skip
    ok = all(s.ok for s in run.steps)
    rto = round(sum(s.seconds for s in run.steps if s.name in RTO_STEPS), 3) if ok else None
    backup_id = f"pitr-{plan.base_backup.backup_id}"
    key = drill_record_key(now, backup_id)
    record: str | None = key
    async with open_repository(settings) as repo:
        try:
            await repo.put_bytes(
                key,
                DrillRecord(
                    at=now, backup_id=backup_id, ok=ok, rto_seconds=rto, scratch_database=str(datadir), steps=run.steps
                ).to_json(),
            )
        except RecoveryError as exc:
            run.steps.append(DrillStep(name="record", ok=False, seconds=0.0, summary=str(exc).replace("\n", " ")))
            record = None
    failed = [s for s in run.steps if not s.ok]
    summary = (f"point-in-time drill passed: {moment.isoformat()} recovers from base backup "
               f"{plan.base_backup.backup_id} plus WAL and reads with the master key; PITR RTO {rto:.1f} s"
               if ok and rto is not None else
               "point-in-time drill FAILED: " + "; ".join(f"{s.name}: {s.summary}" for s in failed))  # fmt: skip
    await progress(len(run.steps), len(run.steps), "drill finished")
    return {
        "verdict": "ok" if ok else "fail", "summary": summary, "backup_id": backup_id,
        "scratch_database": str(datadir), "scratch_dropped": removed, "steps": run.steps,
        "key_verdict": next((s.code for s in run.steps if s.name == "prove_canary"), None), "rto_seconds": rto,
        "total_seconds": round(time.perf_counter() - started, 3), "record": record,
    }  # fmt: skip


def _remove(root: Path) -> bool:
    shutil.rmtree(root, ignore_errors=True)
    return not root.exists()


@dataclass(frozen=True)
class Proofs:
    """What the proofs on a recovered server share: the keys to prove, Barman's plan (its row counts and target
    time), the steps they are recorded in, and how many notes and attachments to sample."""

    runtime: Runtime
    keys: drill.Keys
    plan: pitr.PitrSurvey
    run: drill.Steps
    sample_notes: int
    sample_attachments: int


async def prove_recovered(ctx: Proofs, dsn: str) -> None:
    """The dump drill's Engram proofs on a recovered server (any DSN): canary with the key, row counts, sampled
    notes with their users' DEKs, attachments as of the target time."""
    runtime, keys, plan, run = ctx.runtime, ctx.keys, ctx.plan, ctx.run
    async with postgres.connection(dsn) as conn:
        p = await probe(conn)
        if not p.sees_all_rows:
            raise IntegrityError(f"role {p.role} sees no rows under row-level security in the restored server",
                                 "run the drill as a superuser or a role with BYPASSRLS")  # fmt: skip
        proofs: list[Callable[[], Awaitable[drill.Proof]]] = [
            lambda: drill.prove_canary_of(conn, None, keys),
            lambda: pitr.prove_counts(conn, plan),
            lambda: drill.prove_notes(conn, keys, ctx.sample_notes),
            lambda: pitr.attachments_as_of(runtime, conn, keys, plan.target_time, ctx.sample_attachments),
        ]
        for prove in proofs:
            await run.prove(prove)
