"""Turning a manifest plus the observed state into a verified restore plan: pure, no I/O.

core/restore/observe.py gathers the observed state (hashes, versions, the target,
the live database); this module judges it and writes the ordered steps with
their exact commands (core/restore/steps.py). A plan whose verification fails
offers no executable steps: the operator fixes the cause first.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from ..engram import crypto as engram_crypto
from ..engram import keys as key_rules
from ..repository.manifest import MANIFEST_FORMAT, Manifest
from ..repository.verify import ArtifactVerdict
from ..verdict import Verdict

# The newest Engram migration each release ships: the app runs every migration it
# knows at boot, before its canary check, and cannot run against a newer schema.
KNOWN_RELEASES: dict[str, int] = {"0.18.1": 20260816070000}
# The migration that added vaults.change_seq (the Obsidian sync cursor head).
CHANGE_SEQ_MIGRATION = 20260616120000


class PlanCheck(BaseModel):
    name: str
    status: Verdict
    code: str = Field(description="Machine-readable verdict, e.g. 'wrong_key', 'target_not_empty'.")
    summary: str
    details: dict[str, Any] = Field(default_factory=dict)


class PlanStep(BaseModel):
    order: int
    id: str
    title: str
    commands: list[str] = Field(description="Exact shell commands, in order; secrets come from the environment.")
    expect: str | None = Field(default=None, description="What a successful run prints or leaves behind.")
    checked: list[str] = Field(default_factory=list, description="Checks already run that cover this step.")
    cannot_check: list[str] = Field(default_factory=list, description="What this plan could not verify in advance.")
    optional: bool = False


class Consequence(BaseModel):
    topic: str
    summary: str
    count: int | None = None
    step: str | None = Field(default=None, description="The step that deals with it, if any.")


@dataclass(frozen=True)
class KeyMaterial:
    """The keys available to the tool (never serialised; only fingerprints leave this module)."""

    current: bytes | None
    current_problem: str | None
    previous: bytes | None
    key_provider: str = "local"


@dataclass(frozen=True)
class ToolState:
    pg_restore_path: str | None
    pg_restore_major: int | None
    problem: str | None = None
    fix: str | None = None  # what works on this host (core/stores/pgclient/versions.py), when no pg_restore fits


@dataclass(frozen=True)
class RestoreNeeds:
    """What restoring this dump asks of the restoring role; None where neither manifest nor dump says."""

    owner: str | None  # the source database's owner: the restored database gets the same
    object_owners: tuple[str, ...] | None
    extensions: tuple[str, ...] | None
    row_security_tables: tuple[str, ...] | None


@dataclass(frozen=True)
class RoleState:
    """The role the plan's commands connect as, and what the server lets it do."""

    name: str
    superuser: bool
    bypass_rls: bool
    create_db: bool
    create_role: bool
    member_of: frozenset[str] = frozenset()  # of the roles the dump names: those it may act as


@dataclass(frozen=True)
class PlanRequest:
    """What plan_restore was asked (the tool's input, validated)."""

    recovery_point: str = "latest"
    target_database: str | None = None
    app_version: str | None = None
    allow_non_empty_target: bool = False
    work_dir: str = "engram-restore"


@dataclass(frozen=True)
class TargetState:
    database: str
    host: str | None
    port: int | None
    user: str | None
    reachable: bool
    problem: str | None = None
    server_version: str | None = None
    server_major: int | None = None
    exists: bool | None = None
    user_tables: int | None = None
    active_connections: int | None = None
    roles_present: frozenset[str] = frozenset()
    roles_needed: tuple[str, ...] = ()  # from the manifest, else from the dump's table of contents
    is_live: bool = False
    role: RoleState | None = None
    extensions_superuser_only: frozenset[str] = frozenset()  # the dump creates them; only a superuser can
    extensions_unavailable: frozenset[str] = frozenset()  # the dump creates them; the server does not have them

    @property
    def state(self) -> str:
        if not self.reachable:
            return "unreachable"
        if not self.exists:
            return "absent"
        return "empty" if not self.user_tables else f"non_empty:{self.user_tables}"


