"""stdio that answers every line it must, finishes its work, and ends.

A cron script writes its whole JSON-RPC session (initialize, initialized,
tools/call) and closes stdin. Two things of the SDK's stdio loop fail it:

* at EOF it ends the session and cancels the call still running, so the script
  gets "Connection closed" instead of its result. Here EOF is held back until
  every request read has been answered;
* a line it cannot decode (not JSON, a missing `jsonrpc`, an object as `id`,
  `params` that is not an object) is dropped without an answer, and a request
  never answered would hold EOF back for ever. Here every line is judged
  before the SDK sees it: what the SDK would drop is answered here (-32700
  parse error, -32600 invalid request with its id when one can be read,
  -32602 invalid params), and only messages it accepts reach it.

As a last guard, a request still unanswered after EOF while no tool call is
running is answered with -32603 after a short grace, so the process always
ends once every answerable request is answered.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import anyio
import mcp_types as types
from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server

from ..core.runtime import Runtime

log = logging.getLogger("engram_recovery.stdio")

PARSE_ERROR, INVALID_REQUEST, INVALID_PARAMS, INTERNAL_ERROR = -32700, -32600, -32602, -32603
# After EOF: how long the server waits, with no tool call running, for an answer the SDK never gives.
GRACE_TICK = 0.5
GRACE_TICKS = 3


def _key(request_id: Any) -> str:
    return json.dumps(request_id)


def _error(request_id: Any, code: int, message: str) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}) + "\n"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _readable_id(value: Any) -> int | str | None:
    """The id to answer with: JSON-RPC ids are strings or integers; anything else reads as null."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    return value


def _claims(value: dict[str, Any]) -> str:
    """What a message says it is, by JSON-RPC 2.0's members: Request, Notification, Response or Error."""
    if "method" in value:
        return "Request" if "id" in value else "Notification"
    return "Error" if "error" in value else "Response"


