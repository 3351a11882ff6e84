"""MCP resources (catalog, manifests, drill records) and the disaster-recovery prompt, through the MCP client.

A real repository with real backups and a real restore drill of the test bed.
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, MCPError
from mcp_types import TextContent, TextResourceContents
from support import EngramDB, backup, engram_env, run_tool

from engram_recovery.core.settings import load_settings
from engram_recovery.server.app import build_server
from engram_recovery.tools.restore_drill import RestoreDrillInput, restore_drill

BACKUP_KEY = base64.b64encode(secrets.token_bytes(32)).decode()


async def read(client: Client, uri: str) -> TextResourceContents:
    result = await client.read_resource(uri)
    assert len(result.contents) == 1
    content = result.contents[0]
    assert isinstance(content, TextResourceContents)
    return content


def secrets_of(env: dict[str, str]) -> list[str]:
    master = env["ENCRYPTION_MASTER_KEY"]
    return [master, base64.b64decode(master).hex(), BACKUP_KEY, base64.b64decode(BACKUP_KEY).hex()]


def prompt_text(messages: Any) -> str:
    texts = [m.content.text for m in messages if isinstance(m.content, TextContent)]
    assert len(texts) == len(messages) >= 1
    return "\n".join(texts)


@pytest.mark.anyio
async def test_the_catalog_manifests_and_drill_records_are_resources_with_json_mime_types(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY)
    drilled = await backup(env)
    newest = await backup(env)
    point = RestoreDrillInput(recovery_point=str(drilled.backup_id), sample_notes=3, sample_attachments=2)
    drill = await run_tool(restore_drill, point, env)
    assert drill.verdict == "ok", drill.summary
    texts: list[str] = []
    async with Client(build_server(load_settings(environ=env))) as client:
        listed = {str(r.uri): r for r in (await client.list_resources()).resources}
        templates = {t.uri_template: t for t in (await client.list_resource_templates()).resource_templates}
        assert set(listed) == {"engram-recovery://backups", "engram-recovery://drills"}
        assert set(templates) == {"engram-recovery://backups/{backup_id}/manifest",
                                  "engram-recovery://backups/{backup_id}/drills"}  # fmt: skip
        for resource in listed.values():
            assert resource.mime_type == "application/json" and resource.title and resource.description
        for template in templates.values():
            assert template.mime_type == "application/json" and template.title and template.description

        catalog = await read(client, "engram-recovery://backups")
        tool = await client.call_tool("list_backups", {})
        assert catalog.mime_type == "application/json"
        view = json.loads(catalog.text)
        assert [b["backup_id"] for b in view["backups"]] == [newest.backup_id, drilled.backup_id]
        assert tool.structured_content is not None
        assert [b["backup_id"] for b in tool.structured_content["backups"]] == [newest.backup_id, drilled.backup_id]
        assert view["backups"][1]["drilled"]["ok"] is True

        manifest = await read(client, f"engram-recovery://backups/{newest.backup_id}/manifest")
        stored = (tmp_path / "repo" / "backups" / str(newest.backup_id) / "manifest.json").read_text()
        assert manifest.mime_type == "application/json" and manifest.text == stored
        assert json.loads(manifest.text)["backup_key_fingerprint"]

        drills = json.loads((await read(client, "engram-recovery://drills")).text)
        assert [(d["backup_id"], d["ok"], d["record"]) for d in drills] == [(drilled.backup_id, True, drill.record)]
        assert drills[0]["rto_seconds"] == pytest.approx(drill.rto_seconds)
        assert {s["name"] for s in drills[0]["steps"]} >= {"verify", "restore", "prove_canary"}
        one = json.loads((await read(client, f"engram-recovery://backups/{drilled.backup_id}/drills")).text)
        assert one == drills
        none = json.loads((await read(client, f"engram-recovery://backups/{newest.backup_id}/drills")).text)
        assert none == []
        texts += [catalog.text, manifest.text, json.dumps(drills)]
    for secret in secrets_of(env):
        assert all(secret not in text for text in texts)


@pytest.mark.anyio
async def test_unknown_incomplete_and_escaping_backup_ids_are_not_found_with_a_fix(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path)
    await backup(env)
    leftover = tmp_path / "repo" / "backups" / "20200101T000000Z-dead"
    leftover.mkdir()
    (leftover / "db.dump.zst").write_bytes(b"x")
    async with Client(build_server(load_settings(environ=env))) as client:
        for uri, expected in [
            ("engram-recovery://backups/20990101T000000Z-none/manifest", "there is no backup 20990101T000000Z-none"),
            ("engram-recovery://backups/20990101T000000Z-none/drills", "there is no backup 20990101T000000Z-none"),
            ("engram-recovery://backups/20200101T000000Z-dead/manifest", "incomplete: it has no manifest"),
            ("engram-recovery://backups/..%2F..%2Fetc/manifest", "Unknown resource"),
        ]:
            with pytest.raises(MCPError) as caught:
                await client.read_resource(uri)
            assert caught.value.error.code == -32602, uri
            message = caught.value.error.message
            assert expected in message, (uri, message)
            assert "Fix: " in message or expected == "Unknown resource"


@pytest.mark.anyio
async def test_an_unreachable_repository_is_a_resource_error_with_cause_and_fix(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("not a repository")
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_REPOSITORY=str(tmp_path / "a-file"))
    async with Client(build_server(load_settings(environ=env))) as client:
        with pytest.raises(MCPError) as caught:
            await client.read_resource("engram-recovery://backups")
    message = caught.value.error.message
    assert "is not a directory" in message and "Fix: point ENGRAM_RECOVERY_REPOSITORY at a directory" in message


@pytest.mark.anyio
async def test_the_recovery_prompt_names_this_deployment_and_the_decisions_without_a_secret(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_BACKUP_KEY=BACKUP_KEY)
    point = await backup(env)
    async with Client(build_server(load_settings(environ=env))) as client:
        prompts = {p.name: p for p in (await client.list_prompts()).prompts}
        assert set(prompts) == {"disaster_recovery"}
        described = prompts["disaster_recovery"]
        assert described.title and described.description
        assert {(a.name, a.required) for a in described.arguments or []} == {("recovery_point", False),
                                                                             ("situation", False)}  # fmt: skip
        got = await client.get_prompt("disaster_recovery", {"situation": "the database disk died"})
        suggested = await client.get_prompt("disaster_recovery", {"recovery_point": str(point.backup_id)})
    text = prompt_text(got.messages)
    # This deployment's facts: where attachments live, the repository, whether a backup key is set.
    assert "STORAGE_BACKEND=database" in text and str(tmp_path / "repo") in text
    assert "ENGRAM_RECOVERY_BACKUP_KEY is set" in text and f"`{engram_db.name}`" in text
    assert "the database disk died" in text and str(point.backup_id) in text
    # The walk-through, in order, and the decisions.
    steps = ["`backup_status`", "`list_backups`", "`plan_restore`", "`restore_drill`", "Restore with `run_restore`",
             "`reindex_qdrant`"]
    assert [text.index(s) for s in steps] == sorted(text.index(s) for s in steps)
    assert text.count("DECISION") >= 2
    for rollback in ("invalid_grant", "come back to life", "change_seq", "OrphanSweep", "Oban jobs"):
        assert rollback in text
    # run_restore is registered: the prompt sends the assistant to it, with the token, confirmation and resume.
    assert "plan_token" in text and "resume=true" in text and "plan_restore's steps in order" not in text
    assert f"recovery_point=`{point.backup_id}`" in prompt_text(suggested.messages)
    for secret in secrets_of(env):
        assert secret not in text


@pytest.mark.anyio
async def test_read_only_access_keeps_resources_and_the_prompt_and_says_which_steps_need_full_access(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path, ENGRAM_RECOVERY_ACCESS="read-only")
    async with Client(build_server(load_settings(environ=env))) as client:
        assert {str(r.uri) for r in (await client.list_resources()).resources} == {
            "engram-recovery://backups", "engram-recovery://drills"}
        view = json.loads((await read(client, "engram-recovery://backups")).text)
        text = prompt_text((await client.get_prompt("disaster_recovery")).messages)
    assert view["backups"] == [] and view["summary"].startswith("no backups yet")
    assert "READ-ONLY" in text and "no backups yet" in text
    assert "`restore_drill` is not available on this server" in text
    assert "`reindex_qdrant` is not available on this server" in text
    assert "Backup key: none is set here" in text
