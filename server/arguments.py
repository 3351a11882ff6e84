"""Tool arguments, strictly: what the advertised input schema says, nothing coerced.

Over MCP a boolean is JSON true/false and an integer a JSON integer: the string
"false" is not false (it once ran a real backup for a client that quoted it).
On the command line (`call --arg key=value`) every value arrives as text, so it
is parsed by the schema of its argument and then validated by the same strict
model the server uses. Rejections name the argument and what it accepts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from ..core.errors import RecoveryError
from ..tools.base import ToolSpec

_INTEGER = re.compile(r"[+-]?[0-9]+")


class InvalidArguments(RecoveryError):
    """The caller's arguments do not match the tool's input schema."""

    kind = "invalid_input"


def _alternatives(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return list(schema.get("anyOf", [schema]))


def accepts(schema: dict[str, Any]) -> str:
    """What one argument accepts, in words: 'true or false', 'one of all, missing, stale', ..."""
    words: list[str] = []
    for alt in _alternatives(schema):
        kind = alt.get("type")
        if "enum" in alt or "const" in alt:
            words.append("one of " + ", ".join(str(v) for v in alt.get("enum", [alt.get("const")])))
        elif kind == "boolean":
            words.append("true or false")
        elif kind == "integer":
            low, high = alt.get("minimum"), alt.get("maximum")
            bounds = f" from {low} to {high}" if low is not None and high is not None else (
                f" of at least {low}" if low is not None else "")
            words.append(f"a whole number{bounds}")
        elif kind == "number":
            words.append("a number")
        elif kind == "string":
            words.append("a string" + (f" matching {alt['pattern']}" if "pattern" in alt else ""))
        elif kind == "null":
            words.append("null (or leave it out)")
        elif kind in ("object", "array"):
            words.append(f"a JSON {kind}")
    return " or ".join(words) or "any value"


def _properties(spec: ToolSpec[Any, Any]) -> dict[str, dict[str, Any]]:
    props: dict[str, dict[str, Any]] = spec.input_model.model_json_schema().get("properties", {})
    return props


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction" if not value.is_integer() else "a number written with a decimal point"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _accepted_list(props: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{name} ({accepts(schema)})" for name, schema in props.items()) or "none"


def describe(spec: ToolSpec[Any, Any], exc: ValidationError, arguments: dict[str, Any]) -> InvalidArguments:
    """A validation failure as one message naming each argument and what it accepts (values are not echoed)."""
    props = _properties(spec)
    problems: list[str] = []
    for error in exc.errors(include_url=False, include_input=False):
        name = ".".join(str(part) for part in error["loc"]) or "arguments"
        top = str(error["loc"][0]) if error["loc"] else ""
        if error["type"] == "extra_forbidden":
            problems.append(f"{name!r} is not an argument of {spec.name}")
        elif top in props:
            got = _json_type(arguments.get(top)) if top in arguments else "nothing"
            problems.append(f"{name} takes {accepts(props[top])}, got {got}")
        else:
            problems.append(f"{name}: {error['msg']}")
    return InvalidArguments(
        f"invalid arguments to {spec.name}: " + "; ".join(dict.fromkeys(problems)),
        f"send only these arguments, as JSON values of their type: {_accepted_list(props)}",
    )


def _parse_one(spec: ToolSpec[Any, Any], key: str, raw: str, schema: dict[str, Any]) -> Any:
    for alt in _alternatives(schema):
        kind = alt.get("type")
        if kind == "boolean" and raw in ("true", "false"):
            return raw == "true"
        if kind == "integer" and _INTEGER.fullmatch(raw):
            return int(raw)
        if kind == "number":
            try:
                return float(raw) if not _INTEGER.fullmatch(raw) else int(raw)
            except ValueError:
                continue
        if kind == "string" and "enum" in alt:
            if raw in alt["enum"]:
                return raw
            continue
        if kind == "string":
            if len(raw) >= 2 and raw[0] == raw[-1] == '"':
                try:
                    decoded = json.loads(raw)
                except ValueError:
                    return raw
                return decoded if isinstance(decoded, str) else raw
            return raw
        if kind in ("object", "array"):
            try:
                decoded = json.loads(raw)
            except ValueError:
                continue
            if isinstance(decoded, dict if kind == "object" else list):
                return decoded
        if kind == "null" and raw == "null":
            return None
    raise InvalidArguments(
        f"--arg {key}={raw!r}: {key} takes {accepts(schema)}",
        f"write it as --arg {key}={_example(schema)}",
    )


def _example(schema: dict[str, Any]) -> str:
    alt = _alternatives(schema)[0]
    if "enum" in alt:
        return str(alt["enum"][0])
    return {"boolean": "true", "integer": str(alt.get("minimum", 1)), "number": "1.5", "object": "'{}'",
            "array": "'[]'"}.get(str(alt.get("type")), "text")


def parse_cli(spec: ToolSpec[Any, Any], pairs: Sequence[str]) -> dict[str, Any]:
    """`--arg key=value` pairs as JSON arguments, each value parsed by its argument's schema."""
    props = _properties(spec)
    arguments: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise InvalidArguments(f"--arg {pair!r} is not KEY=VALUE", "write it as --arg deep=true")
        if key in arguments:
            raise InvalidArguments(
                f"--arg {key} is given more than once", f"pass each argument once; {spec.name} takes one {key}"
            )
        if key not in props:
            raise InvalidArguments(
                f"{key!r} is not an argument of {spec.name}", f"its arguments are: {_accepted_list(props)}"
            )
        arguments[key] = _parse_one(spec, key, raw, props[key])
    return arguments