@dataclass(frozen=True)
class LiveState:
    """The configured (live) database as it is now; after a disaster it is often gone."""

    reachable: bool
    problem: str | None = None
    newest_write: datetime | None = None
    tokens_issued_after: dict[str, int] = field(default_factory=dict)
    users_signing_in_again: int | None = None
    revoked_after: dict[str, list[str]] = field(default_factory=dict)
    api_key_ids: list[str] | None = None
    api_keys_created_after: int | None = None
    vault_seqs: dict[str, int] | None = None
    newer_users: list[str] | None = None
    read_as: str | None = None  # how the rows were read (every row, or per tenant under row-level security)
    unchecked: dict[str, str] = field(default_factory=dict)  # what could not be read completely, and why

    def knows(self, what: str) -> bool:
        """The live database was read, and `what` (newest_write, tokens, api_keys, vault_seqs) completely."""
        return self.reachable and what not in self.unchecked


@dataclass(frozen=True)
class InventoryState:
    present: bool
    objects: int = 0
    missing: list[str] = field(default_factory=list)
    missing_count: int = 0
    entries: list[tuple[str, str, str | None]] = field(default_factory=list)  # (key, repo_key, version_id)
    problem: str | None = None
    checked_by: str = "size only"  # how the blobs were checked: by content, or (older inventories) size only


@dataclass(frozen=True)
class Observed:
    manifest_sha256: str
    artifacts: Sequence[ArtifactVerdict]
    keys: KeyMaterial
    tools: ToolState
    target: TargetState
    live: LiveState
    inventory: InventoryState | None
    app_version: str | None
    allow_non_empty_target: bool
    now: datetime
    # Top-level prefixes of the live attachments bucket that the backup's inventory does not know.
    bucket_unknown_prefixes: list[str] | None = None
    needs: RestoreNeeds = RestoreNeeds(None, None, None, None)

    @property
    def users_at_risk(self) -> list[str]:
        """Users whose blobs OrphanSweep would delete: exact from the live database, else guessed from the bucket."""
        if self.live.reachable:
            return self.live.newer_users or []
        return self.bucket_unknown_prefixes or []


def _check(name: str, status: Verdict, code: str, summary: str, **details: Any) -> PlanCheck:
    return PlanCheck(name=name, status=status, code=code, summary=summary, details=details)


def check_manifest(manifest: Manifest, observed: Observed) -> PlanCheck:
    details = {"backup_id": manifest.backup_id, "manifest_sha256": observed.manifest_sha256}
    if manifest.format != MANIFEST_FORMAT:
        return _check("manifest", "fail", "manifest_format",
                      f"the manifest has format {manifest.format!r}; this tool reads {MANIFEST_FORMAT!r}: "
                      "use the engram-recovery version that wrote the backup", **details)  # fmt: skip
    if manifest.verified is False:
        return _check("manifest", "warn", "manifest_unverified",
                      "the backup's own read-back verification failed when it was written; the artifacts were "
                      "re-hashed now (see 'artifacts')", **details)  # fmt: skip
    return _check("manifest", "ok", "ok", f"manifest of {manifest.backup_id} is readable", **details)


def check_artifacts(observed: Observed) -> PlanCheck:
    bad = [a for a in observed.artifacts if not a.ok]
    details = {"artifacts": [{"name": a.name, "ok": a.ok, "size": a.actual_size} for a in observed.artifacts]}
    if bad:
        code = "artifact_missing" if any(a.actual_sha256 is None for a in bad) else "artifact_altered"
        return _check("artifacts", "fail", code, "; ".join(a.problem or "" for a in bad), **details)
    total = sum(a.expected_size for a in observed.artifacts)
    return _check("artifacts", "ok", "ok",
                  f"all {len(observed.artifacts)} artifact(s) ({total} bytes) match their recorded SHA-256",
                  **details)  # fmt: skip


