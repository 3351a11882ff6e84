"""Builds the MCP server: its lifespan (the shared Runtime) and its tools."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, cast

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp_types import ToolAnnotations
from pydantic import Field

from .. import __version__
from ..core.errors import ConfigurationError, scrub
from ..core.progress import Progress
from ..core.runtime import Runtime
from ..core.settings import Settings
from ..tools import registry
from ..tools.base import ToolSpec
from .confirm import Tickets, asker
from .invoke import AskLater, ToolFailed, check_confirmable, invoke
from .stdio import RecoveryServer

log = logging.getLogger("engram_recovery")

INSTRUCTIONS = """\
Backup and disaster recovery for an Engram deployment (PostgreSQL, the attachments
bucket, the encryption master key, and Qdrant, which is rebuilt from Postgres).
Start with backup_status: it says whether a recovery is possible right now and what
would be lost. list_backups (and the engram-recovery://backups resource) lists the
recovery points; the disaster_recovery prompt walks through a whole recovery.
Tools that change anything refuse to act without confirm=true and report exactly
what they did; where the client supports elicitation, a destructive one called without
confirm=true asks the user to confirm what it would change instead."""


def _progress_for(ctx: Context[Runtime, Any]) -> Progress:
    async def report(done: float, total: float | None = None, message: str | None = None) -> None:
        # Progress is best effort: a client that went away must not fail the work.
        try:
            await ctx.report_progress(done, total, message)
        except (RuntimeError, ValueError, OSError) as exc:
            log.debug("progress not delivered: %s", exc)

    return report


class RecoveryTool(Tool):
    """A tool that validates strictly and answers every failure with a cause and a fix.

    The SDK's own path pre-parses JSON inside strings ("false" became False) and
    prefixes every failure with "Error executing tool X", which for an exception
    it did not expect is all the client sees. Here arguments are validated
    strictly against the advertised schema, a RecoveryError keeps its message and
    fix, and anything else becomes one operator-facing line (core/stores/failures.py).
    A destructive tool called without confirm=true asks the user to confirm where the client can
    answer an elicitation (server/confirm.py).
    """

    spec: Any = Field(exclude=True)
    problem: Any = Field(default=None, exclude=True)
    running: Any = Field(exclude=True)
    tickets: Any = Field(exclude=True)

    async def run(
        self, arguments: dict[str, Any], context: Context[Any, Any], convert_result: bool = False
    ) -> Any:
        spec: ToolSpec[Any, Any] = self.spec
        if self.problem is not None:
            raise ToolError(str(self.problem))
        runtime: Runtime = context.request_context.lifespan_context
        ask = asker(context, spec.name, arguments, self.tickets) if spec.confirmation is not None else None
        with self.running.one():
            try:
                result = await invoke(spec, runtime, arguments, _progress_for(context), ask)
            except AskLater as question:
                return question.reply  # an InputRequiredResult: the client retries with the answer
            except ToolFailed as exc:
                raise ToolError(str(exc)) from exc
        return self.fn_metadata.convert_result(result) if convert_result else result


class Running:
    """How many tool calls are running now (the stdio loop asks before it gives up on a request)."""

    def __init__(self) -> None:
        self.count = 0

    @contextmanager
    def one(self) -> Iterator[None]:
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1


def _as_mcp_tool(
    spec: ToolSpec[Any, Any], running: Running, problem: ConfigurationError | None, tickets: Tickets
) -> Tool:
    check_confirmable(spec)

    async def unused(ctx: Context[Runtime, Any]) -> None:  # RecoveryTool.run replaces the SDK's call path
        raise AssertionError("not called")

    return RecoveryTool(
        fn=unused,
        name=spec.name,
        title=spec.title,
        description=spec.description,
        parameters=spec.input_model.model_json_schema(),
        # The SDK wants its own argument base; RecoveryTool.run validates against the spec's model itself.
        fn_metadata=FuncMetadata(arg_model=_sdk_arguments(spec), output_model=spec.result_model),
        is_async=True,
        context_kwarg="ctx",
        annotations=ToolAnnotations(**spec.annotations.as_dict()),
        spec=spec,
        problem=problem,
        running=running,
        tickets=tickets,
    )


def _sdk_arguments(spec: ToolSpec[Any, Any]) -> type[ArgModelBase]:
    model = spec.input_model
    return type(model.__name__, (model, ArgModelBase), {"__module__": model.__module__})


def tools_for(settings: Settings | None) -> list[ToolSpec[Any, Any]]:
    """The tools this configuration registers: read-only mode leaves out every tool that writes.

    Without settings every tool is listed: each call then answers with the configuration error.
    """
    return [spec for spec in registry.all_specs() if settings is None or settings.access == "full" or not spec.writes]


def build_server(settings: Settings | ConfigurationError) -> RecoveryServer:
    """The server; given a ConfigurationError instead of settings it still starts (initialize, tools/list)
    and answers every tool call with that error, so an MCP client can show the operator why."""
    problem = settings if isinstance(settings, ConfigurationError) else None
    configured = settings if isinstance(settings, Settings) else None

    @asynccontextmanager
    async def lifespan(_: MCPServer[Runtime]) -> AsyncIterator[Runtime]:
        if configured is None:
            # No tool reaches the runtime without settings (RecoveryTool.run answers first).
            yield cast(Runtime, None)
            return
        async with Runtime(configured) as runtime:
            yield runtime

    tools = tools_for(configured)
    running = Running()
    tickets = Tickets()
    server = RecoveryServer(
        name="engram-recovery",
        title="Engram recovery",
        instructions=INSTRUCTIONS,
        version=__version__,
        tools=[_as_mcp_tool(spec, running, problem, tickets) for spec in tools],
        lifespan=lifespan,
        log_level="WARNING",
    )
    server.busy = lambda: running.count > 0
    if configured is not None:
        # Resources and the recovery prompt only read: registered whatever the access level. Without
        # settings there is nothing to describe; the tools answer with the configuration error.
        from .prompts import register_prompts
        from .resources import register_resources

        register_resources(server, configured)
        register_prompts(server, configured, {spec.name for spec in tools})
    return server


def error_text(exc: BaseException) -> str:
    return scrub(str(exc))
