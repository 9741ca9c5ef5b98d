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


def job(rid: str, t: float, tokens: float | None, priority: int = 0) -> Entry[str]:
    return Entry(rid, t, item=rid, priority=priority, predicted_tokens=tokens)


def drain(s: Scheduler[str], now: float) -> list[str]:
    out = []
    while (e := s.next(now)) is not None:
        out.append(e.item)
    return out


def test_sjf_runs_shortest_prediction_first_ties_by_arrival() -> None:
    s: Scheduler[str] = Scheduler("sjf")
    s.add(job("long", 0, 900))
    s.add(job("short", 1, 20))
    s.add(job("mid", 2, 300))
    s.add(job("short2", 3, 20))
    assert drain(s, 4) == ["short", "short2", "mid", "long"]


def test_unknown_prediction_sorts_as_a_medium_job() -> None:
    s: Scheduler[str] = Scheduler("sjf")
    s.add(job("long", 0, 2000))
    s.add(job("unknown", 1, None))
    s.add(job("short", 2, 10))
    assert drain(s, 3) == ["short", "unknown", "long"]


def test_priority_first_then_sjf_within_a_level() -> None:
    s: Scheduler[str] = Scheduler("priority")
    s.add(job("bg-short", 0, 10, priority=5))
    s.add(job("fg-long", 1, 900, priority=0))
    s.add(job("fg-short", 2, 10, priority=0))
    s.add(job("urgent", 3, 500, priority=-1))
    assert drain(s, 4) == ["urgent", "fg-short", "fg-long", "bg-short"]


def test_aging_lets_the_oldest_jump_ahead_once_it_waited_tau() -> None:
    s: Scheduler[str] = Scheduler("sjf", aging_s=10.0)
    s.add(job("long", 0, 900))
    for i in range(5):
        s.add(job(f"short{i}", 1 + i, 10))
    assert s.next(5.0).item == "short0"  # type: ignore[union-attr]
    assert s.next(9.9).item == "short1"  # type: ignore[union-attr]
    view = s.snapshot(10.0)
    assert view[0].request_id == "long" and view[0].aged
    assert s.next(10.0).item == "long"  # type: ignore[union-attr]  # waited 10 s = tau: it goes next
    assert drain(s, 10.0) == ["short2", "short3", "short4"]


def test_aging_bound_holds_under_a_stream_of_short_jobs() -> None:
    # A long job arrives first, then a short job every second forever; service takes 1 s each.
    # With tau = 5 the long job must start within tau + one service time.
    tau = 5.0
    s: Scheduler[str] = Scheduler("sjf", aging_s=tau)
    s.add(job("long", 0.0, 1000))
    now, started = 0.0, None
    for i in range(50):
        s.add(job(f"s{i}", now, 5))
        e = s.next(now)
        assert e is not None
        if e.item == "long":
            started = now
            break
        now += 1.0
    assert started is not None and started <= tau + 1.0


def test_sjf_without_aging_would_starve_the_long_job() -> None:
    s: Scheduler[str] = Scheduler("sjf")  # aging disabled: the failure mode aging exists for
    s.add(job("long", 0.0, 1000))
    taken = []
    for i in range(50):
        s.add(job(f"s{i}", float(i), 5))
        taken.append(s.next(float(i)).item)  # type: ignore[union-attr]
    assert "long" not in taken


def test_aging_must_be_positive() -> None:
    with pytest.raises(InvalidParameterError):
        Scheduler("sjf", aging_s=0)


def test_aging_tracker_follows_short_requests_only() -> None:
    from edgeserve.scheduler import AgingTracker

    t = AgingTracker(factor=10, alpha=0.5)
    assert t.observe(900, 30.0) is None  # long: says nothing about short service time
    assert t.observe(50, 2.0) == 20.0
    assert t.observe(50, 4.0) == 30.0  # running estimate (2 + 4) / 2


def test_cancel_with_an_item_removes_only_that_entry() -> None:
    s: Scheduler[str] = Scheduler("fcfs")
    s.add(Entry("x", 0.0, item="new"))
    assert s.cancel("x", "old") is None  # a stale handle of an earlier request with the same id
    assert s.cancel("x", "new") is not None


# ---- service cost and preemption ------------------------------------------------------------


def test_sjf_orders_by_cost_when_given_not_answer_length() -> None:
    s: Scheduler[str] = Scheduler("sjf")
    # A short answer behind a long prompt costs more than a longer answer to a short prompt.
    s.add(Entry("long-history", 0.0, "a", predicted_tokens=20, cost=220.0))
    s.add(Entry("short-prompt", 1.0, "b", predicted_tokens=60, cost=65.0))
    assert s.next(2.0).request_id == "short-prompt"  # type: ignore[union-attr]


def test_srpt_preempts_only_past_the_hysteresis_and_the_switch_cost() -> None:
    s: Scheduler[str] = Scheduler("srpt", aging_s=100.0, hysteresis=2.0)
    running = Entry("running", 0.0, "r", cost=100.0)
    s.add(Entry("challenger", 1.0, "c", cost=45.0))
    assert s.preempts(running, 2.0) is not None  # 2 x 45 < 100
    assert s.preempts(running, 2.0, switch_cost=10.0) is None  # 2 x (45 + 10) > 100
    assert s.preempts(Entry("running", 0.0, "r", cost=80.0), 2.0) is None  # 90 > 80: keep running
    assert len(s) == 1  # preempts only looks


def test_srpt_aged_requests_preempt_younger_ones_but_never_take_turns() -> None:
    s: Scheduler[str] = Scheduler("srpt", aging_s=10.0)
    s.add(Entry("old-long", 0.0, "o", cost=1000.0))
    young_short = Entry("young", 5.0, "y", cost=1.0)
    assert s.preempts(young_short, 9.0) is None  # not aged yet, and far costlier
    assert s.preempts(young_short, 10.0) is not None  # aged: it goes next, whatever the costs
    older_running = Entry("older", -5.0, "x", cost=5000.0)
    assert s.preempts(older_running, 10.0) is None  # arrival order among the aged


def test_non_preemptive_policies_never_preempt() -> None:
    for policy in ("fcfs", "sjf", "priority"):
        s: Scheduler[str] = Scheduler(policy)
        s.add(Entry("tiny", 1.0, "t", cost=1.0))
        assert s.preempts(Entry("huge", 0.0, "h", cost=1e9), 2.0) is None


def test_a_readmitted_entry_ignores_capacity_and_keeps_its_arrival() -> None:
    s: Scheduler[str] = Scheduler("srpt", capacity=1, aging_s=10.0)
    s.add(Entry("waiting", 5.0, "w", cost=50.0))
    with pytest.raises(QueueFullError, match="1 request waiting"):
        s.add(Entry("new", 6.0, "n"))
    s.add(Entry("preempted", 0.0, "p", cost=80.0), readmit=True)
    assert len(s) == 2
    assert s.next(10.0).request_id == "preempted"  # type: ignore[union-attr]  # aged from its first arrival
