"""`engram-recovery backups`: the catalog for people at a terminal (a table), or for machines (`--json`).

Like `restic snapshots` or `pgbackrest info`: it needs only the repository (no
database, no MCP machinery), so it starts fast and works on a machine that holds
the backups but not Engram.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import anyio

from ..core.settings import Settings
from ..core.status.catalog import CatalogEntry, CatalogView, open_catalog
from ..core.status.common import age_text, format_size

COLUMNS = ("ID", "SNAPSHOT (UTC)", "AGE", "SIZE", "FORMAT", "ENCRYPTED", "LAST VERIFIED", "LAST DRILL", "RETENTION")


async def read_catalog(settings: Settings) -> CatalogView:
    async with open_catalog(settings) as catalog:
        return await catalog.view()


def run(settings: Settings, as_json: bool) -> str:
    """The listing as text; RecoveryError (exit 2) when the repository cannot be read."""
    view = anyio.run(read_catalog, settings)
    if as_json:
        return json.dumps(view.model_dump(mode="json"), indent=2)
    return table(view)


def _ago(moment: datetime, now: datetime) -> str:
    return age_text((now - moment).total_seconds() / 3600) + " ago"


def _row(entry: CatalogEntry, now: datetime) -> tuple[str, ...]:
    if entry.state != "complete":
        what = "incomplete: no manifest" if entry.state == "incomplete" else "UNREADABLE manifest"
        after = "deleted by the next run_backup" if entry.retention.action == "leftover" else "?"
        return (entry.backup_id, "-", "-", format_size(entry.size_bytes), what, "-", "-", "-", after)
    snapshot = entry.snapshot_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if entry.snapshot_at else "-"
    fmt = f"{entry.dump_format}/{entry.compression}" if entry.compression else str(entry.dump_format)
    encrypted = "no"
    if entry.encrypted:
        encrypted = {True: "yes (this key)", False: "yes (OTHER key)", None: "yes"}[entry.configured_key_matches]
    proof = entry.verified
    verified = f"{'ok' if proof.ok else 'FAILED'} {proof.how}, {_ago(proof.at, now)}" if proof else "never"
    drill = entry.drilled
    drilled = "never"
    if drill is not None:
        drilled = f"{'ok' if drill.ok else 'FAILED'} {_ago(drill.at, now)}"
        if drill.rto_seconds is not None:
            drilled += f", RTO {drill.rto_seconds:.{1 if drill.rto_seconds < 10 else 0}f} s"
    fate = entry.retention
    retention = {"keep": f"keep ({', '.join(fate.rules)})" if fate.rules else "keep", "prune": "PRUNE",
                 "unknown": "? (blocked)", "leftover": "-"}[fate.action]  # fmt: skip
    if fate.action == "keep" and fate.after_next_backup == "prune":
        retention += "; pruned after the next backup"
    return (entry.backup_id, snapshot, age_text(entry.age_hours), format_size(entry.size_bytes), fmt, encrypted,
            verified, drilled, retention)  # fmt: skip


def table(view: CatalogView, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    if not view.backups:
        return f"{view.summary}\nrepository: {view.repository}"
    rows = [COLUMNS, *(_row(e, now) for e in view.backups)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "-" * len(max(lines, key=len)))
    policy = view.policy
    lines += [
        "",
        f"repository: {view.repository}",
        f"{view.summary}",
        f"{view.complete} complete, {view.incomplete} incomplete, {view.unreadable} unreadable; "
        f"{format_size(view.total_bytes)} of artifacts (attachment blobs are shared in the pool)",
        f"retention: keep last {policy['keep_last']}, daily {policy['keep_daily']}, weekly {policy['keep_weekly']}, "
        f"monthly {policy['keep_monthly']} (verified backups only count)",
    ]
    lines += [f"warning: {w}" for w in view.warnings]
    return "\n".join(lines)
