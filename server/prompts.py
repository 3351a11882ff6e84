"""The disaster-recovery prompt: walks an assistant through a recovery of this deployment.

A prompt is a playbook the client offers its user ("recover Engram"). It names
this deployment's facts, read from the settings and the catalog when it is
requested (never a secret's value: only whether a key is set), the order of the
tools, and the decisions only the operator can take: which recovery point, and
accepting what a restore rolls back. Steps whose tool is not registered here
(read-only access, or a tool not yet built) are said to be unavailable instead
of being named as if they were.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Annotated, Any
from urllib.parse import urlsplit

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.prompts import Prompt
from pydantic import Field

from ..core.errors import RecoveryError, scrub
from ..core.settings import Settings
from ..core.status.catalog import CatalogView, open_catalog
from ..core.status.common import age_text

PROMPT_NAME = "disaster_recovery"

ROLLBACK = """\
- Anything written after the recovery point is lost: the data loss is the recovery point's age.
- Refresh tokens minted after it are unknown afterwards: web sessions, Obsidian devices and MCP clients get
  `invalid_grant` and must sign in or re-authorize. Access tokens (15-minute JWTs) stay valid until they expire;
  rotating `JWT_SECRET` ends them at once.
- Tokens revoked and API keys deleted after the backup come back to life: offer to revoke them again.
- OAuth clients registered dynamically after the backup are lost (CIMD clients are fetched again).
- Sync goes backwards: `vaults.change_seq` (and `notes.seq`, `attachments.seq`) return to the backup's values
  while Obsidian clients hold cursors ahead of them, so changes made after the restore can be skipped by those
  clients (Engram has no sync epoch); plan_restore's consequences say what to tell users.
- Oban jobs come back as they were at backup time.
- The weekly OrphanSweep (Sunday 05:00 UTC) deletes bucket prefixes and Qdrant points of users missing from
  `users`: an older database beside a newer bucket can delete newer users' files; restore both to the same point
  and do not let the sweep run in between.
