"""What every tool module declares: a typed input, a typed result, one async function.

The server (server/app.py) turns a `ToolSpec` into an MCP tool; the CLI's `call`
command goes through the same server in-process, so there is one code path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase
from mcp_types import ToolAnnotations
from pydantic import BaseModel, ConfigDict

from ..core.progress import Progress

if TYPE_CHECKING:
    from ..core.runtime import Runtime


class ToolInput(ArgModelBase):
    """Base of every tool's input: unknown arguments are refused, not ignored; nothing is coerced."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=False, strict=True)


class ToolResult(BaseModel):
    """Base of every tool's structured result."""



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


def read_only_annotations(title: str, *, open_world: bool = True) -> ToolAnnotations:
    return ToolAnnotations(
        title=title, read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=open_world
    )
