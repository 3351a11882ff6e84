"""The MCP surface a client sees (tools/list, full and read-only) is pinned in tools_surface.json.

Regrouping the code (issue 12) must not change a name, title, description, annotation or schema.
A deliberate change regenerates the file: ENGRAM_TEST_REGENERATE_SURFACE=1 pytest tests/server/test_tools_surface.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from engram_recovery.core.settings import load_settings
from engram_recovery.server.app import build_server

GOLDEN = Path(__file__).with_name("tools_surface.json")


async def _surface(tmp_path: Path, access: str) -> list[dict[str, Any]]:
    # No store is reached: listing the tools needs settings, not a connection.
    env = {
        "DATABASE_URL": "postgresql://engram:secret@127.0.0.1:9/engram",
        "ENGRAM_RECOVERY_REPOSITORY": str(tmp_path / "repository"),
        "ENGRAM_RECOVERY_ACCESS": access,
    }
    async with Client(build_server(load_settings(environ=env))) as client:
        tools = (await client.list_tools()).tools
    return [tool.model_dump(mode="json", exclude_none=True) for tool in tools]


@pytest.mark.anyio
async def test_tools_list_is_unchanged_for_full_and_read_only_access(tmp_path: Path) -> None:
    surface = {access: await _surface(tmp_path, access) for access in ("full", "read-only")}
    if os.environ.get("ENGRAM_TEST_REGENERATE_SURFACE") == "1":
        GOLDEN.write_text(json.dumps(surface, indent=1, sort_keys=True) + "\n")
    assert surface == json.loads(GOLDEN.read_text())
    # The read-only surface is the full one without the tools that write.
    full = {tool["name"] for tool in surface["full"]}
    read_only = {tool["name"] for tool in surface["read-only"]}
    assert read_only < full