def check_key(manifest: Manifest, keys: KeyMaterial) -> PlanCheck:
    """The master key against the canary recorded in the manifest, with no database at all."""
    canary = manifest.canary
    if keys.current is None:
        return _check("master_key", "fail", "key_missing" if keys.current_problem is None else "key_malformed",
                      keys.current_problem or "ENCRYPTION_MASTER_KEY is not available to this tool: set "
                      "ENCRYPTION_MASTER_KEY or ENCRYPTION_MASTER_KEY_FILE to the key Engram ran with")  # fmt: skip
    fingerprint = engram_crypto.key_fingerprint(keys.current)
    details: dict[str, Any] = {"fingerprint": fingerprint, "backup_key_fingerprint": manifest.master_key_fingerprint}
    if not canary.present or not canary.wrapped_dek_b64 or not canary.dek_sha256_hex:
        return _check("master_key", "warn", "canary_empty",
                      "DANGER: system_canaries was EMPTY in this backup, so the key cannot be checked offline, and "
                      "Engram would silently adopt ANY master key at boot, making every row unreadable with the real "
                      "one. Run restore_drill on this backup (it decrypts real rows with the key) before booting",
                      **details)  # fmt: skip
    judged = key_rules.judge_canary(keys.current, keys.previous, _b64(canary.wrapped_dek_b64),
                                    bytes.fromhex(canary.dek_sha256_hex), what="the backup's boot canary")
    details |= judged.details
    hint = {"kms_wrapped": " before booting", "canary_corrupt": " (the manifest is damaged): choose another recovery "
            "point", "wrong_key": (f" (the backup was written with key {manifest.master_key_fingerprint})"
                                   if manifest.master_key_fingerprint else "") + ". Find the right key first"}
    return _check("master_key", judged.status, judged.code, judged.summary + hint.get(judged.code, ""), **details)


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


def dump_major(manifest: Manifest) -> int | None:
    match = re.search(r"(\d+)(?:\.\d+)?", manifest.database.pg_dump_version)
    return int(match.group(1)) if match else None


def check_versions(manifest: Manifest, observed: Observed) -> list[PlanCheck]:
    checks: list[PlanCheck] = []
    tools, target, db = observed.tools, observed.target, manifest.database
    needed = dump_major(manifest)
    if tools.pg_restore_major is None:
        checks.append(_check("pg_restore", "fail", "pg_restore_missing",
                             (tools.problem or "pg_restore was not found") + ": "
                             + (tools.fix or "install a PostgreSQL client or set ENGRAM_RECOVERY_PG_RESTORE")))
    elif needed is not None and tools.pg_restore_major < needed:
        checks.append(_check("pg_restore", "fail", "pg_restore_too_old",
                             f"pg_restore {tools.pg_restore_major} ({tools.pg_restore_path}) cannot read a dump "
                             f"written by pg_dump {needed}: " + (tools.fix or f"install postgresql-client-{needed} "
                             "(or newer) and point ENGRAM_RECOVERY_PG_RESTORE at it"), path=tools.pg_restore_path,
                             major=tools.pg_restore_major, dump_major=needed))  # fmt: skip
    else:
        checks.append(_check("pg_restore", "ok", "ok",
                             f"pg_restore {tools.pg_restore_major} reads dumps of pg_dump {needed}",
                             path=tools.pg_restore_path, major=tools.pg_restore_major))  # fmt: skip
    if target.server_major is not None:
        if target.server_major < db.server_major:
            checks.append(_check("target_server", "fail", "target_server_too_old",
                                 f"the target server is PostgreSQL {target.server_major} but the backup comes from "
                                 f"{db.server_major}: restore into PostgreSQL {db.server_major} or newer"))  # fmt: skip
        else:
            note = "" if target.server_major == db.server_major else " (a newer major: supported by pg_restore)"
            checks.append(_check("target_server", "ok", "ok",
                                 f"target PostgreSQL {target.server_version} can take a dump of "
                                 f"{db.server_version}{note}"))  # fmt: skip
    checks.append(_check_app_version(manifest, observed.app_version))
    return checks


