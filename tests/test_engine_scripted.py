"""The engine's own logic on the scripted backend (no model, seconds in all): preemption order and
exact resumption, parking limits, the aging bound under srpt, cancel races, close during prefill,
and a backend failure that leaves the loop alive."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from streams import result as _result
from streams import started as _started

from edgeserve import Engine, EngineSettings, FinishReason, SamplingParams, TokenEvent
from edgeserve.errors import BackendError, EngineClosedError, QueueFullError
from edgeserve.running import Request, Running
from edgeserve.sampling import Sampler
from edgeserve.scripted import ScriptedBackend
from edgeserve.textstream import TextStream

LONG = SamplingParams(max_tokens=200, temperature=0.9, seed=1, ignore_eos=True)
SHORT = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def _engine(backend: ScriptedBackend, **settings: object) -> Engine:
    defaults: dict[str, object] = {"policy": "srpt", "preempt_quantum_s": 0.0, "aging_s": 1000.0}
    return Engine(backend, EngineSettings(**{**defaults, **settings}))  # type: ignore[arg-type]


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend(step_s=0.003)


@pytest.fixture
def engine(backend: ScriptedBackend) -> Iterator[Engine]:
    with _engine(backend) as eng:
        yield eng


def test_a_short_request_displaces_a_long_one_which_resumes_exactly(engine: Engine, backend: ScriptedBackend) -> None:
    solo = engine.generate("a long one", LONG)
    events = _started(engine.submit("a long one", LONG, predicted_tokens=500))
    short = engine.submit("short", SHORT, predicted_tokens=4).result()
    result = _result(events)
    assert result.text == solo.text  # parked, resumed, the same seeded text
    assert result.preemptions == 1 and result.parked_bytes > 0
    assert short.total_s < result.total_s and short.preemptions == 0
    parks = [c for c in backend.calls if c[0] in ("park", "restore")]
    assert parks == [("park", parks[0][1]), ("restore", parks[0][1])]


def test_fcfs_and_sjf_never_preempt(backend: ScriptedBackend) -> None:
    for policy in ("fcfs", "sjf"):
        with _engine(backend, policy=policy) as engine:
            long = _started(engine.submit("a long one", LONG, predicted_tokens=500))
            engine.submit("short", SHORT, predicted_tokens=4).result()
            assert _result(long).preemptions == 0
    assert not any(c[0] == "park" for c in backend.calls)


def test_the_quantum_holds_off_preemption(backend: ScriptedBackend) -> None:
    with _engine(backend, preempt_quantum_s=60.0) as engine:
        long = _started(engine.submit("a long one", LONG, predicted_tokens=500))
        engine.submit("short", SHORT, predicted_tokens=4)
        assert _result(long).preemptions == 0


def test_hysteresis_keeps_a_nearly_done_request_running(engine: Engine) -> None:
    # 60 tokens predicted and running vs a challenger of 40: not twice as short, so no switch.
    long = _started(engine.submit("first", SamplingParams(max_tokens=60, ignore_eos=True), predicted_tokens=60))
    engine.submit("second", SamplingParams(max_tokens=40, ignore_eos=True), predicted_tokens=40)
    assert _result(long).preemptions == 0


def test_the_estimate_of_a_request_that_outlives_its_prediction_doubles_in_steps() -> None:
    request = Request("r", [1, 2, 3], SamplingParams(), 1000, None, 0.0, lambda event: None, predicted_tokens=10)
    run = Running(request, 0, Sampler(SamplingParams()), TextStream(()), frozenset(), 0.0)
    left = []
    for n in (0, 9, 10, 19, 20, 39, 40):
        run.generated = [5] * n
        left.append(run.remaining_tokens())
    # 10 - n until 10, then 20 - n, then 40 - n, ...: it shrinks as the request runs, jumps at each overrun.
    assert left == [10, 1, 10, 1, 20, 1, 40]
    run.generated = [5] * 995
    assert run.remaining_tokens() == 5  # never past max_tokens


def test_a_request_that_outlives_its_prediction_yields() -> None:
    """Predicted short (5 tokens) but really 300: past 40 tokens its estimate is what is left of
    80, far above twice a fresh request's 2, which displaces it."""
    backend = ScriptedBackend(step_s=0.01)
    with _engine(backend) as engine:
        events = _started(
            engine.submit("looks short", SamplingParams(max_tokens=300, ignore_eos=True), predicted_tokens=5)
        )
        for _ in range(44):  # 45 tokens served
            next(events)
        fresh = engine.submit("fresh", SamplingParams(max_tokens=2, ignore_eos=True), predicted_tokens=2).result()
        final = _result(events)
    assert final.preemptions == 1 and fresh.total_s < final.total_s


