"""One tool call, without the MCP SDK: validate strictly, run in the runtime, explain any failure.

The server's tools (server/app.py) and the CLI's `call` both come here, so a `call` from cron
behaves as the MCP tool does without importing the SDK, its transports or every tool's clients.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from ..core.errors import RecoveryError
from ..core.progress import Progress
from ..core.runtime import Runtime
from ..core.stores.failures import explain
from ..tools.base import ToolInput, ToolResult, ToolSpec
from .arguments import describe as describe_arguments

log = logging.getLogger("engram_recovery")


class ToolFailed(Exception):
    """A tool call that failed; its text is the cause and the fix, what the client shows."""


async def invoke(spec: ToolSpec[Any, Any], runtime: Runtime, arguments: dict[str, Any], progress: Progress
                 ) -> ToolResult:
    try:
        params: ToolInput = spec.input_model.model_validate(arguments, strict=True)
    except ValidationError as exc:
        raise ToolFailed(str(describe_arguments(spec, exc, arguments))) from exc
    try:
        async with runtime.tool_call():
            result: ToolResult = await spec.run(runtime, params, progress)
            return result
    except RecoveryError as exc:
        log.info("tool %s failed: %s", spec.name, exc.message)
        raise ToolFailed(str(exc)) from exc
    except Exception as exc:  # the boundary: nothing unexplained reaches the client
        error = explain(exc, spec.name)
        log.warning("%s", str(error).replace("\n", " "))
        log.debug("traceback of the failure of %s", spec.name, exc_info=exc)
        raise ToolFailed(str(error)) from exc
