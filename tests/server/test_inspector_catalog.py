"""The official MCP inspector CLI reads the catalog, a manifest, the drill records and the recovery prompt.

Skipped where Node.js (npx) is absent, like the inspector test in test_clients.py.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
from support import EXE, EngramDB, backup, engram_env

INSPECTOR = "@modelcontextprotocol/inspector@2.12.0"


@pytest.mark.anyio
@pytest.mark.skipif(shutil.which("npx") is None, reason="Node.js (npx) is not installed")
async def test_official_inspector_cli_reads_the_resources_the_prompt_and_calls_list_backups(
    engram_db: EngramDB, tmp_path: Path
) -> None:
    env = engram_env(engram_db, tmp_path)
    made = await backup(env)
    env_args: list[str] = []
    for key, value in env.items():
        if key != "PATH":
            env_args += ["-e", f"{key}={value}"]
    base = ["npx", "-y", INSPECTOR, "--cli", *env_args, EXE, "serve"]

    async def inspect(*args: str) -> Any:
        run = functools.partial(subprocess.run, [*base, *args], capture_output=True, text=True, timeout=300,
                                env=os.environ | {"npm_config_update_notifier": "false"})  # fmt: skip
        done = await anyio.to_thread.run_sync(run)
        assert done.returncode == 0, (args, done.stderr[-2000:])
        return json.loads(done.stdout)

    resources = {r["uri"]: r for r in (await inspect("--method", "resources/list"))["resources"]}
    assert {uri: r["mimeType"] for uri, r in resources.items()} == {
        "engram-recovery://backups": "application/json", "engram-recovery://drills": "application/json"}
    templates = (await inspect("--method", "resources/templates/list"))["resourceTemplates"]
    assert {t["uriTemplate"] for t in templates} == {"engram-recovery://backups/{backup_id}/manifest",
                                                     "engram-recovery://backups/{backup_id}/drills"}  # fmt: skip

    catalog = (await inspect("--method", "resources/read", "--uri", "engram-recovery://backups"))["contents"][0]
    assert catalog["mimeType"] == "application/json"
    assert [b["backup_id"] for b in json.loads(catalog["text"])["backups"]] == [made.backup_id]
    uri = f"engram-recovery://backups/{made.backup_id}/manifest"
    manifest = (await inspect("--method", "resources/read", "--uri", uri))["contents"][0]
    assert json.loads(manifest["text"])["backup_id"] == made.backup_id

    prompts = (await inspect("--method", "prompts/list"))["prompts"]
    assert [p["name"] for p in prompts] == ["disaster_recovery"]
    got = await inspect("--method", "prompts/get", "--prompt-name", "disaster_recovery",
                        "--prompt-args", f"recovery_point={made.backup_id}")  # fmt: skip
    text = got["messages"][0]["content"]["text"]
    assert f"recovery_point=`{made.backup_id}`" in text and "STORAGE_BACKEND=database" in text

    called = await inspect("--method", "tools/call", "--tool-name", "list_backups")
    assert called["structuredContent"]["backups"][0]["backup_id"] == made.backup_id
    assert called["structuredContent"]["backups"][0]["retention"]["action"] == "keep"