def judge(line: str) -> tuple[str | None, Any]:
    """What to do with one line: (an error reply to send, None) or (None, the decoded message to forward).

    (None, None): nothing to forward and nothing to answer (a blank line, a broken notification).
    """
    if not line.strip():
        return None, None
    try:
        message = types.jsonrpc_message_adapter.validate_json(line, by_name=False)
    except ValueError:
        message = None
    try:
        value = json.loads(line, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return _error(None, PARSE_ERROR, "Parse error: the line is not JSON"), None
    # The SDK reads loosely: a request whose id it cannot use passes as a notification, one with bad params
    # but a "result" as a response, and it would never answer either. Its reading counts only when the kind
    # it found is the kind the line claims to be.
    if message is not None and isinstance(value, dict) and _claims(value) == type(message).__name__.removeprefix(
        "JSONRPC"
    ):
        return None, message
    if isinstance(value, list):
        return _error(None, INVALID_REQUEST, "Invalid Request: JSON-RPC batches are not part of MCP"), None
    if not isinstance(value, dict):
        return _error(None, INVALID_REQUEST, "Invalid Request: a message is a JSON object"), None
    if "method" in value and "id" not in value:
        # A notification, even a broken one, is never answered (JSON-RPC 2.0, section 4.1).
        log.info("ignored a notification that is not valid JSON-RPC")
        return None, None
    if "method" not in value and ("result" in value or "error" in value):
        log.info("ignored a response that is not valid JSON-RPC")  # nothing is answered to a response
        return None, None
    request_id = _readable_id(value.get("id"))
    if "id" in value and request_id is None:
        return _error(None, INVALID_REQUEST, "Invalid Request: id must be a string or an integer"), None
    if value.get("jsonrpc") != "2.0":
        return _error(request_id, INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"'), None
    if "method" not in value:
        return _error(request_id, INVALID_REQUEST, "Invalid Request: no method"), None
    if not isinstance(value["method"], str):
        return _error(request_id, INVALID_REQUEST, "Invalid Request: method must be a string"), None
    if "params" in value and not isinstance(value["params"], dict | None):
        return _error(request_id, INVALID_PARAMS, "Invalid params: params must be a JSON object"), None
    return _error(request_id, INVALID_REQUEST, "Invalid Request: not a valid JSON-RPC 2.0 request"), None


class _Wire:
    """The stdout side: one writer for the SDK's messages and ours, and the requests not yet answered."""

    def __init__(self, inner: anyio.AsyncFile[str]) -> None:
        self._inner = inner
        self._lock = anyio.Lock()
        self._pending: Counter[str] = Counter()
        self._cancelled: set[str] = set()
        self._changed = anyio.Event()

    def opened(self, request_id: Any) -> None:
        self._pending[_key(request_id)] += 1

    def is_pending(self, request_id: Any) -> bool:
        return self._pending[_key(request_id)] > 0

    def cancelled(self, request_id: Any) -> None:
        if self.is_pending(request_id):
            self._cancelled.add(_key(request_id))

    def _answered(self, key: str) -> None:
        if self._pending[key] > 0:
            self._pending[key] -= 1
            if not self._pending[key]:
                del self._pending[key]
            self._changed.set()
            self._changed = anyio.Event()

    async def send(self, data: str) -> None:
        async with self._lock:
            await self._inner.write(data)
            await self._inner.flush()

    # The SDK's writer calls these two.
    async def write(self, data: str) -> int:
        await self.send(data)
        try:
            message = json.loads(data)
        except ValueError:
            return len(data)
        if isinstance(message, dict) and "method" not in message and ("result" in message or "error" in message):
            self._answered(_key(message.get("id")))
        return len(data)

    async def flush(self) -> None:
        """Each write is flushed under the lock already."""

    async def drain(self, busy: Callable[[], bool]) -> None:
        """Wait until every forwarded request is answered; answer itself what the SDK dropped."""
        quiet = 0
        while self._pending:
            changed = self._changed
            with anyio.move_on_after(GRACE_TICK):
                await changed.wait()
            if changed.is_set() or busy():
                quiet = 0
                continue
            quiet += 1
            if quiet >= GRACE_TICKS:
                for key in list(self._pending):
                    # The SDK stays silent on a request the client cancelled (MCP allows either); a script
                    # that reads one answer per request still gets one, and the session still ends.
                    if key in self._cancelled:
                        await self.send(_error(json.loads(key), INTERNAL_ERROR, "Request cancelled by the client"))
                    else:
                        log.warning("request %s got no answer from the MCP SDK; answering it with an error", key)
                        await self.send(_error(json.loads(key), INTERNAL_ERROR, "Internal error: the request was "
                                               "dropped"))
                    del self._pending[key]


class _JudgingReader:
    def __init__(self, inner: anyio.AsyncFile[str], wire: _Wire, busy: Callable[[], bool]) -> None:
        self._inner = inner
        self._wire = wire
        self._busy = busy

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        async for line in self._inner:
            reply, message = judge(line)
            if reply is not None:
                await self._wire.send(reply)
                continue
            if message is None:
                continue
            if isinstance(message, types.JSONRPCNotification) and message.method == "notifications/cancelled":
                self._wire.cancelled((message.params or {}).get("requestId"))
            if isinstance(message, types.JSONRPCRequest):
                if self._wire.is_pending(message.id):
                    await self._wire.send(_error(
                        message.id, INVALID_REQUEST, "Invalid Request: this id is in use by a request not yet answered"
                    ))
                    continue
                self._wire.opened(message.id)
            yield line
        await self._wire.drain(self._busy)


class RecoveryServer(MCPServer[Runtime]):
    """The SDK's MCPServer, with a stdio loop that answers everything it read before exiting."""

    # Set by build_server: whether a tool call is running now.
    busy: Callable[[], bool] = staticmethod(lambda: False)

    async def run_stdio_draining(self) -> None:
        stdin = anyio.wrap_file(io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace"))
        stdout = anyio.wrap_file(io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", write_through=True))
        wire = _Wire(stdout)
        reader = cast(anyio.AsyncFile[str], _JudgingReader(stdin, wire, self.busy))
        writer = cast(anyio.AsyncFile[str], wire)
        async with stdio_server(stdin=reader, stdout=writer) as (read_stream, write_stream):
            # Subclass access: MCPServer exposes no public way to serve given streams.
            await self._lowlevel_server.run(
                read_stream, write_stream, self._lowlevel_server.create_initialization_options()
            )