def test_two_long_requests_do_not_take_turns(engine: Engine) -> None:
    """Both mispredicted, both long: the one running keeps the device between its doublings
    instead of ping-ponging with the parked one at every quantum."""
    a = _started(engine.submit("first", SamplingParams(max_tokens=150, ignore_eos=True), predicted_tokens=10))
    b = engine.submit("second", SamplingParams(max_tokens=150, ignore_eos=True), predicted_tokens=10)
    first, second = _result(a), b.result()
    # At most one displacement per doubling (10 -> 20 -> 40 -> 80 -> 160) for each.
    assert first.preemptions + second.preemptions <= 8


def test_open_sequences_are_kept_while_the_backend_has_room() -> None:
    backend = ScriptedBackend(step_s=0.003, max_sequences=2)
    with _engine(backend) as engine:
        long = _started(engine.submit("a long one", LONG, predicted_tokens=500))
        engine.submit("short", SHORT, predicted_tokens=4).result()
        assert _result(long).preemptions == 1
    assert not any(c[0] in ("park", "restore") for c in backend.calls)  # switched, never parked


def test_the_parking_limit_stops_preemption(backend: ScriptedBackend) -> None:
    with _engine(backend, max_parked=0) as engine:
        long = _started(engine.submit("a long one", LONG, predicted_tokens=500))
        engine.submit("short", SHORT, predicted_tokens=4).result()
        assert _result(long).preemptions == 0
    assert not any(c[0] == "park" for c in backend.calls)


def test_nested_preemptions_resume_in_shortest_remaining_order(engine: Engine) -> None:
    order: list[str] = []
    lock = threading.Lock()

    def done(name: str) -> object:
        def on_event(event: object) -> None:
            if not isinstance(event, TokenEvent):
                with lock:
                    order.append(name)

        return on_event

    a = _started(engine.submit("aaa", SamplingParams(max_tokens=400, ignore_eos=True), predicted_tokens=800))
    engine.submit("bbb", SamplingParams(max_tokens=40, ignore_eos=True), predicted_tokens=300, on_event=done("b"))
    time.sleep(0.03)
    engine.submit("ccc", SamplingParams(max_tokens=5, ignore_eos=True), predicted_tokens=5, on_event=done("c"))
    _result(a)
    order.append("a")
    assert order == ["c", "b", "a"]


def test_aging_bounds_the_wait_of_a_long_request_under_srpt() -> None:
    """A stream of short requests would starve a long one forever; once it has waited aging_s it
    runs, even displacing a younger short one at its next token boundary."""
    backend = ScriptedBackend(step_s=0.002)
    with _engine(backend, aging_s=0.3) as engine:
        shorts = [engine.submit(f"s{i}", SHORT, predicted_tokens=4) for i in range(3)]
        long = engine.submit("long", SamplingParams(max_tokens=10, ignore_eos=True), predicted_tokens=900)
        stop = time.monotonic() + 3.0
        while time.monotonic() < stop and long.request_id in {v.request_id for v in engine.snapshot()}:
            shorts.append(engine.submit("again", SHORT, predicted_tokens=4))
            time.sleep(0.004)
        result = _result(long)
        for h in shorts:
            h.cancel()
    assert result.finish_reason is FinishReason.LENGTH
    assert result.queue_wait_s < 0.3 + 0.2  # aging_s plus a short job, not the whole stream


def test_cancelling_a_parked_request_frees_its_state(engine: Engine, backend: ScriptedBackend) -> None:
    handle = engine.submit("a long one", LONG, predicted_tokens=500)
    long = _started(handle)
    blocker = engine.submit("short", SamplingParams(max_tokens=30, ignore_eos=True), predicted_tokens=30)
    while not any(c[0] == "park" for c in backend.calls):
        time.sleep(0.001)
    handle.cancel()
    result = _result(long)
    assert result.finish_reason is FinishReason.CANCELLED and result.preemptions == 1
    blocker.result()
    assert not any(c[0] == "restore" for c in backend.calls)  # never brought back to be dropped
    assert backend.open_sequences == []


def test_cancel_races_leave_the_engine_consistent(engine: Engine, backend: ScriptedBackend) -> None:
    """Cancel at random moments (waiting, prefilling, decoding, parked): every request ends with
    exactly one final event, no sequence stays open, and the engine keeps serving."""
    handles = [engine.submit(f"request {i}", LONG, predicted_tokens=float(10 * (i % 7 + 1))) for i in range(20)]
    for i, h in enumerate(handles):
        time.sleep(0.001 * (i % 4))
        if i % 3:
            h.cancel()
    finals = [h.result() for h in handles]
    assert len(finals) == 20
    assert all(r.finish_reason in (FinishReason.CANCELLED, FinishReason.LENGTH) for r in finals)
    assert engine.generate("after", SHORT).completion_tokens == 4
    assert backend.open_sequences == [] and not engine.busy and engine.queue_depth == 0