def _check_app_version(manifest: Manifest, app_version: str | None) -> PlanCheck:
    schema = manifest.database.engram_schema_version
    details = {"backup_schema_version": schema, "app_version": app_version}
    if app_version is None:
        return _check("app_version", "warn", "app_version_unknown",
                      f"no app version given: the backup's schema is at migration {schema}. Engram runs its "
                      "migrations at boot BEFORE its canary check; pass app_version to check compatibility",
                      **details)  # fmt: skip
    newest = KNOWN_RELEASES.get(app_version.removeprefix("v"))
    if newest is None or schema is None:
        return _check("app_version", "warn", "app_version_unchecked",
                      f"cannot tell which migrations Engram {app_version} ships (known: "
                      f"{', '.join(KNOWN_RELEASES)}); make sure it is at least the release that wrote migration "
                      f"{schema}", **details)  # fmt: skip
    details["app_newest_migration"] = newest
    if schema > newest:
        return _check("app_version", "fail", "app_too_old",
                      f"the backup's schema is at migration {schema}, newer than Engram {app_version} knows "
                      f"({newest}): boot the release that wrote this backup or a newer one", **details)  # fmt: skip
    if schema < newest:
        return _check("app_version", "warn", "migrations_will_run",
                      f"Engram {app_version} will migrate the restored schema from {schema} to {newest} at boot, "
                      "before its canary check: the key was verified offline here; a migrated database can only "
                      "be undone by restoring again", **details)  # fmt: skip
    return _check("app_version", "ok", "ok", f"Engram {app_version} matches the backup's schema ({schema})",
                  **details)  # fmt: skip


def check_target_database(target: TargetState, allow_non_empty_target: bool) -> list[PlanCheck]:
    """The target database: reachable, absent or empty (or chosen to be replaced), nothing connected to it."""
    if not target.reachable:
        return [_check("target", "fail", "target_unreachable",
                       f"the target server is unreachable: {target.problem}: start it or fix DATABASE_URL")]
    checks: list[PlanCheck] = []
    where = f"database {target.database!r}"
    if not target.exists:
        checks.append(_check("target", "ok", "target_absent", f"{where} does not exist: the plan creates it"))
    elif not target.user_tables:
        checks.append(_check("target", "ok", "target_empty", f"{where} exists and is empty"))
    elif not allow_non_empty_target:
        checks.append(_check("target", "fail", "target_not_empty",
                             f"{where} is not empty ({target.user_tables} tables): restoring over it destroys what "
                             "it holds. Choose an empty target database, or pass allow_non_empty_target=true to "
                             "drop and re-create it", tables=target.user_tables))  # fmt: skip
    else:
        checks.append(_check("target", "warn", "target_will_be_replaced",
                             f"{where} holds {target.user_tables} tables and will be DROPPED and re-created "
                             "(allow_non_empty_target=true)", tables=target.user_tables))  # fmt: skip
    if target.exists and target.active_connections:
        checks.append(_check("target_sessions", "warn", "target_in_use",
                             f"{target.active_connections} other session(s) are connected to {where}: stop Engram "
                             "before restoring", sessions=target.active_connections))  # fmt: skip
    return checks


def check_target(manifest: Manifest, observed: Observed) -> list[PlanCheck]:
    target = observed.target
    checks = check_target_database(target, observed.allow_non_empty_target)
    if not target.reachable:
        return checks
    needed = sorted(set(manifest.database.roles_referenced) | set(target.roles_needed))
    missing = [r for r in needed if r not in target.roles_present]
    if missing:
        checks.append(_check("roles", "fail", "roles_missing",
                             f"the dump names role(s) the target server lacks: {', '.join(missing)}. Create them "
                             "first (e.g. " + "; ".join(f"CREATE ROLE {r}" for r in missing)
                             + ") with the attributes they had", missing=missing))  # fmt: skip
    else:
        checks.append(_check("roles", "ok", "ok",
                             f"every role the dump names exists: {', '.join(needed) or '(none recorded)'}"))
    return checks


