"""The pure restore planner, on manifests built here: every verdict, the steps and the plan token."""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from engram_recovery.core.engram import crypto as engram_crypto
from engram_recovery.core.errors import ConfigurationError, UnsafeOperation
from engram_recovery.core.repository.manifest import (
    Artifact,
    AttachmentsInfo,
    CanaryInfo,
    DatabaseInfo,
    Manifest,
    ObanInfo,
    QdrantInfo,
)
from engram_recovery.core.repository.verify import Digest, compare
from engram_recovery.core.restore.plan import (
    InventoryState,
    KeyMaterial,
    LiveState,
    Observed,
    RestoreNeeds,
    RoleState,
    TargetState,
    ToolState,
    run_checks,
)
from engram_recovery.core.restore.steps import CommandContext, build_steps, consequences
from engram_recovery.core.restore.token import changed, open_plan_token, plan_token, premises_of, verify_plan_token
from engram_recovery.core.verdict import worst

KEY = secrets.token_bytes(32)
SUPERUSER = RoleState(name="postgres", superuser=True, bypass_rls=True, create_db=True, create_role=True)
STARTED = datetime(2026, 11, 20, 3, 0, tzinfo=UTC)


def canary_for(key: bytes) -> CanaryInfo:
    wrapped, sha = engram_crypto.make_canary(key)
    return CanaryInfo(present=True, id="0193-canary", wrapped_dek_b64=base64.b64encode(wrapped).decode(),
                      dek_sha256_hex=sha.hex(), wrap_format="v2")  # fmt: skip


def make_manifest(**changes: Any) -> Manifest:
    db = DatabaseInfo(
        name="engram", server_version="15.20", server_major=15, pg_dump_version="pg_dump (PostgreSQL) 15.20",
        dump_format="custom", engram_schema_version=20260816070000, role="postgres",
        row_counts={"users": 3, "notes": 120, "chunks": 240, "api_keys": 4}, roles_referenced=["engram_owner"],
    )  # fmt: skip
    data: dict[str, Any] = {
        "backup_id": "20261120T030000Z-abcd", "tool_version": "0.1.0", "started_at": STARTED,
        "finished_at": STARTED + timedelta(minutes=2), "database": db,
        "attachments": AttachmentsInfo(backend="database"), "canary": canary_for(KEY),
        "qdrant": QdrantInfo(configured=True), "oban": ObanInfo(),
        "artifacts": [Artifact(name="db.dump.zst.enc", kind="database", size=10, sha256="a" * 64)],
        "total_bytes": 10,
    }  # fmt: skip
    data.update(changes)
    return Manifest(**data)


def make_observed(manifest: Manifest, **changes: Any) -> Observed:
    artifacts = [compare(a.name, a.sha256, a.size, Digest(a.sha256, a.size)) for a in manifest.artifacts]
    base = Observed(
        manifest_sha256="m" * 64, artifacts=artifacts,
        keys=KeyMaterial(current=KEY, current_problem=None, previous=None),
        tools=ToolState(pg_restore_path="/usr/bin/pg_restore", pg_restore_major=15),
        target=TargetState(database="engram", host="127.0.0.1", port=5432, user="postgres", reachable=True,
                           server_version="15.20", server_major=15, exists=False,
                           roles_present=frozenset({"engram_owner"}), role=SUPERUSER),
        live=LiveState(reachable=False, problem="gone"), inventory=None, app_version="0.18.1",
        allow_non_empty_target=False, now=STARTED + timedelta(days=1),
    )  # fmt: skip
    return replace(base, **changes)


def by_name(observed: Observed, manifest: Manifest) -> dict[str, Any]:
    return {c.name: c for c in run_checks(manifest, observed)}


CTX = CommandContext(work_dir="/tmp/w", pg_restore="/usr/bin/pg_restore", repository="/backups",
                     repository_endpoint=None, storage_bucket="engram-attachments",
                     storage_endpoint="http://127.0.0.1:8333", qdrant_configured=True)  # fmt: skip


def test_a_sound_backup_passes_every_check() -> None:
    m = make_manifest()
    checks = run_checks(m, make_observed(m))
    assert worst([c.status for c in checks]) == "ok", [c.summary for c in checks if c.status != "ok"]


def test_the_right_key_is_confirmed_against_the_canary_offline() -> None:
    m = make_manifest()
    check = by_name(make_observed(m), m)["master_key"]
    assert (check.status, check.code) == ("ok", "ok")
    assert check.details["fingerprint"] == engram_crypto.key_fingerprint(KEY)


