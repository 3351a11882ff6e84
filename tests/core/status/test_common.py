"""The formatting every status check and the catalog share: one wording of an age and of a size."""

from __future__ import annotations

from datetime import timedelta

import pytest

from engram_recovery.core.status.common import age_text, format_age, format_size


@pytest.mark.parametrize(
    ("age", "text"),
    [
        (timedelta(seconds=-5), "<1 min"),  # a clock a little ahead of the repository's
        (timedelta(seconds=45), "<1 min"),
        (timedelta(minutes=25), "25 min"),
        (timedelta(hours=3, minutes=30), "3.5 h"),
        (timedelta(hours=47.9), "47.9 h"),
        (timedelta(days=4.2), "4.2 days"),
    ],
)
def test_an_age_reads_the_same_in_backup_status_and_in_the_catalog(age: timedelta, text: str) -> None:
    assert format_age(age) == text == age_text(age.total_seconds() / 3600)


@pytest.mark.parametrize(
    ("size", "text"),
    [(None, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 << 20, "5.0 MiB"), (3 << 40, "3.0 TiB"),
     (5 << 50, "5120.0 TiB")],
)  # fmt: skip
def test_a_size_is_written_in_binary_units(size: int | None, text: str) -> None:
    assert format_size(size) == text