def check_restore_role(observed: Observed) -> PlanCheck:
    """Can the role the commands connect as do every step? Found now, not half-way through pg_restore."""
    target, needs = observed.target, observed.needs
    role = target.role
    if role is None:
        return _check("restore_role", "fail", "restore_role_unknown",
                      "what the restoring role may do could not be read: the target server is unreachable")
    if role.superuser:
        return _check("restore_role", "ok", "ok", f"role {role.name} is a superuser: it can create the database, "
                      "its extensions and its owners' objects, and restore rows under row-level security")
    problems: list[tuple[str, str]] = []
    unknown: list[str] = []
    if target.extensions_unavailable:
        names = ", ".join(sorted(target.extensions_unavailable))
        problems.append(("extension_unavailable", f"the dump creates extension(s) {names} that the target server "
                         "does not have: install them first"))
    if target.extensions_superuser_only:
        names = ", ".join(sorted(target.extensions_superuser_only))
        problems.append(("extension_needs_superuser", f"the dump creates extension(s) {names}, which only a "
                         "superuser may create (created beforehand, pg_restore's COMMENT ON EXTENSION still needs "
                         "their owner): restore as a superuser"))
    if needs.extensions is None:
        unknown.append("the extensions the dump creates (not recorded by this backup)")
    secured = needs.row_security_tables
    # Engram forces row-level security on its tenant tables: unrecorded means "assume it has them".
    if not role.bypass_rls and (secured is None or secured):
        what = f"{len(secured)} table(s)" if secured else "tables"
        problems.append(("row_security_blocks_restore", f"role {role.name} is neither superuser nor BYPASSRLS: "
                         f"pg_restore cannot load the rows of the dump's {what} under row-level security "
                         f"(ALTER ROLE {role.name} BYPASSRLS, or restore as a superuser)"))
    owners = set(needs.object_owners or ()) | ({needs.owner} if needs.owner else set())
    foreign = sorted(o for o in owners if o != role.name and o not in role.member_of and o in target.roles_present)
    if foreign:
        problems.append(("cannot_set_owner", f"role {role.name} is not a member of {', '.join(foreign)}, which own "
                         f"the dump's objects or database: pg_restore cannot give them back their owner (GRANT "
                         f"{', '.join(foreign)} TO {role.name}, or restore as a superuser)"))
    if needs.object_owners is None:
        unknown.append("which roles own the dump's objects (not recorded by this backup)")
    absent = sorted(r for r in set(target.roles_needed) if r not in target.roles_present)
    if absent and not role.create_role:
        problems.append(("cannot_create_roles", f"role {role.name} may not create roles (CREATEROLE), and the dump "
                         f"needs {', '.join(absent)}: have a superuser create them first"))
    if not target.exists and not role.create_db:
        problems.append(("cannot_create_database", f"role {role.name} may not create databases (CREATEDB) and "
                         f"{target.database!r} does not exist: create it as {needs.owner or 'its owner'} first"))
    details: dict[str, Any] = {"role": role.name, "bypass_rls": role.bypass_rls, "create_db": role.create_db,
                               "unchecked": unknown}  # fmt: skip
    if problems:
        return _check("restore_role", "fail", problems[0][0], "; ".join(text for _code, text in problems),
                      problems=[code for code, _text in problems], **details)  # fmt: skip
    if unknown:
        return _check("restore_role", "warn", "restore_role_unchecked", f"role {role.name} is not a superuser and "
                      f"this plan cannot check {'; '.join(unknown)}: a restore step may fail half-way", **details)
    return _check("restore_role", "ok", "ok", f"role {role.name} (not a superuser) may do every step: BYPASSRLS, "
                  "no superuser-only extension, member of every owner", **details)  # fmt: skip