def test_a_wrong_key_fails_with_its_own_verdict() -> None:
    m = make_manifest()
    keys = KeyMaterial(current=secrets.token_bytes(32), current_problem=None, previous=None)
    check = by_name(make_observed(m, keys=keys), m)["master_key"]
    assert (check.status, check.code) == ("fail", "wrong_key")


def test_a_key_that_only_previous_opens_fails_as_previous_only() -> None:
    m = make_manifest()
    keys = KeyMaterial(current=secrets.token_bytes(32), current_problem=None, previous=KEY)
    check = by_name(make_observed(m, keys=keys), m)["master_key"]
    assert (check.status, check.code) == ("fail", "previous_key_only")
    assert "ENCRYPTION_MASTER_KEY_PREVIOUS" in check.summary


def test_a_kms_wrapped_canary_cannot_be_checked_offline_and_says_so() -> None:
    kms = CanaryInfo(present=True, id="c", wrapped_dek_b64=base64.b64encode(b"\xaa\x01" + b"x" * 60).decode(),
                     dek_sha256_hex="00" * 32)  # fmt: skip
    m = make_manifest(canary=kms)
    check = by_name(make_observed(m), m)["master_key"]
    assert (check.status, check.code) == ("warn", "kms_wrapped")


def test_an_empty_canary_table_is_flagged_loudly() -> None:
    m = make_manifest(canary=CanaryInfo(present=False))
    check = by_name(make_observed(m), m)["master_key"]
    assert (check.status, check.code) == ("warn", "canary_empty")
    assert "DANGER" in check.summary and "ANY master key" in check.summary


def test_a_missing_or_malformed_key_is_named() -> None:
    m = make_manifest()
    missing = by_name(make_observed(m, keys=KeyMaterial(None, None, None)), m)["master_key"]
    malformed = by_name(make_observed(m, keys=KeyMaterial(None, "ENCRYPTION_MASTER_KEY is malformed", None)), m)
    assert missing.code == "key_missing" and malformed["master_key"].code == "key_malformed"


def test_an_altered_artifact_fails_and_withholds_nothing_else() -> None:
    m = make_manifest()
    altered = [compare("db.dump.zst.enc", "a" * 64, 10, Digest("b" * 64, 10))]
    check = by_name(make_observed(m, artifacts=altered), m)["artifacts"]
    assert (check.status, check.code) == ("fail", "artifact_altered")
    gone = [compare("db.dump.zst.enc", "a" * 64, 10, None)]
    assert by_name(make_observed(m, artifacts=gone), m)["artifacts"].code == "artifact_missing"


def test_a_pg_restore_older_than_the_dump_fails() -> None:
    m = make_manifest()
    old = ToolState(pg_restore_path="/opt/pg9/pg_restore", pg_restore_major=9)
    check = by_name(make_observed(m, tools=old), m)["pg_restore"]
    assert (check.status, check.code) == ("fail", "pg_restore_too_old")
    assert "postgresql-client-15" in check.summary


def test_an_older_target_server_fails() -> None:
    m = make_manifest()
    target = replace(make_observed(m).target, server_major=14, server_version="14.9")
    assert by_name(make_observed(m, target=target), m)["target_server"].code == "target_server_too_old"


def test_app_versions_older_or_newer_than_the_schema_are_judged() -> None:
    newer_schema = make_manifest(database=make_manifest().database.model_copy(
        update={"engram_schema_version": 20260831030000}))  # fmt: skip
    assert by_name(make_observed(newer_schema), newer_schema)["app_version"].code == "app_too_old"
    older = make_manifest(database=make_manifest().database.model_copy(
        update={"engram_schema_version": 20260616130000}))  # fmt: skip
    check = by_name(make_observed(older), older)["app_version"]
    assert (check.status, check.code) == ("warn", "migrations_will_run")
    assert by_name(make_observed(older, app_version=None), older)["app_version"].code == "app_version_unknown"


def test_a_non_empty_target_needs_an_explicit_choice() -> None:
    m = make_manifest()
    full = replace(make_observed(m).target, exists=True, user_tables=30)
    refused = by_name(make_observed(m, target=full), m)["target"]
    assert (refused.status, refused.code) == ("fail", "target_not_empty")
    allowed_obs = make_observed(m, target=full, allow_non_empty_target=True)
    allowed = by_name(allowed_obs, m)["target"]
    assert (allowed.status, allowed.code) == ("warn", "target_will_be_replaced")
    steps = {s.id: s for s in build_steps(m, allowed_obs, CTX)}
    assert steps["replace_target"].commands[0].startswith("dropdb ")


