"""The single reading of a group's backlog from XINFO GROUPS + XLEN."""

from __future__ import annotations

from headrace.workers.broker.backlog import Backlog, group_backlog


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


def test_missing_group_has_every_entry_unread() -> None:
    # Producers never create the group; the first worker creates it at 0 and reads them all.
    assert group_backlog([{"name": "x", "lag": 1, "pending": 1}], "workers", 9) == Backlog(9, 0)
    assert group_backlog([], "workers", 0) == Backlog(0, 0)


def test_phantom_lag_over_untrimmed_stream_is_zero_when_nothing_is_after_the_last_delivered_id() -> None:
    # Acknowledged entries not trimmed yet keep XLEN high, so only the ids can tell.
    rows = [{"name": "workers", "lag": 400, "pending": 2, "last-delivered-id": b"1700000000000-5"}]
    assert group_backlog(rows, "workers", 500, last_id="1700000000000-5") == Backlog(0, 2)
    assert group_backlog(rows, "workers", 500, last_id="1699999999999-9") == Backlog(0, 2)
    # A newer entry exists: unread entries are real (the lag stays bounded by XLEN - pending).
    assert group_backlog(rows, "workers", 500, last_id="1700000000000-6") == Backlog(400, 2)
    assert group_backlog(rows, "workers", 500) == Backlog(400, 2)  # no tail id given: as before


def test_stale_lag_is_flagged_only_when_nothing_follows_the_last_delivered_id() -> None:
    from headrace.workers.broker.backlog import stale_lag

    rows = [{"name": b"workers", "lag": 400, "pending": 0, "last-delivered-id": b"10-3"}]
    assert stale_lag(rows, "workers", "10-3") and stale_lag(rows, "workers", "9-9")
    assert not stale_lag(rows, "workers", "10-4")  # newer entries: the lag may be real
    assert not stale_lag(rows, "workers", None) and not stale_lag(rows, "other", "10-3")
    assert not stale_lag([{**rows[0], "lag": 0}], "workers", "10-3")
    assert stale_lag([{**rows[0], "lag": None}], "workers", "10-3")
