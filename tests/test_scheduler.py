"""The admission queue as a pure data structure: no threads, time passed in."""

import pytest

from edgeserve.errors import InvalidParameterError, QueueFullError
from edgeserve.scheduler import Entry, Scheduler


def entry(rid: str, t: float) -> Entry[str]:
    return Entry(rid, t, item=rid)


def test_fcfs_runs_in_arrival_order() -> None:
    s: Scheduler[str] = Scheduler("fcfs", capacity=4)
    for i, rid in enumerate("abc"):
        s.add(entry(rid, float(i)))
    assert [s.next(10.0).item for _ in range(3)] == ["a", "b", "c"]  # type: ignore[union-attr]
    assert s.next(10.0) is None


def test_capacity_refuses_with_retry_after_and_cancel_frees_a_slot() -> None:
    s: Scheduler[str] = Scheduler("fcfs", capacity=2, retry_after_s=3.0)
    s.add(entry("a", 0))
    s.add(entry("b", 0))
    with pytest.raises(QueueFullError) as info:
        s.add(entry("c", 0))
    assert info.value.retry_after_s == 3.0
    assert s.cancel("a") is not None
    s.add(entry("c", 1))
    assert len(s) == 2


def test_cancelled_entry_is_skipped_and_not_in_snapshot() -> None:
    s: Scheduler[str] = Scheduler("fcfs")
    for rid in "abc":
        s.add(entry(rid, 0))
    assert s.cancel("b") is not None
    assert s.cancel("b") is None  # already gone
    assert [v.request_id for v in s.snapshot(5.0)] == ["a", "c"]
    assert s.next(5.0).item == "a"  # type: ignore[union-attr]
    assert s.next(5.0).item == "c"  # type: ignore[union-attr]


def test_snapshot_reports_positions_and_waits_from_the_given_clock() -> None:
    s: Scheduler[str] = Scheduler("fcfs")
    s.add(entry("a", 1.0))
    s.add(entry("b", 2.5))
    views = s.snapshot(4.0)
    assert [(v.request_id, v.position, v.waited_s) for v in views] == [("a", 0, 3.0), ("b", 1, 1.5)]


def test_readding_a_cancelled_id_does_not_resurrect_the_old_entry() -> None:
    s: Scheduler[str] = Scheduler("fcfs")
    s.add(Entry("x", 0.0, item="old"))
    s.cancel("x")
    s.add(Entry("x", 1.0, item="new"))
    assert s.next(2.0).item == "new"  # type: ignore[union-attr]
    assert s.next(2.0) is None


def test_duplicate_live_id_and_unknown_policy_are_errors() -> None:
    s: Scheduler[str] = Scheduler("fcfs")
    s.add(entry("a", 0))
    with pytest.raises(InvalidParameterError):
        s.add(entry("a", 0))
    with pytest.raises(InvalidParameterError, match="unknown policy"):
        Scheduler("lottery")
