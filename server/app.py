"""Builds the MCP server: its lifespan (the shared Runtime) and its tools."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import FuncMetadata

from .. import __version__
from ..core.errors import RecoveryError, scrub
from ..core.progress import Progress
from ..core.runtime import Runtime
from ..core.settings import Settings
from ..tools import registry
from ..tools.base import ToolInput, ToolResult, ToolSpec
from .stdio import RecoveryServer

log = logging.getLogger("engram_recovery")

INSTRUCTIONS = """\
Backup and disaster recovery for an Engram deployment (PostgreSQL, the attachments
bucket, the encryption master key, and Qdrant, which is rebuilt from Postgres).
Start with backup_status: it says whether a recovery is possible right now and what
would be lost. list_backups (and the engram-recovery://backups resource) lists the
recovery points; the disaster_recovery prompt walks through a whole recovery.
Tools that change anything refuse to act without confirm=true and report exactly
what they did."""


def _progress_for(ctx: Context[Runtime, Any]) -> Progress:
    async def report(done: float, total: float | None = None, message: str | None = None) -> None:
        # Progress is best effort: a client that went away must not fail the work.
        try:
            await ctx.report_progress(done, total, message)
        except (RuntimeError, ValueError, OSError) as exc:
            log.debug("progress not delivered: %s", exc)

    return report


def _as_mcp_tool(spec: ToolSpec[Any, Any]) -> Tool:
    async def handler(ctx: Context[Runtime, Any], **arguments: Any) -> ToolResult:
        runtime: Runtime = ctx.request_context.lifespan_context
        params: ToolInput = spec.input_model.model_validate(arguments)
        try:
            result: ToolResult = await spec.run(runtime, params, _progress_for(ctx))
            return result
        except RecoveryError as exc:
            log.info("tool %s failed: %s", spec.name, exc.message)
            raise ToolError(str(exc)) from exc

    return Tool(
        fn=handler,
        name=spec.name,
        title=spec.title,
        description=spec.description,
        parameters=spec.input_model.model_json_schema(),
        fn_metadata=FuncMetadata(arg_model=spec.input_model, output_model=spec.result_model),
        is_async=True,
        context_kwarg="ctx",
        annotations=spec.annotations,
    )


def tools_for(settings: Settings) -> list[ToolSpec[Any, Any]]:
    """The tools this configuration registers: read-only mode leaves out every tool that writes."""
    return [spec for spec in registry.ALL if settings.access == "full" or not spec.writes]


def build_server(settings: Settings) -> RecoveryServer:
    @asynccontextmanager
    async def lifespan(_: MCPServer[Runtime]) -> AsyncIterator[Runtime]:
        runtime = Runtime(settings)
        try:
            yield runtime
        finally:
            await runtime.aclose()

    tools = tools_for(settings)
    server = RecoveryServer(
        name="engram-recovery",
        title="Engram recovery",
        instructions=INSTRUCTIONS,
        version=__version__,
        tools=[_as_mcp_tool(spec) for spec in tools],
        lifespan=lifespan,
        log_level="WARNING",
    )
    # Resources and the recovery prompt only read: registered whatever the access level.
    from .prompts import register_prompts
    from .resources import register_resources

    register_resources(server, settings)
    register_prompts(server, settings, {spec.name for spec in tools})
    return server


def error_text(exc: BaseException) -> str:
    return scrub(str(exc))