def test_missing_roles_are_listed() -> None:
    m = make_manifest()
    target = replace(make_observed(m).target, roles_present=frozenset())
    check = by_name(make_observed(m, target=target), m)["roles"]
    assert (check.status, check.code) == ("fail", "roles_missing") and check.details["missing"] == ["engram_owner"]


def test_an_s3_backup_needs_its_inventory_and_every_blob() -> None:
    m = make_manifest(attachments=AttachmentsInfo(backend="s3", source_bucket="b", inventory="inv.jsonl"))
    assert by_name(make_observed(m, inventory=InventoryState(present=False)), m)["attachments"].code == (
        "inventory_missing"
    )
    holes = InventoryState(present=True, objects=3, missing=["attachments/pool/x"], missing_count=1)
    assert by_name(make_observed(m, inventory=holes), m)["attachments"].code == "inventory_objects_missing"
    full = InventoryState(present=True, objects=1, entries=[("u/v/objects/a", "attachments/pool/aa/h/e", None)])
    observed = make_observed(m, inventory=full)
    assert by_name(observed, m)["attachments"].status == "ok"
    step = {s.id: s for s in build_steps(m, observed, CTX)}["restore_attachments"]
    assert step.commands == [
        "aws s3 cp /backups/attachments/pool/aa/h/e s3://engram-attachments/u/v/objects/a --endpoint-url http://127.0.0.1:8333"
    ]


def test_rpo_counts_the_writes_after_the_backup() -> None:
    m = make_manifest()
    live = LiveState(reachable=True, newest_write=STARTED + timedelta(hours=5))
    check = by_name(make_observed(m, live=live), m)["rpo"]
    assert (check.status, check.code) == ("warn", "data_lost") and check.details["lost_seconds"] == 5 * 3600


def test_steps_are_ordered_and_carry_the_security_fixes_from_the_live_database() -> None:
    m = make_manifest()
    revoked = "0193a000-0000-7000-8000-000000000001"
    live = LiveState(
        reachable=True, newest_write=STARTED, tokens_issued_after={"refresh_tokens": 2}, users_signing_in_again=1,
        revoked_after={"refresh_tokens": [revoked]}, api_key_ids=[KEPT], api_keys_created_after=0,
        vault_seqs={"0193a000-0000-7000-8000-0000000000aa": 42}, newer_users=["u1"],
    )  # fmt: skip
    observed = make_observed(m, live=live)
    steps = build_steps(m, observed, CTX)
    ids = [s.id for s in steps]
    assert ids[:5] == ["stop_app", "create_target", "decrypt_database", "restore_database", "check_database"]
    assert ids.index("revoke_tokens") < ids.index("boot_app") and ids.index("fence_sync") < ids.index("boot_app")
    assert [s.order for s in steps] == list(range(1, len(steps) + 1))
    sql = {s.id: s for s in steps}
    assert revoked in sql["revoke_tokens"].commands[0] and "DELETE FROM api_keys" in sql["revoke_tokens"].commands[0]
    assert KEPT in sql["revoke_tokens"].commands[0]
    assert "42::bigint" in sql["fence_sync"].commands[0]
    topics = {c.topic: c for c in consequences(m, observed, steps)}
    assert topics["sign_in_again"].count == 1
    assert topics["revoked_come_back"].count == 1 + 3  # one token, and three of the backup's four keys were deleted
    assert topics["orphan_sweep"].count == 1 and topics["qdrant"].count == 120


KEPT = "0193a000-0000-7000-8000-0000000000b1"


