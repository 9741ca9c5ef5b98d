"""Asyncio admission over the scheduler: slots, policy order, cancellation, capacity."""

from __future__ import annotations

import asyncio

import pytest

from edgeserve.admission import Admission
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
