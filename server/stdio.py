"""stdio that finishes its work before it exits.

A cron script writes its whole JSON-RPC session (initialize, initialized,
tools/call) and closes stdin. The SDK's stdio transport ends the session at
EOF and cancels the call still running, so the script gets "Connection closed"
instead of its result. Here EOF is held back until every request read has been
answered, then the server exits cleanly.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server

from ..core.runtime import Runtime


class _Outstanding:
    """Ids of requests read but not yet answered."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._idle = anyio.Event()
        self._idle.set()

    def opened(self, request_id: Any) -> None:
        self._ids.add(json.dumps(request_id))
        if self._idle.is_set():
            self._idle = anyio.Event()

    def answered(self, request_id: Any) -> None:
        self._ids.discard(json.dumps(request_id))
        if not self._ids:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


def _parse(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class _DrainingReader:
    def __init__(self, inner: anyio.AsyncFile[str], outstanding: _Outstanding) -> None:
        self._inner = inner
        self._outstanding = outstanding

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        async for line in self._inner:
            message = _parse(line)
            if message is not None and "method" in message and message.get("id") is not None:
                self._outstanding.opened(message["id"])
            yield line
        await self._outstanding.wait_idle()


class _TrackingWriter:
    def __init__(self, inner: anyio.AsyncFile[str], outstanding: _Outstanding) -> None:
        self._inner = inner
        self._outstanding = outstanding

    async def write(self, data: str) -> int:
        written = await self._inner.write(data)
        message = _parse(data)
        if message is not None and "method" not in message and ("result" in message or "error" in message):
            self._outstanding.answered(message.get("id"))
        return written

    async def flush(self) -> None:
        await self._inner.flush()


class RecoveryServer(MCPServer[Runtime]):
    """The SDK's MCPServer, with a stdio loop that answers everything it read before exiting."""

    async def run_stdio_draining(self) -> None:
        outstanding = _Outstanding()
        stdin = anyio.wrap_file(io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace"))
        stdout = anyio.wrap_file(io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", write_through=True))
        reader = cast(anyio.AsyncFile[str], _DrainingReader(stdin, outstanding))
        writer = cast(anyio.AsyncFile[str], _TrackingWriter(stdout, outstanding))
        async with stdio_server(stdin=reader, stdout=writer) as (read_stream, write_stream):
            # Subclass access: MCPServer exposes no public way to serve given streams.
            await self._lowlevel_server.run(
                read_stream, write_stream, self._lowlevel_server.create_initialization_options()
            )