def test_close_during_a_long_prefill_ends_everything() -> None:
    before = set(threading.enumerate())
    backend = ScriptedBackend(prefill_s=0.002)
    engine = _engine(backend, policy="fcfs", prefill_chunk=64)
    running = engine.submit("x" * 800, SHORT)  # 800 tokens at 2 ms each: 1.6 s of prefill
    waiting = engine.submit("waiting", SHORT)
    while not any(c[0] == "prefill" for c in backend.calls):
        time.sleep(0.001)
    started = time.monotonic()
    engine.close()
    assert time.monotonic() - started < 1.0  # within a chunk, not the whole prompt
    assert running.result().finish_reason is FinishReason.CANCELLED
    with pytest.raises(EngineClosedError):
        waiting.result()
    assert backend.closed and backend.open_sequences == []
    assert not [t for t in threading.enumerate() if t.name.startswith("edgeserve") and t not in before]


def test_a_backend_failure_is_an_error_event_and_the_loop_lives_on() -> None:
    backend = ScriptedBackend(fail_on=("decode", 2))
    with _engine(backend) as engine:
        with pytest.raises(BackendError, match="scripted failure"):
            engine.generate("boom", SHORT)
        assert engine.generate("fine", SHORT).completion_tokens == 4
        assert backend.open_sequences == []


def test_a_failed_release_loses_no_answer() -> None:
    """The backend fails to free a finished request's sequence: that answer still arrives whole,
    and the loop lives on."""
    backend = ScriptedBackend(fail_on=("release", 0))
    with _engine(backend) as engine:
        assert engine.generate("first", SHORT).completion_tokens == 4
        assert engine.generate("second", SHORT).completion_tokens == 4


def test_closing_answers_everyone_when_a_release_fails() -> None:
    """Closing frees every running sequence; one that the backend cannot free does not strand the
    callers of the others."""
    backend = ScriptedBackend(max_sequences=4, max_batch=4, step_s=0.003, fail_on=("release", 0))
    engine = _engine(backend)
    streams = [_started(engine.submit(f"long {i}", LONG)) for i in range(3)]
    engine.close()
    assert [_result(events).finish_reason for events in streams] == [FinishReason.CANCELLED] * 3


def test_callback_consumers_get_every_event_in_order(engine: Engine) -> None:
    events: list[object] = []
    finished = threading.Event()

    def on_event(event: object) -> None:
        events.append(event)
        if not isinstance(event, TokenEvent):
            finished.set()

    handle = engine.submit("hello", SHORT, on_event=on_event)
    assert finished.wait(5)
    text = "".join(e.text for e in events if isinstance(e, TokenEvent))
    assert text == events[-1].result.text and handle.request_id == events[-1].result.request_id  # type: ignore[attr-defined]


def test_submit_takes_sampling_keywords_like_generate(engine: Engine) -> None:
    result = engine.submit("hello", max_tokens=3, temperature=0, ignore_eos=True).result()
    assert result.completion_tokens == 3


def test_retry_after_is_within_twice_the_real_drain_time() -> None:
    """Retry-After comes from the queued work at the device seconds per unit of predicted cost
    measured on ended requests; the queue then really drains within a factor of two of it."""
    backend = ScriptedBackend(step_s=0.02)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    with _engine(backend, policy="fcfs", max_queue=4) as engine:
        for _ in range(2):  # measured: ~0.6 s of device time per request
            engine.generate("warm", params)
        handles = [engine.submit("queued", params)]
        with pytest.raises(QueueFullError) as refused:
            for _ in range(6):
                handles.append(engine.submit("queued", params))
        started = time.monotonic()
        for h in handles:
            h.result()
        drained = time.monotonic() - started
    promised = refused.value.retry_after_s
    assert promised / 2 <= drained <= promised * 2, (promised, drained)


class _HeldStart(ScriptedBackend):
    """Holds the loop inside a request's start: taken from the queue, not yet running."""

    def __init__(self) -> None:
        super().__init__()
        self.starting = threading.Event()
        self.go = threading.Event()

    def sampler(self, params: SamplingParams) -> Sampler:
        self.starting.set()
        assert self.go.wait(timeout=30)
        return super().sampler(params)


def test_a_request_being_started_still_counts_in_the_backlog() -> None:
    """The handoff planner and Retry-After read the backlog from other threads; a request the loop
    has taken from the queue but not started is still work ahead of a new arrival."""
    backend = _HeldStart()
    with _engine(backend) as engine:
        assert engine.backlog_s() == 0
        handle = engine.submit("a long one", LONG, predicted_tokens=500)
        assert backend.starting.wait(timeout=30)
        try:
            assert engine.backlog_s() > 0
        finally:
            backend.go.set()
        handle.result()
        assert engine.backlog_s() == 0
