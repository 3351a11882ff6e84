"""What every tool module declares: a typed input, a typed result, one async function.

The server (server/app.py) turns a `ToolSpec` into an MCP tool; both it and the CLI's
`call` run a tool through `invoke` (server/invoke.py), so there is one code path. Nothing
here imports the MCP SDK: a `call` from cron should not pay for it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from ..core.progress import Progress

if TYPE_CHECKING:
    from ..core.runtime import Runtime


class ToolInput(BaseModel):
    """Base of every tool's input: unknown arguments are refused, not ignored; nothing is coerced."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=False, strict=True)


class ToolResult(BaseModel):
    """Base of every tool's structured result."""



@dataclass(frozen=True)
class ToolAnnotations:
    """MCP's tool annotations (server/app.py hands them to the SDK's `ToolAnnotations`), kept here as plain
    data because importing `mcp_types` costs a `call` more than its whole tool run."""

    title: str
    read_only_hint: bool
    destructive_hint: bool
    idempotent_hint: bool
    open_world_hint: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


In = TypeVar("In", bound=ToolInput)
R = TypeVar("R", bound=ToolResult)


@dataclass(frozen=True)
class ToolSpec(Generic[In, R]):
    name: str
    title: str
    description: str
    input_model: type[In]
    result_model: type[R]
    run: Callable[[Runtime, In, Progress], Awaitable[R]]
    annotations: ToolAnnotations
    # Tools that change anything are left out in read-only mode.
    writes: bool
    # Destructive tools: what to show the user when the server asks them to confirm (MCP elicitation),
    # written from the unconfirmed run's own result (None: it would change nothing, nothing to ask).
    confirmation: Callable[[In, R], str | None] | None = None


def read_only_annotations(title: str, *, open_world: bool = True) -> ToolAnnotations:
    return ToolAnnotations(
        title=title, read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=open_world
    )
