"""backup_status's database checks: PostgreSQL itself, the master key against the boot canary, Oban."""

from __future__ import annotations

from typing import Any

from ..engram import crypto as engram_crypto
from ..engram import keys as key_rules
from ..engram import oban
from ..engram.canary import read_canary
from ..engram.keys import MasterKeys
from ..stores.pgclient.versions import choose
from ..verdict import Verdict
from .common import Check, StatusContext, format_size

# --- postgres -------------------------------------------------------------------------


async def check_postgres(ctx: StatusContext) -> Check:
    p = await ctx.probe()
    settings = ctx.runtime.settings
    details: dict[str, Any] = {
        "server_version": p.server_version,
        "database": settings.database_name,
        "role": p.role,
        "superuser": p.is_superuser,
        "bypass_rls": p.bypass_rls,
        "engram_schema_version": p.engram_schema_version,
        "row_estimates": {t: p.estimates.get(t) for t in ("users", "vaults", "notes", "chunks", "attachments")},
    }
    async with ctx.runtime.pool.acquire() as conn:
        details["database_bytes"] = await conn.fetchval("SELECT pg_database_size(current_database())")
        wal = await conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('wal_level', 'archive_mode', 'archive_command', 'archive_library', 'archive_timeout')"
        )
    wal_settings = {r["name"]: r["setting"] for r in wal}
    archiving = wal_settings.get("archive_mode") in ("on", "always") and bool(
        (wal_settings.get("archive_command") or "").strip() not in ("", "(disabled)")
        or wal_settings.get("archive_library")
    )
    details["wal"] = {
        "wal_level": wal_settings.get("wal_level"),
        "archive_mode": wal_settings.get("archive_mode"),
        "archiving": archiving,
        "meaning": "point-in-time recovery is possible between backups"
        if archiving
        else "no WAL archiving: the recovery point is the last backup",
    }
    problems: list[str] = []
    status: Verdict = "ok"
    if not p.looks_like_engram:
        status = "fail"
        problems.append("this database has no users/vaults/notes tables: is DATABASE_URL Engram's database?")
    # Which pg_dump run_backup would use for this server, and whether it can dump it.
    choice = await choose("pg_dump", settings.pg_dump, p.server_major,
                          f"dump a PostgreSQL {p.server_major} server ({p.server_version})",
                          settings.pg_client_prefix)  # fmt: skip
    details["pg_dump"] = choice.describe()
    if choice.chosen is None:
        status = "fail"
        problems.append(f"{choice.problem}. Fix: {choice.fix}")
    details["sees_all_rows"] = p.sees_all_rows
    if not p.sees_all_rows:
        status = "fail"
        problems.append(
            f"role {p.role} is neither superuser nor BYPASSRLS, so it sees 0 rows in the RLS-protected tables "
            f"({', '.join(sorted(p.forced_rls))}): pg_dump fails on them and reindex_qdrant must work per "
            "tenant. Fix: back up as a superuser or a role with BYPASSRLS (ALTER ROLE ... BYPASSRLS)"
        )
    summary = (
        "; ".join(problems)
        if problems
        else f"PostgreSQL {p.server_version} reachable, {format_size(details['database_bytes'])}, dumpable by "
        f"pg_dump {details['pg_dump']['major']} ({details['pg_dump']['origin']}: {details['pg_dump']['path']}), "
        "role sees all rows"
    )
    return Check(component="postgres", status=status, summary=summary, details=details, estimates=["row_estimates"])


# --- master key --------------------------------------------------------------------------