@pytest.mark.parametrize("unchecked", [False, True])
def test_no_statement_and_no_count_comes_from_an_empty_or_incomplete_read(unchecked: bool) -> None:
    m = make_manifest(database=make_manifest().database.model_copy(update={"engram_schema_version": 20260816070000}))
    why = {"api_keys": "cannot check api_keys: permission denied", "vault_seqs": "cannot check vault_seqs: denied",
           "newest_write": "cannot check newest_write: denied"} if unchecked else {}
    live = LiveState(reachable=True, newest_write=None, api_key_ids=None if unchecked else [],
                     api_keys_created_after=None if unchecked else 0, vault_seqs=None if unchecked else {},
                     newer_users=[], unchecked=why)  # fmt: skip
    observed = make_observed(m, live=live)
    steps = {s.id: s for s in build_steps(m, observed, CTX)}
    assert "revoke_tokens" not in steps  # nothing else to revoke, and no DELETE derived from an empty read
    assert not any("DELETE FROM api_keys" in c for s in steps.values() for c in s.commands)
    assert "unreachable" not in " ".join(steps["fence_sync"].cannot_check)
    topics = {c.topic: c for c in consequences(m, observed, list(steps.values()))}
    came_back = topics["revoked_come_back"]
    assert came_back.count == 0 and ("cannot be counted" if unchecked else "derives no statement") in came_back.summary
    rpo = by_name(observed, m)["rpo"]
    assert (rpo.status, rpo.code) == (("warn", "cannot_check") if unchecked else ("ok", "nothing_lost"))


def test_commands_never_carry_a_password_or_key() -> None:
    m = make_manifest()
    text = " ".join(c for s in build_steps(m, make_observed(m), CTX) for c in s.commands)
    assert base64.b64encode(KEY).decode() not in text and "PGPASSWORD" not in text and "password=" not in text


def test_the_plan_token_is_bound_to_its_premises() -> None:
    m = make_manifest()
    observed = make_observed(m)
    premises = premises_of(m, observed)
    token = plan_token(premises, KEY)
    assert verify_plan_token(token, premises_of(m, make_observed(m)), KEY)
    changed_target = premises_of(m, make_observed(m, target=replace(observed.target, exists=True, user_tables=2)))
    assert not verify_plan_token(token, changed_target, KEY)
    other_key = KeyMaterial(current=secrets.token_bytes(32), current_problem=None, previous=None)
    assert not verify_plan_token(token, premises_of(m, make_observed(m, keys=other_key)), KEY)
    assert not verify_plan_token(token, premises.model_copy(update={"manifest_sha256": "x" * 64}), KEY)
    assert not verify_plan_token(token, premises, secrets.token_bytes(32))


def test_the_plan_token_carries_its_premises_sealed_by_the_master_key() -> None:
    m = make_manifest()
    premises = premises_of(m, make_observed(m), "/work/restore")
    token = plan_token(premises, KEY)
    assert open_plan_token(token, KEY) == premises and premises.work_dir == "/work/restore"
    head, payload, mac = token.split(".")
    forged = premises.model_copy(update={"target_database": "elsewhere", "allow_non_empty_target": True})
    other_payload = plan_token(forged, secrets.token_bytes(32)).split(".")[1]
    with pytest.raises(UnsafeOperation, match="not issued under this ENCRYPTION_MASTER_KEY, or was altered"):
        open_plan_token(f"{head}.{other_payload}.{mac}", KEY)  # other premises under the old MAC
    with pytest.raises(UnsafeOperation):
        open_plan_token(token, secrets.token_bytes(32))
    with pytest.raises(ConfigurationError, match="issued without a master key"):
        open_plan_token(plan_token(premises, None), KEY)
    with pytest.raises(ConfigurationError, match="re-plan"):
        open_plan_token("ptk1.m." + "ab" * 32, KEY)
    assert changed(premises, forged) == ["target_database: 'engram' -> 'elsewhere'",
                                         "allow_non_empty_target: False -> True"]  # fmt: skip
    assert changed(premises, forged, ignore=frozenset({"target_database", "allow_non_empty_target"})) == []


@pytest.mark.parametrize("digest", [hashlib.sha256(b"").hexdigest()])
def test_compare_accepts_a_matching_digest(digest: str) -> None:
    assert compare("x", digest, 0, Digest(digest, 0)).ok


def test_a_versioned_source_bucket_names_the_versions_to_restore() -> None:
    m = make_manifest(attachments=AttachmentsInfo(backend="s3", source_bucket="b", source_versioned=True,
                                                  inventory="inv.jsonl"))  # fmt: skip
    inventory = InventoryState(present=True, objects=1, entries=[("u/v/objects/a", "attachments/pool/aa/h/e", "v7")])
    observed = make_observed(m, inventory=inventory)
    assert by_name(observed, m)["attachments"].details["versions_to_restore"] == {"u/v/objects/a": "v7"}
    step = {s.id: s for s in build_steps(m, observed, CTX)}["restore_attachments_in_place"]
    assert step.optional and step.commands == [
        "aws s3api copy-object --bucket b --key u/v/objects/a --copy-source 'b/u/v/objects/a?versionId=v7' "
        "--endpoint-url http://127.0.0.1:8333"
    ]


