"""Asyncio admission over the scheduler: slots, policy order, cancellation, capacity."""

from __future__ import annotations

import asyncio

import pytest

from edgeserve.admission import Admission, HoldTimes
from edgeserve.errors import QueueFullError


async def hold(adm: Admission, rid: str, log: list[str], release: asyncio.Event, tokens: float) -> None:
    async with adm.slot(rid, predicted_tokens=tokens):
        log.append(rid)
        await release.wait()


def test_waiters_are_admitted_in_sjf_order_one_at_a_time() -> None:
    async def main() -> list[str]:
        adm = Admission("sjf", max_inflight=1)
        log: list[str] = []
        gates = {rid: asyncio.Event() for rid in ("first", "long", "short", "mid")}
        tasks = [asyncio.create_task(hold(adm, "first", log, gates["first"], 500))]
        await asyncio.sleep(0)
        for rid, tokens in (("long", 900), ("short", 5), ("mid", 100)):
            tasks.append(asyncio.create_task(hold(adm, rid, log, gates[rid], tokens)))
        await asyncio.sleep(0)
        assert log == ["first"] and adm.waiting == 3 and adm.inflight == 1
        for rid in ("first", "short", "mid", "long"):
            gates[rid].set()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert adm.inflight == 0
        return log

    assert asyncio.run(main()) == ["first", "short", "mid", "long"]


def test_cancelled_waiter_leaves_the_queue_and_admitted_one_frees_its_slot() -> None:
    async def main() -> None:
        adm = Admission("fcfs", max_inflight=1)
        log: list[str] = []
        gate = asyncio.Event()
        running = asyncio.create_task(hold(adm, "a", log, gate, 1))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(hold(adm, "b", log, asyncio.Event(), 1))
        await asyncio.sleep(0)
        assert adm.waiting == 1
        waiting.cancel()  # client disconnected while queued
        await asyncio.sleep(0)
        assert adm.waiting == 0
        running.cancel()  # client disconnected while being served
        await asyncio.sleep(0)
        assert adm.inflight == 0
        async with adm.slot("c") as ticket:
            assert ticket.position == 0 and ticket.waited_s == 0.0

    asyncio.run(main())


def test_full_queue_raises_and_max_inflight_allows_parallel_holders() -> None:
    async def main() -> None:
        adm = Admission("fcfs", max_inflight=2, capacity=1)
        gate = asyncio.Event()
        log: list[str] = []
        tasks = [asyncio.create_task(hold(adm, f"r{i}", log, gate, 1)) for i in range(3)]
        await asyncio.sleep(0)
        assert adm.inflight == 2 and adm.waiting == 1
        with pytest.raises(QueueFullError):
            async with adm.slot("overflow"):
                pass
        assert [v.request_id for v in adm.snapshot()] == ["r2"]
        gate.set()
        await asyncio.gather(*tasks)
        assert sorted(log) == ["r0", "r1", "r2"] and adm.inflight == 0

    asyncio.run(main())


def test_sjf_orders_by_predicted_service_time_when_costs_are_given() -> None:
    """Issue 12: a short answer behind a long prompt is not a short job; cost_s (prefill plus decode
    seconds) orders the queue, not the answer tokens alone."""

    async def main() -> list[str]:
        adm = Admission("sjf", max_inflight=1)
        log: list[str] = []
        gates = {rid: asyncio.Event() for rid in ("first", "long-prompt", "short-prompt")}

        async def hold_cost(rid: str, tokens: float, cost_s: float | None) -> None:
            async with adm.slot(rid, predicted_tokens=tokens, cost_s=cost_s):
                log.append(rid)
                await gates[rid].wait()

        tasks = [asyncio.create_task(hold_cost("first", 500, None))]
        await asyncio.sleep(0)
        # Fewer answer tokens, but a history that takes 6 s to prefill.
        tasks.append(asyncio.create_task(hold_cost("long-prompt", 20, 6.0)))
        tasks.append(asyncio.create_task(hold_cost("short-prompt", 60, 1.0)))
        await asyncio.sleep(0)
        for rid in ("first", "short-prompt", "long-prompt"):
            gates[rid].set()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        return log

    assert asyncio.run(main()) == ["first", "short-prompt", "long-prompt"]


def test_retry_after_is_the_queue_drain_time_at_measured_service_times() -> None:
    """Issue 19, defect 8: Retry-After is the work ahead (waiting requests plus what the holder still
    needs) at the measured hold times, not a constant 1."""

    async def main() -> None:
        now = [0.0]
        adm = Admission("fcfs", max_inflight=1, capacity=2, clock=lambda: now[0], prior_service_s=1.0)
        ticket = await adm.acquire("warmup")
        now[0] = 3.0
        adm.release(ticket)  # one measured hold of 3 s replaces the prior
        assert adm.holds.mean_s == 3.0
        holder = await adm.acquire("holder")
        waiters = [asyncio.create_task(adm.acquire(f"w{i}")) for i in range(2)]
        await asyncio.sleep(0)
        now[0] = 4.0  # the holder has held 1 s of its expected 3
        with pytest.raises(QueueFullError) as full:
            await adm.acquire("refused")
        assert full.value.retry_after_s == pytest.approx(3 + 3 + 2)
        adm.release(holder)
        for w in waiters:
            adm.release(await w)
        assert adm.inflight == 0 and adm.drain_s(now[0]) == 1.0  # nothing ahead: Retry-After's floor

    asyncio.run(main())


def test_hold_times_separate_per_request_overhead_from_predicted_cost() -> None:
    """Measured holds are overhead + scale x predicted cost: a small model on a loaded machine spends
    most of a request outside what token rates explain, and Retry-After sums such requests."""
    holds = HoldTimes(prior_s=2.0)
    assert holds.estimate_s(None) == 2.0 and holds.estimate_s(0.5) == 0.5  # nothing measured yet
    for cost in (0.1, 0.5, 0.2, 1.0, 0.3, 0.8):
        holds.observe(0.9 + 2.0 * cost, cost)  # 0.9 s overhead, twice the predicted time
    overhead, scale = holds.fit()
    assert overhead == pytest.approx(0.9) and scale == pytest.approx(2.0)
    assert holds.estimate_s(0.4) == pytest.approx(1.7)
    alike = HoldTimes(prior_s=1.0)
    for held in (1.0, 1.2, 1.4):
        alike.observe(held, 0.3)  # costs too alike to separate the terms: the mean hold
    assert alike.estimate_s(0.3) == pytest.approx(alike.mean_s) == alike.estimate_s(5.0)
