"""One tool call, without the MCP SDK: validate strictly, run in the runtime, explain any failure.

The server's tools (server/app.py) and the CLI's `call` both come here, so a `call` from cron
behaves as the MCP tool does without importing the SDK, its transports or every tool's clients.

A destructive tool (one with a `confirmation`) called with confirm=false may be confirmed by the
user: the server passes `ask` when its client can answer an elicitation (server/confirm.py). The
CLI never passes it, so a `call` without confirm=true stays what it always was.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from ..core.errors import RecoveryError
from ..core.progress import Progress
from ..core.runtime import Runtime
from ..core.stores.failures import explain
from ..tools.base import ToolInput, ToolResult, ToolSpec
from .arguments import describe as describe_arguments

log = logging.getLogger("engram_recovery")

# Asks the user to confirm what a destructive call would do (the message); True only on an explicit yes.
Ask = Callable[[str], Awaitable[bool]]

DECLINED = "Confirmation declined or unanswered: nothing was changed. "


class ToolFailed(Exception):
    """A tool call that failed; its text is the cause and the fix, what the client shows."""


class AskLater(Exception):
    """Raised by an `ask` that cannot wait for the answer in this call (MCP >= 2026-07-28: the question
    goes back as the call's result and the client retries with the answer). The tool does not run."""

    def __init__(self, reply: Any) -> None:
        super().__init__("the confirmation question goes back to the client")
        self.reply = reply


def check_confirmable(spec: ToolSpec[Any, Any]) -> None:
    """A tool that asks for confirmation needs a `confirm` flag to set and a `summary` to say it was declined."""
    if spec.confirmation is None:
        return
    confirm = spec.input_model.model_fields.get("confirm")
    summary = spec.result_model.model_fields.get("summary")
    if confirm is None or confirm.annotation is not bool or summary is None or summary.annotation is not str:
        raise TypeError(f"tool {spec.name} has a confirmation but no confirm: bool input or no summary: str result")


async def invoke(
    spec: ToolSpec[Any, Any], runtime: Runtime, arguments: dict[str, Any], progress: Progress, ask: Ask | None = None
) -> ToolResult:
    try:
        params: ToolInput = spec.input_model.model_validate(arguments, strict=True)
    except ValidationError as exc:
        raise ToolFailed(str(describe_arguments(spec, exc, arguments))) from exc
    try:
        if ask is not None and spec.confirmation is not None and getattr(params, "confirm", True) is False:
            # By contract confirm=false changes nothing: its result is both the question's text and the answer
            # to a decline, so the unconfirmed run happens once.
            async with runtime.tool_call():
                dry: ToolResult = await spec.run(runtime, params, progress)
            message = spec.confirmation(params, dry)
            # Asked outside the call: nothing (an embedded Qdrant, say) stays held while a person decides.
            if message is None:
                return dry
            if not await ask(message):
                return dry.model_copy(update={"summary": DECLINED + getattr(dry, "summary", "")})
            params = params.model_copy(update={"confirm": True})
        async with runtime.tool_call():
            result: ToolResult = await spec.run(runtime, params, progress)
        return result
    except AskLater:
        raise
    except RecoveryError as exc:
        log.info("tool %s failed: %s", spec.name, exc.message)
        raise ToolFailed(str(exc)) from exc
    except Exception as exc:  # the boundary: nothing unexplained reaches the client
        error = explain(exc, spec.name)
        log.warning("%s", str(error).replace("\n", " "))
        log.debug("traceback of the failure of %s", spec.name, exc_info=exc)
        raise ToolFailed(str(error)) from exc