def test_blobs_in_an_s3_repository_are_copied_server_side_or_through_a_file_never_a_pipe() -> None:
    m = make_manifest(attachments=AttachmentsInfo(backend="s3", source_bucket="b", inventory="inv.jsonl"))
    inventory = InventoryState(present=True, objects=1, entries=[("u/v/objects/a", "attachments/pool/aa/h/e", None)])
    same = replace(CTX, repository="s3://backups/engram", repository_endpoint="http://127.0.0.1:8333")
    step = {s.id: s for s in build_steps(m, make_observed(m, inventory=inventory), same)}["restore_attachments"]
    assert step.commands == ["aws s3 cp s3://backups/engram/attachments/pool/aa/h/e s3://engram-attachments/u/v/"
                             "objects/a --endpoint-url http://127.0.0.1:8333"]
    other = replace(same, repository_endpoint="https://s3.example.org")
    step = {s.id: s for s in build_steps(m, make_observed(m, inventory=inventory), other)}["restore_attachments"]
    assert "|" not in step.commands[0] and step.commands[0].count("&&") == 2


def test_the_tools_own_commands_spell_its_path_and_settings_but_never_a_secret() -> None:
    m = make_manifest()
    ctx = replace(CTX, tool=("/opt/er/bin/engram-recovery",), env_file="/srv/engram/.env",
                  environment=(("ENGRAM_RECOVERY_BACKUP_KEY", None), ("ENGRAM_RECOVERY_REPOSITORY_REGION", "eu-west-1"),
                               ("QDRANT_API_KEY_FILE", "/run/secrets/qdrant")))  # fmt: skip
    steps = {s.id: s for s in build_steps(m, make_observed(m), ctx)}
    decrypt = steps["decrypt_database"]
    assert "ENGRAM_RECOVERY_REPOSITORY_REGION=eu-west-1 /opt/er/bin/engram-recovery --env-file /srv/engram/.env " \
        "decrypt backup:" in decrypt.commands[-1]
    assert "ENGRAM_RECOVERY_BACKUP_KEY" not in decrypt.commands[-1].replace("ENGRAM_RECOVERY_REPOSITORY", "")
    assert any("ENGRAM_RECOVERY_BACKUP_KEY came from this tool's environment" in c for c in decrypt.cannot_check)
    reindex = steps["reindex_qdrant"].commands[0]
    assert reindex.startswith("QDRANT_API_KEY_FILE=/run/secrets/qdrant /opt/er/bin/engram-recovery --env-file ")


def test_what_the_restoring_role_may_not_do_is_named_before_the_plan_calls_itself_executable() -> None:
    m = make_manifest(database=make_manifest().database.model_copy(update={
        "owner": "engram_owner", "object_owners": ["engram_owner"], "extensions": ["pg_stat_statements"],
        "row_security_tables": ["notes"]}))  # fmt: skip
    plain = RoleState(name="restorer", superuser=False, bypass_rls=False, create_db=False, create_role=False)
    target = replace(make_observed(m).target, role=plain, roles_needed=("engram_owner", "engram_app"),
                     extensions_superuser_only=frozenset({"pg_stat_statements"}))  # fmt: skip
    observed = make_observed(m, target=target, needs=RestoreNeeds("engram_owner", ("engram_owner",),
                                                                  ("pg_stat_statements",), ("notes",)))
    check = by_name(observed, m)["restore_role"]
    assert check.status == "fail" and set(check.details["problems"]) == {
        "extension_needs_superuser", "row_security_blocks_restore", "cannot_set_owner", "cannot_create_roles",
        "cannot_create_database"}  # fmt: skip
    able = replace(plain, bypass_rls=True, create_db=True, create_role=True, member_of=frozenset({"engram_owner"}))
    fine = make_observed(m, target=replace(target, role=able, extensions_superuser_only=frozenset(),
                                           roles_present=frozenset({"engram_owner", "engram_app"})),
                         needs=observed.needs)  # fmt: skip
    assert by_name(fine, m)["restore_role"].status == "ok"
    steps = {s.id: s for s in build_steps(m, fine, CTX)}
    assert "-O engram_owner" in steps["create_target"].commands[0]
