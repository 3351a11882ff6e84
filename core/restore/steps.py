"""The ordered steps of a restore and the consequences to tell users: pure, no I/O.

Every command is exact for this deployment and carries no secret: PostgreSQL
passwords come from PGPASSWORD or ~/.pgpass, S3 credentials from the AWS CLI's
own environment, the backup key from ENGRAM_RECOVERY_BACKUP_KEY(_FILE). The
tool's own commands name it by absolute path with its --env-file and the
settings the environment gave it, so they run from a fresh shell.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from ..engram import crypto as engram_crypto
from ..repository.manifest import Manifest
from ..stores.postgres import quote_ident
from .plan import CHANGE_SEQ_MIGRATION, Consequence, Observed, PlanStep, snapshot_time

# Re-embedding estimates: Engram's chunker aims at ~512-token chunks; most run shorter.
TOKENS_PER_CHUNK = 400
# A conservative throughput for a hosted embedding API with Engram's default concurrency.
EMBED_TOKENS_PER_SECOND = 2_000
# Without the live database's cursors, move every sync head this far past anything a client can hold.
BLIND_FENCE = 1_000_000
TOKEN_TABLES = {"refresh_tokens": "created_at", "device_refresh_tokens": "inserted_at",
                "oauth_refresh_tokens": "inserted_at"}  # fmt: skip


@dataclass(frozen=True)
class CommandContext:
    """Where things are, as the commands must name them."""

    work_dir: str
    pg_restore: str
    repository: str
    repository_endpoint: str | None
    storage_bucket: str
    storage_endpoint: str | None
    qdrant_configured: bool
    # The tool itself, spelled so the commands run from any shell: its absolute path, its --env-file,
    # and what the environment gave it (a secret's name only: None).
    tool: tuple[str, ...] = ("engram-recovery",)
    env_file: str | None = None
    environment: tuple[tuple[str, str | None], ...] = ()

    def tool_command(self, args: str, needs: tuple[str, ...]) -> tuple[str, list[str]]:
        """The tool run with `args` and the settings among `needs` spelled out; and the secrets it cannot spell."""
        given = dict(self.environment)
        prefix: list[str] = []
        unspelled: list[str] = []
        for name in needs:
            if given.get(f"{name}_FILE"):
                prefix.append(f"{name}_FILE={_q(str(given[f'{name}_FILE']))}")
            elif name in given:
                value = given[name]
                if value is None:
                    unspelled.append(name)
                else:
                    prefix.append(f"{name}={_q(value)}")
        env_file = ["--env-file", _q(self.env_file)] if self.env_file else []
        return " ".join([*prefix, *(_q(part) for part in self.tool), *env_file, args]), unspelled
    # psql, createdb, dropdb by path: beside the chosen pg_restore where that installation has them.
    clients: Mapping[str, str] = field(default_factory=dict)

    def client(self, tool: str) -> str:
        return _q(self.clients.get(tool, tool))


def _q(text: str) -> str:
    return shlex.quote(text)


def _conn(observed: Observed) -> str:
    t = observed.target
    parts = [f"-h {_q(t.host)}" if t.host else "", f"-p {t.port}" if t.port else "",
             f"-U {_q(t.user)}" if t.user else ""]
    return " ".join(p for p in parts if p)


def _psql(ctx: CommandContext, observed: Observed, sql: str, database: str | None = None) -> str:
    db = database or observed.target.database
    return f"{ctx.client('psql')} {_conn(observed)} -d {_q(db)} --no-password -v ON_ERROR_STOP=1 -Atc {_q(sql)}"


def _endpoint(url: str | None) -> str:
    return f" --endpoint-url {_q(url)}" if url else ""


def dump_path(ctx: CommandContext, manifest: Manifest) -> str:
    suffix = {"custom": ".dump", "plain": ".sql", "directory": ".dir"}[manifest.database.dump_format]
    return str(PurePosixPath(ctx.work_dir) / f"{manifest.backup_id}{suffix}")


# What `decrypt backup:<id>` reads, and what `call reindex_qdrant` reads.
DECRYPT_SETTINGS = ("ENGRAM_RECOVERY_REPOSITORY_ENDPOINT", "ENGRAM_RECOVERY_REPOSITORY_ACCESS_KEY_ID",
                    "ENGRAM_RECOVERY_REPOSITORY_SECRET_ACCESS_KEY", "ENGRAM_RECOVERY_REPOSITORY_REGION",
                    "ENGRAM_RECOVERY_BACKUP_KEY")  # fmt: skip
REINDEX_SETTINGS = ("DATABASE_URL", "QDRANT_URL", "QDRANT_API_KEY", "QDRANT_COLLECTION", "EMBED_DIMS",
                    "ENGRAM_RECOVERY_QDRANT_PATH", "ENGRAM_RECOVERY_ACCESS")  # fmt: skip


def decrypt_command(ctx: CommandContext, manifest: Manifest, output: str) -> tuple[str, list[str]]:
    # `decrypt backup:<id>` reads the repository named here and checks the artifacts against the manifest.
    command, unspelled = ctx.tool_command(f"decrypt {_q('backup:' + manifest.backup_id)} --output {_q(output)}",
                                          DECRYPT_SETTINGS)  # fmt: skip
    return f"ENGRAM_RECOVERY_REPOSITORY={_q(ctx.repository)} {command}", unspelled


def _unspelled(names: list[str]) -> list[str]:
    return [f"{name} came from this tool's environment and is never written into a command: export it (or "
            f"{name}_FILE) in the shell that runs this step" for name in names]


def restore_command(ctx: CommandContext, manifest: Manifest, observed: Observed, dump: str) -> str:
    t = observed.target
    if manifest.database.dump_format == "plain":
        return (f"{ctx.client('psql')} {_conn(observed)} -d {_q(t.database)} --no-password -v ON_ERROR_STOP=1 "
                f"--single-transaction -q -f {_q(dump)}")
    # A directory dump restores in parallel, which excludes --single-transaction.
    mode = "--jobs=2" if manifest.database.dump_format == "directory" else "--single-transaction"
    return (f"{_q(ctx.pg_restore)} {_conn(observed)} -d {_q(t.database)} --no-password --exit-on-error "
            f"{mode} {_q(dump)}")


def _uuid_array(ids: list[str]) -> str:
    return "'{" + ",".join(ids) + "}'::uuid[]"


def build_steps(manifest: Manifest, observed: Observed, ctx: CommandContext) -> list[PlanStep]:
    t = observed.target
    db_artifact = next((a for a in manifest.artifacts if a.kind == "database"), None)
    steps: list[PlanStep] = []

    def add(step_id: str, title: str, commands: list[str], **extra: Any) -> None:
        steps.append(PlanStep(order=len(steps) + 1, id=step_id, title=title, commands=commands, **extra))

    others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    add("stop_app", "Stop every Engram instance and worker, so nothing writes during the restore and no Oban job "
        "(OrphanSweep, ReconcileEmbeddings) runs against a half-restored database",
        [_psql(ctx, observed, others)] if t.exists else [],
        expect="0 (no other session on the target)" if t.exists else None, checked=["target_sessions"],
        cannot_check=["how this deployment starts and stops Engram (docker compose, systemd, Kubernetes)"])
    newer = observed.users_at_risk
    if manifest.attachments.backend == "s3" and newer:
        add("save_newer_blobs", "Copy aside the attachments of users created after the backup: once the older "
            "database is back, Engram's weekly OrphanSweep deletes the S3 prefixes of users it does not know",
            [f"aws s3 cp --recursive s3://{ctx.storage_bucket}/{u}/ {_q(ctx.work_dir + '/newer-users/' + u)}/"
             f"{_endpoint(ctx.storage_endpoint)}" for u in newer],
            checked=["rpo"], cannot_check=["objects uploaded between this plan and the copy"])
    # Owned by the source's owner, as the dump's schema grants and default privileges expect.
    owner = observed.needs.owner
    owned = f" -O {_q(owner)}" if owner else ""
    create = f"{ctx.client('createdb')} {_conn(observed)} --no-password -T template0{owned} {_q(t.database)}"
    unowned = [] if owner else ["the source database's owner (not recorded by this backup): set it with "
                                "ALTER DATABASE ... OWNER TO before the restore"]
    if not t.exists:
        add("create_target", f"Create the empty target database {t.database}"
            + (f", owned by {owner} like the source" if owner else ""), [create], checked=["target", "restore_role"],
            cannot_check=unowned)
    elif t.user_tables:
        add("replace_target", f"DROP and re-create {t.database} (allowed by allow_non_empty_target)",
            [f"{ctx.client('dropdb')} {_conn(observed)} --no-password {_q(t.database)}", create],
            checked=["target", "restore_role"],
            cannot_check=["whether anything in the dropped database was still needed", *unowned])
    dump = dump_path(ctx, manifest)
    if db_artifact is not None:
        plain = sum(a.plain_size or a.size for a in manifest.artifacts if a.kind == "database")
        decrypt, unspelled = decrypt_command(ctx, manifest, dump)
        add("decrypt_database", "Decrypt and decompress the database dump from the repository (checked against "
            "the manifest as it is read)",
            [f"mkdir -p {_q(ctx.work_dir)}", decrypt],
            expect=f"{dump}: {plain} bytes of pg_dump output", checked=["artifacts", "manifest"],
            cannot_check=[f"free disk space in {ctx.work_dir} (needs {plain} bytes)",
                          *_unspelled(unspelled)]
            + ([f"that the backup key given to this step has fingerprint {manifest.backup_key_fingerprint}"]
               if manifest.backup_key_fingerprint else []))
        add("restore_database", "Restore the dump with stock tools, all or nothing",
            [restore_command(ctx, manifest, observed, dump)],
            checked=["pg_restore", "target_server", "roles", "target", "restore_role"],
            cannot_check=["server-side limits met only during the restore (disk space, max_locks_per_transaction)"])
    counts = manifest.database.row_counts
    if counts:
        tables = sorted(counts)
        sql = " UNION ALL ".join(f"SELECT '{name}', count(*) FROM {quote_ident(name)}" for name in tables)
        add("check_database", "Compare the restored row counts with the manifest",
            [_psql(ctx, observed, sql + " ORDER BY 1")],
            expect="; ".join(f"{name}|{counts[name]}" for name in tables), checked=["manifest"])
    if manifest.canary.id:
        add("check_canary", "Confirm the restored boot canary is the one the key was checked against offline",
            [_psql(ctx, observed, "SELECT id FROM system_canaries ORDER BY id DESC LIMIT 1")],
            expect=manifest.canary.id, checked=["master_key"])
    if manifest.attachments.backend == "s3" and observed.inventory is not None:
        add("restore_attachments", f"Copy the {observed.inventory.objects} attachment blob(s) back into "
            f"s3://{ctx.storage_bucket} under their original keys",
            [_copy_back(ctx, repo_key, key) for key, repo_key, _v in observed.inventory.entries],
            checked=["attachments"],
            cannot_check=["that the bucket exists and these credentials may write to it",
                          "objects in the bucket that are newer than the backup (they stay)"])
        versions = [(k, v) for k, _r, v in observed.inventory.entries if v]
        if manifest.attachments.source_versioned and versions:
            bucket = manifest.attachments.source_bucket or ctx.storage_bucket
            add("restore_attachments_in_place", "ALTERNATIVE to the previous step while the source bucket still "
                "exists: restore the recorded object versions in place, from the bucket's own version history",
                [f"aws s3api copy-object --bucket {_q(bucket)} --key {_q(k)} --copy-source "
                 f"{_q(f'{bucket}/{k}?versionId={v}')}{_endpoint(ctx.storage_endpoint)}" for k, v in versions],
                optional=True, checked=["attachments"],
                cannot_check=["that those versions still exist (a lifecycle rule may have expired them)"])
    _security_steps(manifest, observed, ctx, add)
    fingerprint = engram_crypto.key_fingerprint(observed.keys.current) if observed.keys.current else "?"
    add("boot_app", f"Start Engram with ENCRYPTION_MASTER_KEY = the key with fingerprint {fingerprint} (it runs its "
        "migrations, then checks the canary)", [], checked=["master_key", "app_version"],
        cannot_check=["the command that starts Engram in this deployment", "that the app is given this same key"])
    if ctx.qdrant_configured:
        reindex, unspelled = ctx.tool_command("call reindex_qdrant --arg mode=all --arg recreate_collection=true "
                                              "--arg confirm=true", REINDEX_SETTINGS)  # fmt: skip
        add("reindex_qdrant", "Rebuild Qdrant from scratch after Engram is up: the restored chunks point at "
            "vectors of another moment", [reindex],
            cannot_check=["embedding provider quota and cost (run the same command without confirm=true first "
                          "for its own estimate)", *_unspelled(unspelled)])
    add("cleanup", "Remove the decrypted dump (it holds every row, encrypted by Engram's keys only)",
        [f"rm -rf {_q(dump)}"], optional=True)
    return steps


def _security_steps(
    manifest: Manifest, observed: Observed, ctx: CommandContext, add_step: Callable[..., None]
) -> None:
    live = observed.live
    statements: list[str] = []
    for table, ids in sorted(live.revoked_after.items()):
        if ids:
            statements.append(f"UPDATE {table} SET revoked_at = timezone('UTC', now()) WHERE revoked_at IS NULL "
                              f"AND id = ANY({_uuid_array(ids)})")
    # Only from a complete, non-empty read: an empty list may be a read that saw nothing (row-level security),
    # and "delete every key not in {}" would delete them all. Empty is for the operator to judge (consequences).
    if live.knows("api_keys") and live.api_key_ids:
        statements.append(f"DELETE FROM api_keys WHERE NOT (id = ANY({_uuid_array(live.api_key_ids)}))")
    if statements:
        add_step("revoke_tokens", "Revoke the tokens revoked, and delete the API keys deleted, after the backup "
                 "(the restore brings them back to life)", [_psql(ctx, observed, "; ".join(statements))],
                 checked=["rpo"], cannot_check=["revocations made after this plan was built; run it as a role "
                                                 "that sees every row (superuser or BYPASSRLS: api_keys has RLS)"])
    if (manifest.database.engram_schema_version or 0) >= CHANGE_SEQ_MIGRATION:
        if live.knows("vault_seqs") and live.vault_seqs:
            values = ", ".join(f"('{vid}'::uuid, {seq}::bigint)" for vid, seq in sorted(live.vault_seqs.items()))
            sql = (f"UPDATE vaults AS v SET change_seq = f.seq FROM (VALUES {values}) AS f(id, seq) "
                   "WHERE v.id = f.id AND v.change_seq < f.seq")
            unchecked = ["vaults created after the backup (they are not restored)"]
        else:
            sql = f"UPDATE vaults SET change_seq = change_seq + {BLIND_FENCE}"
            why = ("live database unreachable" if not live.reachable else live.unchecked.get("vault_seqs")
                   or "the live database holds no vault")
            unchecked = [f"the live cursors ({why}): every head moves by a fixed margin"]
        add_step("fence_sync", "Move each vault's sync head past every cursor an Obsidian client may hold, so "
                 "writes made after the restore reach every device", [_psql(ctx, observed, sql)],
                 cannot_check=unchecked)


def _copy_back(ctx: CommandContext, repo_key: str, key: str) -> str:
    destination = _q(f"s3://{ctx.storage_bucket}/{key}")
    if not ctx.repository.startswith("s3://"):
        source = str(PurePosixPath(ctx.repository) / repo_key)
        return f"aws s3 cp {_q(source)} {destination}{_endpoint(ctx.storage_endpoint)}"
    source = _q(ctx.repository.rstrip("/") + "/" + repo_key)
    if (ctx.repository_endpoint or "") == (ctx.storage_endpoint or ""):
        return f"aws s3 cp {source} {destination}{_endpoint(ctx.storage_endpoint)}"  # a server-side copy
    # Two endpoints: through a local file, never a pipe, whose failed first half would upload an empty object.
    local = _q(str(PurePosixPath(ctx.work_dir) / "blob.tmp"))
    return (f"aws s3 cp {source} {local}{_endpoint(ctx.repository_endpoint)} && aws s3 cp {local} {destination}"
            f"{_endpoint(ctx.storage_endpoint)} && rm -f {local}")


def consequences(manifest: Manifest, observed: Observed, steps: list[PlanStep]) -> list[Consequence]:
    live, point = observed.live, snapshot_time(manifest).isoformat()
    ids = {s.id for s in steps}
    out: list[Consequence] = []
    if live.reachable:
        issued = sum(live.tokens_issued_after.values())
        out.append(Consequence(topic="sign_in_again", count=live.users_signing_in_again,
                               summary=f"{issued} session/device/MCP token(s) issued after the backup become unknown: "
                               f"{live.users_signing_in_again or 0} user(s) must sign in again on those web sessions, "
                               "Obsidian devices and MCP clients", ))  # fmt: skip
        revoked = sum(len(v) for v in live.revoked_after.values())
        backed_up = manifest.database.row_counts.get("api_keys")
        if not live.knows("api_keys") or live.api_key_ids is None:
            keys = (f"API keys deleted after the backup cannot be counted "
                    f"({live.unchecked.get('api_keys', 'no api_keys table')}): ask users to rotate keys they had "
                    "deleted, or plan again as a superuser or a role with BYPASSRLS")
            deleted = None
        elif not live.api_key_ids and backed_up:
            keys = (f"the live api_keys table holds no key while the backup holds {backed_up}: if every key was "
                    "really deleted after the backup, delete the restored ones by hand (DELETE FROM api_keys) once "
                    "you have checked; the plan derives no statement from an empty read")
            deleted = None
        else:
            kept = len(live.api_key_ids) - (live.api_keys_created_after or 0)
            deleted = max((backed_up or 0) - kept, 0)
            keys = f"about {deleted} API key(s) deleted after the backup would work again"
        token_note = "" if live.knows("tokens") else f" ({live.unchecked['tokens']})"
        out.append(Consequence(topic="revoked_come_back", count=revoked + (deleted or 0),
                               step="revoke_tokens" if "revoke_tokens" in ids else None,
                               summary=f"{revoked} token(s) revoked after the backup would work again{token_note}; "
                               f"{keys}" + (": the revoke_tokens step re-revokes them" if "revoke_tokens" in ids
                                            else "")))  # fmt: skip
    else:
        out.append(Consequence(topic="sign_in_again", summary="every web session, Obsidian device and MCP client "
                               f"that refreshed its token after {point} must sign in again (live database "
                               "unreachable: count unknown)"))  # fmt: skip
        out.append(Consequence(topic="revoked_come_back", summary=f"tokens revoked and API keys deleted after {point} "
                               "come back to life; the live database is unreachable, so they cannot be listed: "
                               "ask users to rotate API keys they had deleted"))  # fmt: skip
    if "fence_sync" in ids:
        out.append(Consequence(topic="sync_cursors", step="fence_sync", summary="vaults.change_seq goes back to its "
                               "value at the backup while Obsidian clients keep cursors ahead of it; the fence_sync "
                               "step moves each head past them. Devices keep local edits made after the backup: "
                               "they re-upload them only if edited again"))  # fmt: skip
    newer = observed.users_at_risk
    if newer:
        where = ("their S3 prefixes" if manifest.attachments.backend == "s3" else "their data")
        who = ("user(s) created after the backup are not in it" if live.reachable else
               "bucket prefix(es) belong to no user the backup knows (live database unreachable: likely users "
               "created after the backup)")  # fmt: skip
        out.append(Consequence(topic="orphan_sweep", count=len(newer),
                               step="save_newer_blobs" if "save_newer_blobs" in ids else None,
                               summary=f"{len(newer)} {who}: the weekly "
                               f"OrphanSweep deletes {where} and Qdrant points; the plan copies their blobs aside"))
    chunks = manifest.database.row_counts.get("chunks")
    notes = manifest.database.row_counts.get("notes")
    if chunks is not None:
        tokens = chunks * TOKENS_PER_CHUNK
        out.append(Consequence(topic="qdrant", count=notes, step="reindex_qdrant" if "reindex_qdrant" in ids else None,
                               summary=f"Qdrant must be rebuilt (no snapshot of the same moment): {notes} note(s), "
                               f"{chunks} chunk(s), about {tokens} tokens to embed, about "
                               f"{tokens / EMBED_TOKENS_PER_SECOND / 60:.0f} min at {EMBED_TOKENS_PER_SECOND} tokens/s "
                               f"(estimate: {TOKENS_PER_CHUNK} tokens per chunk)"))  # fmt: skip
    if manifest.oban.by_state:
        out.append(Consequence(topic="oban", summary="Oban jobs come back as they were at the backup "
                               f"({manifest.oban.by_state}); an 'executing' row is rescued by the app's Lifeline"))
    return out
