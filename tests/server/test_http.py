"""Streamable HTTP: loopback by default, a bearer token always, untrusted browser origins refused."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from support import EXE, free_port

TOKEN = "test-http-token-0123456789abcdef"
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


@pytest.fixture(scope="module")
def http_server(admin_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp_path = tmp_path_factory.mktemp("http")
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "DATABASE_URL": admin_dsn,
        "ENGRAM_RECOVERY_REPOSITORY": str(tmp_path / "repo"),
        "ENGRAM_RECOVERY_HTTP_TOKEN": TOKEN,
    }
    proc = subprocess.Popen(
        [EXE, "serve", "--http", "--port", str(port)], env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        assert TOKEN not in err.decode(), "the token leaked into the server's log"


def test_request_without_token_is_refused_with_401(http_server: str) -> None:
    response = httpx.post(http_server, json=INIT, headers=HEADERS)
    assert response.status_code == 401
    assert "Bearer" in response.headers["www-authenticate"]
    assert TOKEN not in response.text


def test_request_with_wrong_token_is_refused_with_401(http_server: str) -> None:
    response = httpx.post(http_server, json=INIT, headers=HEADERS | {"authorization": "Bearer wrong-token-000"})
    assert response.status_code == 401
    prefix = httpx.post(http_server, json=INIT, headers=HEADERS | {"authorization": f"Bearer {TOKEN[:-1]}"})
    assert prefix.status_code == 401


def test_untrusted_origin_is_refused_even_with_the_token(http_server: str) -> None:
    response = httpx.post(
        http_server, json=INIT,
        headers=HEADERS | {"authorization": f"Bearer {TOKEN}", "origin": "https://evil.example"},
    )
    assert response.status_code == 403


@pytest.mark.anyio
async def test_right_token_serves_mcp_and_lists_the_tools(http_server: str) -> None:
    async with httpx2.AsyncClient(headers={"authorization": f"Bearer {TOKEN}"}) as http:
        async with Client(streamable_http_client(http_server, http_client=http)) as client:
            tools = await client.list_tools()
    names = {tool.name for tool in tools.tools}
    assert {"backup_status", "run_backup", "plan_restore", "reindex_qdrant"} <= names


def test_http_without_a_configured_token_refuses_to_start(admin_dsn: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [EXE, "serve", "--http", "--port", str(free_port())],
        env={"PATH": os.environ["PATH"], "DATABASE_URL": admin_dsn}, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "ENGRAM_RECOVERY_HTTP_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_container_healthcheck_passes_on_the_401_of_a_running_server_and_fails_without_one(
    http_server: str,
) -> None:
    """deploy/Dockerfile's HEALTHCHECK command, run as the image runs it (no token in its environment)."""
    command = [sys.executable, "-m", "engram_recovery.server.healthcheck"]
    env = {"PATH": os.environ["PATH"]}
    healthy = subprocess.run([*command, http_server], capture_output=True, text=True, timeout=30, env=env)
    assert healthy.returncode == 0 and "asks for its bearer token" in healthy.stdout
    port = http_server.rsplit(":", 1)[1].split("/")[0]
    by_default = subprocess.run(command, capture_output=True, text=True, timeout=30,
                                env=env | {"ENGRAM_RECOVERY_HTTP_PORT": port})  # fmt: skip
    assert by_default.returncode == 0, by_default.stderr
    down = subprocess.run([*command, f"http://127.0.0.1:{free_port()}/mcp"], capture_output=True, text=True,
                          timeout=30, env=env)  # fmt: skip
    assert down.returncode == 1 and "did not answer" in down.stderr
