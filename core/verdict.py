"""The result vocabulary of every check: a completed check with a bad finding is a normal result
with a verdict, not an exception (docs of core/errors.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

Verdict = Literal["ok", "warn", "fail"]


def worst(statuses: Iterable[Verdict]) -> Verdict:
    """The worst of the statuses: fail over warn over ok (ok when there are none)."""
    seen = set(statuses)
    return "fail" if "fail" in seen else "warn" if "warn" in seen else "ok"
