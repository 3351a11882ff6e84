"""The retention policy as a pure function: what each rule keeps, and the safety rules that come first."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from engram_recovery.core.repository.retention import Candidate, Policy, decide

START = datetime(2026, 11, 24, 3, 0, tzinfo=UTC)


def daily(days: int, verified: bool = True, per_day: int = 1) -> list[Candidate]:
    out = []
    for d in range(days):
        for n in range(per_day):
            at = START - timedelta(days=d, hours=n)
            out.append(Candidate(at.strftime("%Y%m%dT%H%M%SZ"), at, verified))
    return out


def test_keep_last_keeps_exactly_the_newest_n() -> None:
    backups = daily(10)
    decision = decide(backups, Policy(last=3, daily=0, weekly=0, monthly=0))
    assert decision.keep == [b.backup_id for b in backups[:3]]
    assert decision.delete == [b.backup_id for b in backups[3:]]
    assert decision.reasons[backups[0].backup_id] == ["newest verified", "last 1"]


def test_daily_keeps_the_newest_backup_of_each_of_the_last_n_days() -> None:
    backups = daily(5, per_day=3)
    decision = decide(backups, Policy(last=1, daily=3, weekly=0, monthly=0))
    newest_of_day = [b.backup_id for b in backups[0:9:3]]
    assert decision.keep == newest_of_day
    assert len(decision.delete) == 15 - 3


def test_weekly_and_monthly_reach_further_back() -> None:
    backups = daily(120)
    decision = decide(backups, Policy(last=1, daily=0, weekly=4, monthly=3))
    kept = [b for b in backups if b.backup_id in decision.keep]
    weeks = {b.finished_at.isocalendar()[:2] for b in kept if any(r.startswith("weekly") for r in
                                                                     decision.reasons[b.backup_id])}
    months = {b.finished_at.strftime("%Y-%m") for b in kept if any(r.startswith("monthly") for r in
                                                                      decision.reasons[b.backup_id])}
    assert len(weeks) == 4 and months == {"2026-11", "2026-10", "2026-09"}
    assert len(decision.keep) + len(decision.delete) == 120


def test_the_newest_verified_backup_is_never_deleted_even_under_a_zero_policy() -> None:
    backups = daily(3, verified=False) + [Candidate("old-good", START - timedelta(days=30), True)]
    decision = decide(backups, Policy(last=1, daily=0, weekly=0, monthly=0))
    assert "old-good" in decision.keep
    assert decision.reasons["old-good"][0] == "newest verified"


def test_unverified_backups_do_not_use_up_the_quota_of_good_ones() -> None:
    good = daily(3)
    bad = [Candidate(f"bad-{n}", START - timedelta(days=1, minutes=n + 1), False) for n in range(5)]
    decision = decide(good + bad, Policy(last=3, daily=0, weekly=0, monthly=0))
    assert decision.keep == [b.backup_id for b in good]
    assert sorted(decision.delete) == sorted(b.backup_id for b in bad)


def test_an_unverified_backup_newer_than_every_verified_one_is_kept() -> None:
    pending = Candidate("pending", START + timedelta(hours=1), None)
    decision = decide([pending, *daily(3)], Policy(last=1, daily=0, weekly=0, monthly=0))
    assert decision.keep[0] == "pending" and decision.reasons["pending"] == ["newer than the newest verified"]


def test_naive_timestamps_are_treated_as_utc_and_ties_are_stable() -> None:
    a = Candidate("a", datetime(2026, 1, 1, 12), True)
    b = Candidate("b", datetime(2026, 1, 1, 12, tzinfo=UTC), True)
    assert decide([a, b], Policy(last=1, daily=0, weekly=0, monthly=0)).keep == ["b"]


def test_an_empty_repository_keeps_and_deletes_nothing() -> None:
    decision = decide([], Policy())
    assert decision.keep == [] and decision.delete == []
