"""One verdict vocabulary: the worst status wins."""

from __future__ import annotations

import pytest

from engram_recovery.core.verdict import Verdict, worst


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [([], "ok"), (["ok", "ok"], "ok"), (["ok", "warn"], "warn"), (["warn", "fail", "ok"], "fail"),
     (iter(["ok", "fail"]), "fail")],  # fmt: skip
)
def test_the_worst_status_wins(statuses: list[Verdict], expected: Verdict) -> None:
    assert worst(statuses) == expected