- Qdrant is not restored: it is rebuilt from PostgreSQL by re-embedding (reindex_qdrant)."""


def _deployment(settings: Settings, tools: Collection[str]) -> list[str]:
    db = urlsplit(settings.database_url.get_secret_value())
    lines = [f"- Database: `{settings.database_name}` on {db.hostname or 'localhost'}:{db.port or 5432}."]
    if settings.storage_backend == "s3":
        lines.append(
            f"- Attachments: STORAGE_BACKEND=s3, bucket `{settings.storage_bucket}`"
            f"{' at ' + settings.storage_endpoint if settings.storage_endpoint else ''}; each backup mirrors it into "
            "the repository's attachments pool, and a restore copies the blobs back."
        )
    else:
        lines.append("- Attachments: STORAGE_BACKEND=database: the attachment bytes are rows of `storage_objects`, "
                     "inside every database dump; there is no bucket to restore.")
    lines.append(f"- Backup repository: `{settings.repository}`.")
    lines.append(
        "- Backup key: ENGRAM_RECOVERY_BACKUP_KEY is set here, so encrypted backups can be read (list_backups says "
        "whether each backup was encrypted with this key)."
        if settings.backup_key is not None
        else "- Backup key: none is set here: backups written without one are unencrypted; an encrypted backup "
        "cannot be restored until the operator sets ENGRAM_RECOVERY_BACKUP_KEY (never ask for its value)."
    )
    lines.append(
        "- Master key: ENCRYPTION_MASTER_KEY is set in this server's environment; plan_restore checks it offline "
        "against each backup's boot canary."
        if settings.encryption_master_key is not None
        else "- Master key: ENCRYPTION_MASTER_KEY is NOT set here: no restore can be proven. Ask the operator to "
        "fetch it from where it is escrowed and set it in this server's environment (never in the chat)."
    )
    if settings.key_escrow:
        lines.append(f"- The master key is escrowed in: {', '.join(settings.key_escrow)}.")
    if settings.qdrant_configured:
        lines.append(f"- Qdrant: collection `{settings.qdrant_collection}`, rebuilt after a restore.")
    else:
        lines.append("- Qdrant: not configured here; reindex_qdrant cannot check the collection.")
    if settings.access == "read-only":
        lines.append("- Access: READ-ONLY. Tools that change anything are not registered: you can check and plan; "
                     "the operator runs the rest with full access.")
    lines.append(f"- Tools available: {', '.join(sorted(tools))}.")
    return lines


def _catalog_lines(view: CatalogView) -> list[str]:
    lines = [f"- {view.summary}."]
    for entry in [e for e in view.backups if e.state == "complete"][:5]:
        proof = entry.verified
        verified = f"verified {proof.how} {'ok' if proof.ok else 'FAILED'}" if proof else "never verified"
        drilled = (f"drilled {'ok' if entry.drilled.ok else 'FAILED'}"
                   + (f", RTO {entry.drilled.rto_seconds:.1f} s" if entry.drilled.rto_seconds else "")
                   if entry.drilled else "never drilled")  # fmt: skip
        lines.append(f"  - `{entry.backup_id}`: {age_text(entry.age_hours)} old, {verified}, {drilled}"
                     f"{', encrypted' if entry.encrypted else ''}")
    return lines


def _step(tools: Collection[str], name: str, text: str) -> str:
    if name in tools:
        return text
    return (f"`{name}` is not available on this server (read-only access or not registered): ask the operator to "
            f"run it with full access (`engram-recovery call {name}`), then continue.")


async def render(settings: Settings, tools: Collection[str], recovery_point: str | None, situation: str | None) -> str:
    try:
        async with open_catalog(settings) as catalog:
            recovery_points = _catalog_lines(await catalog.view())
    except RecoveryError as exc:
        recovery_points = [f"- The repository cannot be read right now: {exc.message} (fix: {exc.hint})."]
    point = recovery_point or "<the chosen backup id>"
    if "run_restore" in tools:
        restore = ("Restore with `run_restore`, passing the plan_token of the plan the operator approved, after the "
                   "operator confirms in this conversation (confirm=true; without it nothing changes). Stop Engram's "
                   "app first, as the plan says. If it stops at a step, tell the operator its target_state, fix the "
                   "cause, and call it again with the same plan_token and resume=true; if it refuses the token "
                   "(premises changed), plan again.")
    else:
        restore = ("Restore by following plan_restore's steps in order: give the operator each step's command to "
                   "run (they change the production database; this server has no restore tool). Stop Engram's app "
                   "first, as the plan says; do not skip the key check before the app boots.")
    parts = [
        "You are helping the operator of this Engram deployment recover from a disaster, with the "
        "engram-recovery tools. Work in the order below; at each DECISION, stop and ask the operator.",
        f"What happened, in the operator's words: {situation}" if situation else "",
        "\n## This deployment",
        *_deployment(settings, tools),
        "\n## Recovery points now (the `engram-recovery://backups` resource has the full catalog)",
        *recovery_points,
        "\n## Steps",
        "1. `backup_status` (deep=true re-verifies the newest backup byte for byte): what is broken, what is "
        "reachable, how old the newest good backup is.",
        "2. `list_backups`: the recovery points, newest first, with their verification, drills and age. DECISION: "
        "which recovery point. Prefer the newest one that is verified (and drilled) and older than the damage; "
        "if the damage began at a known time use plan_restore with `before:<ISO time>`, or, when backup_status's "
        "archive check shows a restorable window (Barman configured), `at:<ISO time with zone>` to recover to "
        "that very moment. Its age is the data that will be lost"
        + (f"; the operator suggested `{recovery_point}`." if recovery_point else "."),
        f"3. `plan_restore` with recovery_point=`{point}` and the target database: read every check. A failed "
        "check (wrong master key, damaged artifact, missing role) withholds the steps: fix what it names first.",
        "4. " + _step(tools, "restore_drill", f"`restore_drill` with recovery_point=`{point}`: it restores into a "
                      "scratch database and proves the key, decryption and row counts, and measures the RTO. Do "
                      "not restore production from a point that fails its drill."),
        "5. DECISION: before restoring, tell the operator what the restore rolls back (below, and plan_restore's "
        "`consequences` for this backup) and get an explicit yes. " + restore,
        "6. " + _step(tools, "reindex_qdrant", "`reindex_qdrant`: first without confirm (a dry run that counts the "
                      "notes to re-embed), then confirm=true once Engram's app runs again: Engram's workers "
                      "re-embed every note."),
        "7. `backup_status` again, then " + _step(tools, "run_backup", "`run_backup` once Engram is healthy, so the "
                                                   "restored state has a fresh recovery point."),
        "\n## What a restore rolls back (tell the operator before step 5)",
        ROLLBACK,
        "\n## Rules",
        "- Never ask for, print or pass a secret (master key, backup key, passwords, tokens) as a tool argument: "
        "the server reads them from its environment.",
        "- Tools that change anything act only with confirm=true; say what each one did after it ran.",
    ]
    return scrub("\n".join(p for p in parts if p))


def register_prompts(server: MCPServer[Any], settings: Settings, tools: Collection[str]) -> None:
    async def disaster_recovery(
        recovery_point: Annotated[
            str | None,
            Field(description="Optional: the recovery point the operator has in mind ('latest', a backup id, or "
                  "'before:<ISO time>')."),
        ] = None,
        situation: Annotated[
            str | None, Field(description="Optional: what happened, in the operator's words.")
        ] = None,
    ) -> str:
        return await render(settings, tools, recovery_point, situation)

    server.add_prompt(Prompt.from_function(
        disaster_recovery, name=PROMPT_NAME, title="Recover Engram from a disaster",
        description="A step-by-step disaster recovery of this Engram deployment: backup_status, list_backups, "
        "plan_restore, restore_drill, the restore, reindex_qdrant; with this deployment's facts (storage backend, "
        "repository, whether a backup key is set) and the decisions to take (which recovery point, what a restore "
        "rolls back).",
    ))  # fmt: skip