def check_inventory(manifest: Manifest, inventory: InventoryState | None) -> PlanCheck:
    checked = _check_inventory(manifest, inventory)
    att = manifest.attachments
    if checked.status == "fail" or not att.lacking:
        if att.lacking is None and checked.status != "fail":
            checked.summary += "; whether live attachments lacked a blob at backup time was not recorded"
        return checked
    checked.details |= {"lacking": att.lacking, "lacking_keys": att.lacking_keys}
    checked.summary += (f"; but this backup lacks {att.lacking} live attachment(s): their blobs were already missing "
                        f"at the source when it was taken (e.g. {', '.join(att.lacking_keys[:3])})")
    return checked.model_copy(update={"status": "warn", "code": "attachments_lacking"})


def _check_inventory(manifest: Manifest, inventory: InventoryState | None) -> PlanCheck:
    att = manifest.attachments
    if att.backend == "database":
        return _check("attachments", "ok", "in_database",
                      "attachments are stored in PostgreSQL (storage_objects): the database dump restores them")
    if inventory is None or not inventory.present:
        return _check("attachments", "fail", "inventory_missing",
                      (inventory.problem if inventory and inventory.problem else
                       "the backup records no attachments inventory")
                      + ": the bucket's blobs cannot be restored from this recovery point")  # fmt: skip
    if inventory.missing_count:
        return _check("attachments", "fail", "inventory_objects_missing",
                      f"{inventory.missing_count} of {inventory.objects} mirrored blob(s) the inventory names are "
                      f"missing from the repository or do not match it (e.g. {'; '.join(inventory.missing[:3])}): "
                      "those attachments cannot be restored; choose another recovery point",
                      missing=inventory.missing[:20], checked_by=inventory.checked_by)  # fmt: skip
    versions = {key: version for key, _repo_key, version in inventory.entries if version}
    versioned = (f" (source bucket versioned: {len(versions)} version id(s) recorded, restorable in place too)"
                 if att.source_versioned else "")
    return _check("attachments", "ok", "ok",
                  f"all {inventory.objects} blob(s) of the inventory are in the repository, checked by "
                  f"{inventory.checked_by}{versioned}", checked_by=inventory.checked_by,
                  versions_to_restore=dict(list(versions.items())[:50]), versions_recorded=len(versions))


def snapshot_time(manifest: Manifest) -> datetime:
    """The moment the backup's data is from: the snapshot, which the backup's start only approximates."""
    return manifest.database.snapshot_at or manifest.started_at


def check_rpo(manifest: Manifest, live: LiveState) -> PlanCheck:
    point = snapshot_time(manifest)
    if not live.reachable:
        return _check("rpo", "ok", "live_unreachable",
                      f"the live database is unreachable, so the loss cannot be measured: everything written after "
                      f"{point.isoformat()} is lost", backup_time=point.isoformat())  # fmt: skip
    if not live.knows("newest_write"):
        return _check("rpo", "warn", "cannot_check",
                      f"{live.unchecked['newest_write']}: how much written after {point.isoformat()} would be lost is "
                      "unknown. Plan as a superuser or a role with BYPASSRLS to measure it",
                      backup_time=point.isoformat())  # fmt: skip
    # Engram's timestamps have whole seconds: a write in the backup's own second may be after it.
    if live.newest_write is None or live.newest_write < point.replace(microsecond=0):
        return _check("rpo", "ok", "nothing_lost",
                      "the live database has no write newer than the backup: nothing would be lost",
                      backup_time=point.isoformat())  # fmt: skip
    lost = max((live.newest_write - point).total_seconds(), 0.0)
    return _check("rpo", "warn", "data_lost",
                  f"writes from {point.isoformat()} to {live.newest_write.isoformat()} ({lost / 3600:.1f} h) "
                  "would be lost", lost_seconds=round(lost, 1), backup_time=point.isoformat(),
                  newest_write=live.newest_write.isoformat())  # fmt: skip


def run_checks(manifest: Manifest, observed: Observed) -> list[PlanCheck]:
    return [
        check_manifest(manifest, observed),
        check_artifacts(observed),
        check_key(manifest, observed.keys),
        *check_versions(manifest, observed),
        *check_target(manifest, observed),
        *([check_restore_role(observed)] if observed.target.reachable else []),
        check_inventory(manifest, observed.inventory),
        check_rpo(manifest, observed.live),
    ]
