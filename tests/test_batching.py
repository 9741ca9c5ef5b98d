"""Continuous batching: the loop's batch on the scripted backend (slot filling in the policy's
order, srpt displacing inside a full batch, aging), the batch-width rule, and the real model
decoding several requests in one batched step."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from streams import result as _result
from streams import started as _started

from edgeserve import Engine, EngineSettings, FinishReason, ModelSettings, SamplingParams
from edgeserve.errors import KVCacheFullError
from edgeserve.scripted import ScriptedBackend
from edgeserve.width import MIN_SAMPLES, RETRY_S, BatchWidth, finish_times, quickest

LONG = SamplingParams(max_tokens=120, temperature=0.9, seed=1, ignore_eos=True)
SHORT = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def _engine(backend: ScriptedBackend, **settings: object) -> Engine:
    defaults: dict[str, object] = {"policy": "srpt", "preempt_quantum_s": 0.0, "aging_s": 1000.0}
    return Engine(backend, EngineSettings(**{**defaults, **settings}), fixed_width=True)  # type: ignore[arg-type]


def _wide(**fields: object) -> ScriptedBackend:
    return ScriptedBackend(**{"max_sequences": 4, "max_batch": 4, "step_s": 0.002, **fields})  # type: ignore[arg-type]


def test_a_full_batch_decodes_in_one_call_and_each_text_is_its_solo_text() -> None:
    prompts = [f"request {i}" for i in range(6)]
    with _engine(_wide(), policy="fcfs") as engine:
        solo = [engine.generate(p, LONG).text for p in prompts]
    backend = _wide()
    with _engine(backend, policy="fcfs") as engine:
        handles = [engine.submit(p, LONG) for p in prompts]
        texts = [h.result().text for h in handles]
    assert texts == solo  # no leak between sequences, no lost or replayed draw
    assert max(len(b) for b in backend.batches) == 4
    assert all(len(b) <= 4 for b in backend.batches)


def test_free_places_are_filled_shortest_predicted_first() -> None:
    backend = _wide()
    with _engine(backend, policy="sjf") as engine:
        blockers = [_started(engine.submit(f"blocker {i}", LONG, predicted_tokens=120)) for i in range(4)]
        # The batch is full: these wait, and take the places in order of predicted length.
        longs = [engine.submit(f"long {i}", LONG, predicted_tokens=500) for i in range(3)]
        shorts = [engine.submit(f"short {i}", SHORT, predicted_tokens=4) for i in range(4)]
        short_results = [h.result() for h in shorts]
        long_results = [h.result() for h in longs]
        blocked = [_result(events) for events in blockers]
    assert all(r.preemptions == 0 for r in [*short_results, *long_results, *blocked])  # sjf never displaces
    assert max(r.queue_wait_s for r in short_results) < min(r.queue_wait_s for r in long_results)


def test_a_burst_of_short_prompts_is_prefilled_in_one_turn_and_a_long_one_in_chunks() -> None:
    """The prefill chunk is a budget of prompt tokens a turn, shared by the requests that wait for
    their prefill: four short prompts all join the first decode step, not one a turn; a prompt
    longer than the budget is spread over turns, with decode steps between its chunks."""
    backend = _wide()
    with _engine(backend, policy="fcfs", prefill_chunk=64) as engine:
        held, go = threading.Event(), threading.Event()

        def hold(_backend: object) -> None:  # keeps the loop busy while the burst queues up
            held.set()
            go.wait()

        holder = threading.Thread(target=engine.call, args=(hold,))
        holder.start()
        held.wait()
        handles = [engine.submit(f"short {i}", SHORT) for i in range(4)]
        go.set()
        holder.join()
        assert all(h.result().completion_tokens == 4 for h in handles)
        first_decode = next(i for i, (name, _) in enumerate(backend.calls) if name == "decode")
        prefilled = {seq for name, seq in backend.calls[:first_decode] if name == "prefill"}
        assert len(prefilled) == 4 and set(backend.batches[0]) == prefilled

        backend.calls.clear()
        # 64 tokens a turn alone, 16 beside decodes: a 200-token prompt next to a running request.
        running = _started(engine.submit("running", LONG))
        long = engine.submit("x" * 200, SHORT)
        assert long.result().completion_tokens == 4
        _result(running)
    long_seq = [seq for name, seq in backend.calls if name == "prefill"][-1]
    prefills = [i for i, (name, seq) in enumerate(backend.calls) if name == "prefill" and seq == long_seq]
    assert len(prefills) > 1
    assert all(any(name == "decode" for name, _ in backend.calls[a:b]) for a, b in itertools.pairwise(prefills))


@pytest.mark.parametrize("aging_s", [1000.0, 0.05])
def test_under_srpt_a_long_prompt_waits_while_a_much_shorter_answer_decodes_until_it_ages(aging_s: float) -> None:
    """A prompt chunk stalls every decoding request; under SRPT a long request's prompt waits for
    an answer a quarter its size or less, and prefills once it has aged (the short answer's 24
    steps take at least 0.24 s, so the long request ages while it decodes)."""
    backend = _wide(step_s=0.01)
    answer = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with _engine(backend, prefill_chunk=64, aging_s=aging_s) as engine:
        short = _started(engine.submit("short", answer, predicted_tokens=24))
        long = engine.submit("x" * 200, LONG, predicted_tokens=120)
        assert _result(short).completion_tokens == 24
        assert long.result().completion_tokens == 120
    short_seq, long_seq = (seq for name, seq in backend.calls if name == "open")
    last_short_decode = max(i for i, (name, seq) in enumerate(backend.calls) if name == "decode" and seq == short_seq)
    long_prefills = [i for i, (name, seq) in enumerate(backend.calls) if name == "prefill" and seq == long_seq]
    assert len(long_prefills) > 1
    if aging_s > 1:
        assert min(long_prefills) > last_short_decode
    else:
        assert min(long_prefills) < last_short_decode


def test_a_short_arrival_displaces_the_longest_remaining_request_of_a_full_batch() -> None:
    backend = _wide()
    with _engine(backend) as engine:
        solo = {n: engine.generate(f"long {n}", LONG).text for n in (100, 200, 300, 900)}
        streams = {n: _started(engine.submit(f"long {n}", LONG, predicted_tokens=n)) for n in (100, 200, 300, 900)}
        short = engine.submit("short", SHORT, predicted_tokens=4).result()
        results = {n: _result(events) for n, events in streams.items()}
    assert results[900].preemptions == 1  # the longest remaining one made room
    assert all(results[n].preemptions == 0 for n in (100, 200, 300))
    assert all(results[n].text == solo[n] for n in results)  # parked or not, the same seeded text
    assert short.total_s < min(r.total_s for r in results.values())


def test_under_srpt_a_batch_the_width_rule_narrows_sheds_the_requests_with_the_most_work_left() -> None:
    """Four answers of equal length decoding together end together; narrowed to two (as the width
    rule narrows it for the work present), the batch sheds the two predicted to have the most
    left, which wait in the queue, resume once the others end, and give their solo text."""
    backend = _wide()
    predicted = (100, 200, 300, 400)
    with _engine(backend) as engine:
        solo = {n: engine.generate(f"long {n}", LONG).text for n in predicted}
        backend.calls.clear()
        backend.batches.clear()
        streams = {n: _started(engine.submit(f"long {n}", LONG, predicted_tokens=n)) for n in predicted}
        engine._loop.width.most = 2  # fixed width: the limit is whatever ``most`` says
        results = {n: _result(events) for n, events in streams.items()}
    assert [results[n].preemptions for n in predicted] == [0, 0, 1, 1]
    assert all(results[n].text == solo[n] for n in predicted)
    seqs = dict(zip(predicted, (seq for name, seq in backend.calls if name == "open"), strict=True))
    widest = max(i for i, batch in enumerate(backend.batches) if len(batch) == 4)
    after = backend.batches[widest + 1 :]
    assert after and all(len(batch) <= 2 for batch in after)
    last = {n: max(i for i, batch in enumerate(after) if seqs[n] in batch) for n in predicted}
    resumed = min(i for i, batch in enumerate(after) if {seqs[300], seqs[400]} & set(batch))
    assert min(last[100], last[200]) < resumed  # a shed one resumed only once a place freed up


@pytest.mark.parametrize("policy", ["sjf", "srpt"])
def test_a_full_kv_memory_parks_the_longest_and_every_answer_is_its_solo_text(policy: str) -> None:
    """Four sequences share cells for about two and a half: when they fill up, the request with
    the most work left is parked and waits for one to end; every answer still comes out whole and
    exactly as alone."""
    prompts = [f"request {i}" for i in range(4)]
    with _engine(_wide(), policy="fcfs") as engine:
        solo = [engine.generate(p, LONG).text for p in prompts]
    backend = _wide(kv_cells=320)  # four answers of 120 tokens need 4 x ~140
    with _engine(backend, policy=policy) as engine:
        handles = [engine.submit(p, LONG, predicted_tokens=100 + 10 * i) for i, p in enumerate(prompts)]
        results = [h.result() for h in handles]
        assert [r.text for r in results] == solo
        assert all(r.finish_reason is FinishReason.LENGTH for r in results)
        assert sum(r.preemptions for r in results) >= 1 and results[0].preemptions == 0  # the shortest ran on
        assert any(name == "park" for name, _ in backend.calls)
        # The memory is free again: a new request runs at once, and nothing is left open.
        assert engine.generate("after", SHORT).completion_tokens == 4
    assert backend.open_sequences == []


def test_a_request_that_alone_outgrows_the_kv_memory_gets_an_error_and_the_engine_goes_on() -> None:
    backend = _wide(kv_cells=60)
    with _engine(backend) as engine:
        with pytest.raises(KVCacheFullError):
            engine.generate("too long for the cells", SamplingParams(max_tokens=100, ignore_eos=True))
        assert engine.generate("fits", SHORT).completion_tokens == 4
    assert backend.open_sequences == []


def test_aging_bounds_the_wait_of_a_long_request_behind_a_stream_of_short_ones() -> None:
    backend = _wide(step_s=0.003)
    with _engine(backend, aging_s=0.3) as engine:
        stop = threading.Event()

        def shorts() -> None:
            while not stop.is_set():
                handles = [engine.submit("short", SHORT, predicted_tokens=4) for _ in range(4)]
                for h in handles:
                    h.result()

        feeder = threading.Thread(target=shorts)
        feeder.start()
        time.sleep(0.1)
        try:
            long = engine.submit("long", SamplingParams(max_tokens=10, ignore_eos=True), predicted_tokens=5000).result()
        finally:
            stop.set()
            feeder.join()
    assert long.completion_tokens == 10
    assert long.queue_wait_s < 0.3 + 1.0  # the aging threshold plus a few turns, never starvation


def test_the_width_rule() -> None:
    width = BatchWidth(16, floor_tok_s=10.0, fixed=False)

    def measure(n: int, step_s: float, now: float = 0.0) -> None:
        for _ in range(MIN_SAMPLES):
            width.observe(n, step_s, now)

    assert width.limit(0.0) == 16  # nothing measured: every width counts as good
    measure(3, 0.0325)
    measure(4, 0.040)  # neighbours: too close to fit a line through
    assert width.limit(0.0) == 16
    measure(1, 0.0175)  # a = 10 ms, b = 7.5 ms: the floor (100 ms a step) allows 12 sequences
    assert width.limit(0.0) == 12
    width.observe(8, 0.2, 0.0)  # 5 tok/s per sequence: under the floor, but one step is noise
    assert width.limit(0.0) == 12
    measure(8, 0.2)  # now it counts, and it gave less throughput than 4: no line fits, the best rate wins
    assert width.limit(0.0) == 4
    assert width.limit(RETRY_S + 1) == 16  # measurements expire: a width judged under contention is tried again
    measure(8, 0.2, RETRY_S + 1)  # alone, it can only be compared with the floor: never as wide as under it
    assert width.limit(RETRY_S + 1) == 7

    # A step that grows faster than the width (compute-bound from one sequence on): one at a time.
    bound = BatchWidth(16, floor_tok_s=1.0, fixed=False)
    for n in (1, 2, 4):
        for _ in range(MIN_SAMPLES):
            bound.observe(n, 0.02 * n**1.2, 0.0)
    assert bound.limit(0.0) == 1

    # 14 ms shared and 4.5 ms a sequence (this CPU at 2 threads): doubling pays up to 59 sequences,
    # so a fast floor is what binds, (1/18 - a) / b = 9.2.
    cpu = BatchWidth(16, floor_tok_s=18.0, fixed=False)
    for n in (1, 4, 8):
        for _ in range(MIN_SAMPLES):
            cpu.observe(n, 0.014 + 0.0045 * n, 0.0)
    assert cpu.limit(0.0) == 9
    # Where every sequence adds much more than the shared cost, doubling stops paying first:
    # a = 2 ms, b = 10 ms: rate(w) / rate(w / 2) >= 1.05 up to w = 19 * a / b = 3.8.
    flat = BatchWidth(16, floor_tok_s=1.0, fixed=False)
    for n in (1, 2, 4):
        for _ in range(MIN_SAMPLES):
            flat.observe(n, 0.002 + 0.010 * n, 0.0)
    assert flat.limit(0.0) == 3

    assert BatchWidth(8, floor_tok_s=10.0, fixed=True).limit(0.0) == 8
    pinned = BatchWidth(4, floor_tok_s=1e9, fixed=True)
    pinned.observe(4, 10.0, 0.0)
    assert pinned.limit(0.0) == 4


def test_finish_times_run_the_shortest_first_and_refill_places_at_once() -> None:
    # Two places, steps of 1 + 1 per sequence: 2 and 4 run (3 s a step) until 2 ends at 6 s; then
    # 4 and 6 until 4 ends (2 more steps, 12 s); 6 runs alone its last 4 steps (2 s each, 20 s).
    mean, last = finish_times([6, 2, 4], 2, 1.0, 1.0)
    assert (mean, last) == pytest.approx(((6 + 12 + 20) / 3, 20))


def test_the_quickest_width_for_the_present_work() -> None:
    work = [20.0 * i for i in range(1, 13)]
    # A step that costs little more for more sequences: the widest batch ends everything soonest.
    assert quickest(work, 0.030, 0.002, 16) == 16
    # One that grows almost with the width (a slow CPU): a narrower batch ends the requests
    # sooner on average, and all of them within MAKESPAN_SLACK of the earliest end.
    narrower = quickest(work, 0.016, 0.017, 16)
    assert 1 < narrower < 12
    mean, last = finish_times(work, narrower, 0.016, 0.017)
    wide_mean, _ = finish_times(work, 12, 0.016, 0.017)
    assert mean < wide_mean and last <= 1.05 * min(finish_times(work, w, 0.016, 0.017)[1] for w in range(1, 17))


def test_the_width_follows_the_present_work_and_keeps_room_for_short_requests() -> None:
    width = BatchWidth(16, floor_tok_s=1.0, fixed=False)
    for n in (1, 4, 8, 16):
        for _ in range(MIN_SAMPLES):
            width.observe(n, 0.016 + 0.017 * n, 0.0)
    work = [20.0 * i for i in range(1, 13)]
    assert width.limit(0.0) == 16  # nothing present to weigh: the throughput rule alone
    narrow = width.limit(0.0, work)
    assert narrow == quickest(work, 0.016, 0.017, 16) < 12
    assert width.limit(0.0, work, short=11) == 11  # every request predicted short gets a place
    # After an idle spell the fresh measurements have expired, but the settled step still
    # chooses the width for a new burst.
    assert width.limit(RETRY_S + 60, work) == narrow


def test_the_engine_narrows_the_batch_when_wider_steps_add_no_throughput() -> None:
    # Each further sequence costs more than a step alone: a wider batch loses throughput.
    backend = _wide(step_s=0.003, batch_cost=1.5)
    with Engine(backend, EngineSettings(policy="fcfs")) as engine:
        assert engine.parallel == 4  # nothing measured yet
        engine.generate("alone", SamplingParams(max_tokens=30, ignore_eos=True))  # the one-sequence rate
        handles = [engine.submit(f"r{i}", SamplingParams(max_tokens=30, ignore_eos=True)) for i in range(12)]
        for h in handles:
            h.result()
        assert engine.parallel == 1
    assert max(len(b) for b in backend.batches) > 1  # it tried wider batches


# ---- the real model ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["exact", "unified"])
def batched(
    request: pytest.FixtureRequest, model_settings: ModelSettings, default_model_path: Path
) -> Iterator[tuple[Engine, bool]]:
    """Four sequences decoded together in one batched step (``--parallel 4``), with a KV stream per
    sequence (``--no-kv-unified``, exact) and with the default shared cache."""
    wide = model_settings.model_copy(update={"parallel": 4, "kv_unified": request.param})
    with Engine.from_settings(wide, EngineSettings(max_queue=16)) as eng:
        yield eng, request.param


GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
PROMPTS = ["The three primary colours are", "My favourite animal is", "def fibonacci(n):", "List of fruits:"]


def test_four_requests_decode_together_on_the_real_model(batched: tuple[Engine, bool], record_property: Any) -> None:
    engine, unified = batched
    solo = [engine.generate(p, GREEDY).text for p in PROMPTS]
    streams = [_started(engine.submit(p, GREEDY)) for p in PROMPTS]
    assert engine.running == 4  # all four in the batch at once, none queued behind another
    together = [_result(events) for events in streams]
    assert all(r.completion_tokens == 16 for r in together)
    agreement = [_shared_start(r.text, alone) / max(len(alone), 1) for r, alone in zip(together, solo, strict=True)]
    record_property("batched_vs_solo_text_prefix_agreement", agreement)
    if not unified:  # a stream per sequence: the very same greedy text as alone
        assert [r.text for r in together] == solo
    else:  # a shared cache: the summation order may differ, but not the start of every answer
        assert all(share > 0 for share in agreement), agreement


def _shared_start(a: str, b: str) -> int:
    """Characters at the start of ``a`` and ``b`` that agree."""
    return sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(a, b, strict=False)))


def test_sequences_sharing_a_small_kv_memory_on_the_real_model(
    model_settings: ModelSettings, default_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--parallel`` unset: 16 sequences share the cells of the full contexts the memory allows,
    here one of 1024 tokens. Four prompts of ~450 tokens outgrow it together: llama.cpp reports no
    room, the engine parks a sequence and resumes it later, and every answer comes out whole."""
    from edgeserve.backends import llama

    monkeypatch.setattr(llama, "MOST_CONTEXTS", 1)
    small = model_settings.model_copy(update={"n_ctx": 1024})
    prompts = [f"Note {i}: " + "the quick brown fox jumps over the lazy dog. " * 45 for i in range(4)]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    with Engine.from_settings(small, EngineSettings(max_queue=16)) as engine:
        caps = engine.capabilities
        assert caps.max_sequences == llama.MOST_SHARED_SEQUENCES and caps.n_ctx == 1024
        assert caps.kv_bytes < 2 * 1024 * 32 * 1024  # one context's cells, not one for each sequence
        handles = [engine.submit(p, params) for p in prompts]
        results = [h.result() for h in handles]
        assert all(r.completion_tokens == 48 and r.finish_reason is FinishReason.LENGTH for r in results)
        assert sum(r.preemptions for r in results) >= 1
        assert engine.generate(PROMPTS[0], GREEDY).completion_tokens == 16
