"""list_backups: the catalog of a real repository, through the MCP client, checked against run_backup's own pruning.

Real backups of the test bed (real PostgreSQL, pg_dump, encryption); retention
decisions compared with what run_backup then actually deletes.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from support import EngramDB, backup, engram_env

from engram_recovery.core.errors import IntegrityError
from engram_recovery.core.progress import silent
from engram_recovery.core.repository.manifest import Manifest
from engram_recovery.core.runtime import Runtime
from engram_recovery.core.settings import load_settings
from engram_recovery.server.app import build_server
from engram_recovery.tools.backup_status import BackupStatusInput, backup_status
from engram_recovery.tools.restore_drill import RestoreDrillInput, restore_drill

BACKUP_KEY = base64.b64encode(secrets.token_bytes(32)).decode()
KEEP_TWO = {"ENGRAM_RECOVERY_KEEP_LAST": "2", "ENGRAM_RECOVERY_KEEP_DAILY": "0",
            "ENGRAM_RECOVERY_KEEP_WEEKLY": "0", "ENGRAM_RECOVERY_KEEP_MONTHLY": "0"}  # fmt: skip


async def catalog(env: dict[str, str]) -> dict[str, Any]:
    async with Client(build_server(load_settings(environ=env))) as client:
        answer = await client.call_tool("list_backups", {})
    assert not answer.is_error, answer.content
    content: dict[str, Any] | None = answer.structured_content
    assert content is not None
    return content


@pytest.mark.anyio
async def test_an_empty_repository_lists_nothing_and_says_to_run_a_backup(engram_db: EngramDB, tmp_path: Path) -> None:
    result = await catalog(engram_env(engram_db, tmp_path))
    assert result["backups"] == [] and result["complete"] == 0 and result["total_bytes"] == 0
    assert result["summary"].startswith("no backups yet")
    assert result["repository"] == str(tmp_path / "repo")


@pytest.mark.anyio
async def test_each_backup_is_described_and_retention_matches_what_run_backup_prunes(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path, **KEEP_TWO)
    first = await backup(env)
    second = await backup(env | {"ENGRAM_RECOVERY_BACKUP_KEY": BACKUP_KEY}, format="plain", compression="gzip")
    third = await backup(env)
    assert first.backup_id and second.backup_id and third.backup_id

    listed = await catalog(env)
    entries = {e["backup_id"]: e for e in listed["backups"]}
    assert [e["backup_id"] for e in listed["backups"]] == [third.backup_id, second.backup_id, first.backup_id]
    for result in (first, second, third):
        entry = entries[result.backup_id]
        manifest = Manifest.model_validate_json((tmp_path / "repo" / "backups" / str(result.backup_id) /
                                                 "manifest.json").read_bytes())  # fmt: skip
        assert entry["state"] == "complete"
        assert entry["size_bytes"] == result.stored_bytes == manifest.total_bytes
        assert entry["finished_at"] == manifest.finished_at.isoformat().replace("+00:00", "Z")
        assert entry["attachments_backend"] == "database"
        assert entry["attachment_objects"] == manifest.database.row_counts["storage_objects"] > 0
        assert entry["verified"]["how"] == "at write" and entry["verified"]["ok"] is True
        assert entry["drilled"] is None
        assert 0 <= entry["age_hours"] < 1
    assert (entries[first.backup_id]["dump_format"], entries[first.backup_id]["compression"]) == ("custom", "zstd")
    assert (entries[second.backup_id]["dump_format"], entries[second.backup_id]["compression"]) == ("plain", "gzip")
    assert entries[second.backup_id]["encrypted"] is True and entries[first.backup_id]["encrypted"] is False
    # This server has no backup key set: it cannot say the encrypted one is readable.
    assert entries[second.backup_id]["configured_key_matches"] is None
    for key, matches in ((BACKUP_KEY, True), (base64.b64encode(secrets.token_bytes(32)).decode(), False)):
        keyed = await catalog(env | {"ENGRAM_RECOVERY_BACKUP_KEY": key})
        encrypted = next(e for e in keyed["backups"] if e["backup_id"] == second.backup_id)
        assert encrypted["configured_key_matches"] is matches

    fates = {e["backup_id"]: e["retention"] for e in listed["backups"]}
    assert fates[third.backup_id] == {"action": "keep", "rules": ["newest verified", "last 1"],
                                      "after_next_backup": "keep"}  # fmt: skip
    assert fates[second.backup_id] == {"action": "keep", "rules": ["last 2"], "after_next_backup": "prune"}
    assert fates[first.backup_id] == {"action": "prune", "rules": [], "after_next_backup": "prune"}
    assert listed["policy"] == {"keep_last": 2, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}

    # What a preview prunes now is what the catalog calls 'prune' ...
    preview = await backup(env, dry_run=True, prune=True)
    assert preview.retention is not None
    assert preview.retention.would_delete == [b for b, f in fates.items() if f["action"] == "prune"]
    # ... and what run_backup actually deletes, after adding its own backup, is what it calls 'after_next_backup'.
    pruned = await backup(env, prune=True, confirm=True)
    assert pruned.retention is not None
    assert pruned.retention.deleted == [b for b, f in fates.items() if f["after_next_backup"] == "prune"]
    after = await catalog(env)
    assert [e["backup_id"] for e in after["backups"]] == [pruned.backup_id, third.backup_id]


@pytest.mark.anyio
async def test_deep_status_and_drills_show_as_the_last_verification_and_the_last_drill(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path)
    older = await backup(env)
    newer = await backup(env)
    runtime = Runtime(load_settings(environ=env))
    try:
        drill = await restore_drill(runtime, RestoreDrillInput(recovery_point=str(older.backup_id), sample_notes=3,
                                                               sample_attachments=2), silent)  # fmt: skip
        await backup_status(runtime, BackupStatusInput(deep=True), silent)
    finally:
        await runtime.aclose()
    assert drill.verdict == "ok", drill.summary
    entries = {e["backup_id"]: e for e in (await catalog(env))["backups"]}
    drilled = entries[str(older.backup_id)]
    assert drilled["verified"]["how"] == "drill" and drilled["verified"]["ok"] is True
    assert drilled["drilled"]["ok"] is True and drilled["drilled"]["drills"] == 1
    assert drilled["drilled"]["rto_seconds"] == pytest.approx(drill.rto_seconds)
    # The deep status re-verified only the newest backup.
    assert entries[str(newer.backup_id)]["verified"]["how"] == "deep status"
    assert entries[str(newer.backup_id)]["drilled"] is None


@pytest.mark.anyio
async def test_an_interrupted_run_and_an_unreadable_manifest_are_listed_and_retention_says_it_is_blocked(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path)
    good = await backup(env)
    damaged = await backup(env)
    repo = tmp_path / "repo" / "backups"
    leftover = repo / "20200101T000000Z-dead"
    leftover.mkdir()
    (leftover / "db.dump.zst").write_bytes(b"x" * 1000)
    (repo / str(damaged.backup_id) / "manifest.json").write_text('{"backup_id": "truncated')

    listed = await catalog(env)
    entries = {e["backup_id"]: e for e in listed["backups"]}
    assert [e["backup_id"] for e in listed["backups"]] == [damaged.backup_id, good.backup_id, leftover.name]
    assert entries[leftover.name]["state"] == "incomplete" and entries[leftover.name]["size_bytes"] == 1000
    assert entries[leftover.name]["retention"]["action"] == "leftover"
    assert entries[str(damaged.backup_id)]["state"] == "unreadable"
    assert "cannot be read" in entries[str(damaged.backup_id)]["problem"]
    assert entries[str(good.backup_id)]["state"] == "complete"
    assert {e["retention"]["action"] for e in listed["backups"] if e["state"] != "incomplete"} == {"unknown"}
    assert (listed["complete"], listed["incomplete"], listed["unreadable"]) == (1, 1, 1)
    assert f"backups/{damaged.backup_id}/manifest.json" in listed["retention_blocked"]
    # That is true: run_backup refuses to write or prune past the unreadable manifest.
    with pytest.raises(IntegrityError):
        await backup(env, prune=True, confirm=True)
    assert leftover.is_dir()


@pytest.mark.anyio
async def test_list_backups_is_read_only_and_registered_in_read_only_access(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_ACCESS="read-only")
    async with Client(build_server(load_settings(environ=env))) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert "list_backups" in tools and "run_backup" not in tools
    annotations = tools["list_backups"].annotations
    assert annotations is not None
    assert annotations.read_only_hint is True and annotations.destructive_hint is False
    assert tools["list_backups"].output_schema is not None


@pytest.mark.anyio
async def test_a_repository_that_is_not_a_directory_is_an_error_with_its_fix(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("not a repository")
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_REPOSITORY=str(tmp_path / "a-file"))
    async with Client(build_server(load_settings(environ=env))) as client:
        answer = await client.call_tool("list_backups", {})
    assert answer.is_error
    text = " ".join(getattr(b, "text", "") for b in answer.content)
    assert "is not a directory" in text and "Fix: point ENGRAM_RECOVERY_REPOSITORY at a directory" in text


@pytest.mark.anyio
async def test_an_unreadable_drill_record_is_named_and_blocks_retention_as_it_blocks_run_backup(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path)
    made = await backup(env)
    drills = tmp_path / "repo" / "drills"
    drills.mkdir()
    (drills / f"20261101T000000Z-{made.backup_id}.json").write_text("{not json")
    listed = await catalog(env)
    assert [e["backup_id"] for e in listed["backups"]] == [made.backup_id]
    assert listed["backups"][0]["verified"]["how"] == "at write"
    assert listed["backups"][0]["retention"]["action"] == "unknown"
    assert f"drills/20261101T000000Z-{made.backup_id}.json" in listed["retention_blocked"]
    assert any("the drill records could not be read" in w for w in listed["warnings"])
    with pytest.raises(IntegrityError):
        await backup(env)
    async with Client(build_server(load_settings(environ=env))) as client:
        records = await client.read_resource("engram-recovery://drills")
    text = getattr(records.contents[0], "text", "")
    assert "this record cannot be read" in text and f"drills/20261101T000000Z-{made.backup_id}.json" in text


@pytest.mark.anyio
async def test_a_manifest_copied_into_another_folder_is_not_taken_for_that_backup(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path)
    made = await backup(env)
    repo = tmp_path / "repo" / "backups"
    (repo / "20261101T000000Z-copy").mkdir()
    (repo / "20261101T000000Z-copy" / "manifest.json").write_bytes((repo / str(made.backup_id) /
                                                                     "manifest.json").read_bytes())  # fmt: skip
    entries = {e["backup_id"]: e for e in (await catalog(env))["backups"]}
    assert entries[str(made.backup_id)]["state"] == "complete"
    copied = entries["20261101T000000Z-copy"]
    assert copied["state"] == "unreadable" and f"names backup '{made.backup_id}'" in copied["problem"]