async def check_master_key(ctx: StatusContext) -> Check:
    settings = ctx.runtime.settings
    details: dict[str, Any] = {
        "key_provider": settings.key_provider,
        "declared_escrow_locations": len(settings.key_escrow),
        "key_version": settings.encryption_master_key_version,
    }
    warnings: list[str] = []
    if len(settings.key_escrow) < 2:
        warnings.append(
            f"only {len(settings.key_escrow)} escrow location(s) declared for the master key: keep it in at least "
            "two separate places and list them in ENGRAM_RECOVERY_KEY_ESCROW"
        )
    if settings.encryption_master_key is None:
        return Check(
            component="master_key",
            status="fail",
            summary="ENCRYPTION_MASTER_KEY is not available to this tool, so no key check is possible; without "
            "the key a restored database is unreadable. Set ENCRYPTION_MASTER_KEY or ENCRYPTION_MASTER_KEY_FILE",
            details=details,
        )
    keys = MasterKeys.from_settings(settings)
    if keys.current is None:
        return Check(
            component="master_key",
            status="fail",
            summary=f"ENCRYPTION_MASTER_KEY is malformed: {keys.current_error}. It must be base64 of exactly 32 bytes",
            details=details,
        )
    key = keys.current
    details["fingerprint"] = engram_crypto.key_fingerprint(key)
    previous = keys.previous
    if previous is not None:
        details["previous_fingerprint"] = engram_crypto.key_fingerprint(previous)
    elif keys.previous_error is not None:
        warnings.append(f"ENCRYPTION_MASTER_KEY_PREVIOUS is malformed: {keys.previous_error}")
    details["previous_set"] = settings.encryption_master_key_previous is not None

    p = await ctx.probe()
    if not p.has_table("system_canaries"):
        return Check(
            component="master_key", status="fail", details=details,
            summary="this database has no system_canaries table, so the key cannot be checked against it",
        )
    async with ctx.runtime.pool.acquire() as conn:
        canary = await read_canary(conn)
    if canary is None:
        return Check(
            component="master_key",
            status="fail",
            details=details,
            summary="system_canaries is empty: Engram would silently adopt ANY master key at its next boot and "
            "new data would be unreadable with the real one. Boot the app once with the right key (it writes a "
            "canary), and never restore a database whose canary table is empty without checking the key",
        )
    details["canary_id"] = canary.id
    verdict = engram_crypto.check_canary(key, canary.wrapped_dek, canary.dek_sha256)
    details["canary"] = verdict
    if verdict == "match":
        status: Verdict = "warn" if warnings else "ok"
        summary = f"master key {details['fingerprint']} unwraps the newest boot canary"
        if warnings:
            summary += "; " + "; ".join(warnings)
        return Check(component="master_key", status=status, summary=summary, details=details)
    if verdict == "kms":
        return Check(
            component="master_key",
            status="warn",
            details=details,
            summary="the boot canary is wrapped by AWS KMS, so it cannot be checked offline; make sure the KMS key "
            "and its permissions are recoverable" + ("; " + "; ".join(warnings) if warnings else ""),
        )
    judged = key_rules.judge_canary(key, previous, canary.wrapped_dek, canary.dek_sha256,
                                    what="the newest boot canary")  # fmt: skip
    if judged.code == "previous_key_only":  # the verdict plan_restore and restore_drill give too
        return Check(component="master_key", status=judged.status, summary=judged.summary,
                     details=details | judged.details | {"code": judged.code})  # fmt: skip
    return Check(
        component="master_key",
        status="fail",
        details=details,
        summary=f"ENCRYPTION_MASTER_KEY (fingerprint {details['fingerprint']}) does not unwrap the newest boot "
        f"canary ({verdict}): this is not the key this database was written with. Find the right key before "
        "anything else: without it the backups cannot be read",
    )


# --- oban ---------------------------------------------------------------------------------


async def check_oban(ctx: StatusContext) -> Check:
    p = await ctx.probe()
    if not p.has_table("oban_jobs"):
        return Check(component="oban", status="warn", summary="no oban_jobs table: is this Engram's database?")
    # The same count reindex_qdrant reports, so an operator can watch a rebuild drain here.
    target = oban.ObanTarget(schema=p.schema, version=p.oban_version or 0, note_index=None)
    async with ctx.runtime.pool.acquire() as conn:
        # Literal states, each one range of Oban's state index: never a full scan of a big oban_jobs.
        embed = await oban.embed_backlog(conn, target)
        stuck = await conn.fetchval(
            "SELECT count(*) FROM oban_jobs WHERE state = 'executing' "
            "AND attempted_at < timezone('UTC', now()) - interval '30 minutes'"
        )
        overdue = await conn.fetchval(
            "SELECT count(*) FROM oban_jobs WHERE state = 'available' "
            "AND scheduled_at < timezone('UTC', now()) - interval '15 minutes'"
        )
    empty = dict.fromkeys((*oban.INCOMPLETE_STATES, "discarded"), 0)
    by_state = empty | embed.by_state | {"discarded": embed.discarded}
    backlog = embed.total
    details = {
        "oban_version": p.oban_version,
        "embed_jobs_by_state": by_state,
        "embed_backlog": backlog,
        "stuck_executing": int(stuck),
        "overdue_available": int(overdue),
    }
    status: Verdict = "ok"
    summary = f"EmbedNote backlog {backlog}"
    if backlog:
        summary += " (Engram's embed queue is working through it; a reindex_qdrant rebuild drains here)"
    if stuck:
        status = "warn"
        summary += f"; {stuck} job(s) executing for over 30 minutes (Oban's Lifeline rescues them)"
    if overdue:
        status = "warn"
        summary += f"; {overdue} job(s) available for over 15 minutes: is the Engram app running?"
    if by_state["discarded"]:
        summary += f"; {by_state['discarded']} EmbedNote job(s) discarded after all retries"
    return Check(component="oban", status=status, summary=summary, details=details)
