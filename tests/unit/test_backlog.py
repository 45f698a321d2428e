"""The single reading of a group's backlog from XINFO GROUPS + XLEN."""

from __future__ import annotations

from headrace.workers.backlog import Backlog, group_backlog


def test_reported_lag_used_when_consistent() -> None:
    rows = [{"name": b"other", "lag": 50, "pending": 0}, {"name": b"workers", "lag": 3, "pending": 2}]
    assert group_backlog(rows, "workers", stream_length=10) == Backlog(3, 2)


def test_stale_lag_capped_by_stream_length() -> None:
    # Redis 7.0 after an AOF rewrite + restart: lag far beyond what the stream holds.
    rows = [{"name": "workers", "lag": 59_000, "pending": 4}]
    b = group_backlog(rows, "workers", stream_length=10)
    assert b == Backlog(6, 4)
    assert b.total == 10


def test_unknown_lag_bounded_by_stream_length() -> None:
    rows = [{"name": "workers", "lag": None, "pending": 1}]
    assert group_backlog(rows, "workers", stream_length=5) == Backlog(4, 1)


def test_missing_group_has_no_backlog() -> None:
    assert group_backlog([{"name": "x", "lag": 1, "pending": 1}], "workers", 9) == Backlog(0, 0)
