"""Pure parts of the cloud-device handoff: the planner, the pacer, the seam. No model, no network."""

from __future__ import annotations

import itertools
import math

import pytest

from edgeserve.handoff.pacer import Pacer
from edgeserve.handoff.planner import Ask, Measured, Route, plan
from edgeserve.handoff.seam import OverlapFilter, find_seam

# A slow device (200 tok/s prefill, 20 tok/s decode), a fast cloud, a 100 Mbit/s link.
SLOW = Measured(
    device_prefill_tok_s=200.0,
    device_decode_tok_s=20.0,
    cloud_rtt_s=0.05,
    cloud_prefill_tok_s=5000.0,
    link_bytes_s=12.5e6,
    kv_bytes_per_token=5000.0,
    kv_available=False,
)


def ask(n: int, **kw: object) -> Ask:
    return Ask(prompt_tokens=n, max_tokens=256, ttft_target_s=kw.pop("target", 1.0), **kw)  # type: ignore[arg-type]


def test_short_prompt_stays_local() -> None:
    p = plan(ask(50), SLOW)
    assert p.route is Route.LOCAL and p.cloud_max_tokens == 0
    assert p.predicted_ttft_s == pytest.approx(50 / 200 + 1 / 20)


def test_long_prompt_hands_tokens_off_over_the_budget_only_when_it_alone_meets_the_target() -> None:
    p = plan(ask(2000), SLOW)
    assert p.route is Route.TOKEN and p.reason.startswith("over the cloud-token budget")
    assert p.predicted_ttft_s == pytest.approx(0.05 + 2000 / 5000)
    token = p.options[1]
    # ~9.6 s of device prefill at 20 tok/s shown: ~190 tokens, far over 10% of 256.
    assert 190 <= token.cloud_tokens <= 256
    # Topped up: the first ask only fills the pacer's queue; the session asks for more as it runs low.
    assert p.refill is not None and p.cloud_max_tokens == p.refill.ask(0, 0, 256) < 20
    # An answer that cannot be continued (chat, penalties) is asked for all at once, with a margin.
    whole = plan(ask(2000, cloud_continues=False), SLOW)
    assert whole.refill is None and whole.cloud_max_tokens == 256


def test_kv_handoff_preferred_when_it_meets_the_target_with_fewer_cloud_tokens() -> None:
    m = Measured(**{**SLOW.__dict__, "kv_available": True})
    p = plan(ask(2000), m)
    # KV arrives at 0.45 + 0.8 s (+ the restore): within 1.5 s, no cloud tokens at all.
    assert plan(ask(2000, target=1.5), m).route is Route.KV
    # A tighter target needs the cloud's tokens first, with KV underneath for an early takeover.
    assert p.route is Route.TOKEN_KV
    by_route = {o.route: o for o in p.options}
    assert by_route[Route.TOKEN_KV].cloud_tokens < by_route[Route.TOKEN].cloud_tokens
    # The cloud prefills once: its answer comes one round trip after the KV job's prefill.
    assert by_route[Route.TOKEN_KV].ttft_s == pytest.approx(by_route[Route.TOKEN].ttft_s + 0.05)
    # The cloud covers until the KV takeover: far fewer tokens than the token route's.
    assert by_route[Route.TOKEN_KV].cloud_tokens < by_route[Route.TOKEN].cloud_tokens / 4


def test_near_fastest_route_with_fewer_cloud_tokens_wins_when_none_meets_the_target() -> None:
    m = Measured(**{**SLOW.__dict__, "kv_available": True})
    p = plan(ask(2000, target=0.1), m)  # nothing reaches 0.1 s
    by_route = {o.route: o for o in p.options}
    assert by_route[Route.TOKEN].ttft_s < by_route[Route.TOKEN_KV].ttft_s  # a round trip faster...
    assert p.route is Route.TOKEN_KV  # ...is not worth ~20x the cloud tokens


def test_device_queue_counts_in_the_device_estimates() -> None:
    idle = plan(ask(150, target=1.0), SLOW)
    assert idle.route is Route.LOCAL  # 0.75 s of prefill + one step: local meets 1 s
    queued = plan(ask(150, target=1.0, device_queue_s=4.0), SLOW)
    assert queued.local_ttft_s == pytest.approx(idle.local_ttft_s + 4.0)
    assert queued.route is Route.TOKEN  # behind 4 s of other work the cloud answers first
    # The cloud covers until the device's own prefill, which now starts after the queue.
    assert queued.options[1].cloud_tokens > (4.0 + 0.75) * 20
    m = Measured(**{**SLOW.__dict__, "kv_available": True})
    kv = {o.route: o for o in plan(ask(2000, device_queue_s=30.0), m).options}[Route.KV]
    assert kv.takeover_s is not None and kv.takeover_s >= 30.0  # a KV load waits its turn too


def test_opt_out_off_and_unreachable_cloud_stay_local() -> None:
    assert plan(ask(2000, cloud_allowed=False, why_not="opted out"), SLOW).reason == "opted out"
    assert plan(ask(2000, mode="off"), SLOW).route is Route.LOCAL
    down = Measured(**{**SLOW.__dict__, "cloud_up": False})
    assert plan(ask(2000), down).route is Route.LOCAL


def test_always_uses_the_cloud_even_when_local_meets_the_target() -> None:
    assert plan(ask(50, mode="always"), SLOW).route is Route.TOKEN


def test_a_slower_cloud_is_not_used() -> None:
    slow_cloud = Measured(**{**SLOW.__dict__, "cloud_rtt_s": 30.0})
    assert plan(ask(2000), slow_cloud).route is Route.LOCAL


def test_pacer_spaces_a_burst_and_drains_the_backlog_faster() -> None:
    pacer: Pacer[str] = Pacer(0.1, drain_factor=0.5)
    for piece in "abc":
        pacer.push(piece)
    assert pacer.pop_due(0.0) == ["a"]
    assert pacer.pop_due(0.05) == []
    assert pacer.next_at() == pytest.approx(0.1)
    assert pacer.pop_due(0.1) == ["b"]
    pacer.push("D", paced=False)  # a device token behind cloud text waits its turn
    assert pacer.pop_due(0.2) == ["c"]
    assert pacer.pop_due(0.21) == []
    assert pacer.next_at() == pytest.approx(0.25)
    assert pacer.pop_due(0.25) == ["D"]
    pacer.push("E", paced=False)
    assert pacer.pop_due(0.4) == ["E"]  # a device token at the device's own pace passes at once
    assert len(pacer) == 0


def _toy_tokenizer() -> tuple[object, object]:
    vocab = ["Hello", "Hel", "lo", " wor", "ld", " world", "!"]

    def tokenize(text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            best = max((v for v in vocab if text.startswith(v, i)), key=len)
            out.append(vocab.index(best))
            i += len(best)
        return out

    def detokenize(tokens: list[int]) -> bytes:
        return "".join(vocab[t] for t in tokens).encode()

    return tokenize, detokenize


def test_seam_backs_off_one_token_and_shows_covered_text_not_yet_shown() -> None:
    tokenize, detokenize = _toy_tokenizer()
    seam = find_seam("Hello wor", "Hel", tokenize, detokenize)  # type: ignore[arg-type]
    assert seam.covered == "Hello" and seam.tokens == [0]
    assert seam.to_show == "lo" and seam.overlap == ""


def test_seam_overlap_when_more_was_shown_than_covered() -> None:
    tokenize, detokenize = _toy_tokenizer()
    seam = find_seam("Hello wor", "Hello wor", tokenize, detokenize)  # type: ignore[arg-type]
    assert seam.covered == "Hello" and seam.overlap == " wor" and seam.to_show == ""
    seam = find_seam("", "", tokenize, detokenize)  # type: ignore[arg-type]
    assert seam.tokens == [] and seam.covered == seam.overlap == seam.to_show == ""


def test_overlap_filter_suppresses_shown_text_and_never_repeats_on_divergence() -> None:
    f = OverlapFilter(" wor")
    assert f.feed(" w") == "" and f.feed("orld") == "ld" and not f.diverged
    g = OverlapFilter(" wor")
    assert g.feed(" wi") == "i" and g.diverged
    assert g.feed("nd") == "nd"


def test_serve_chat_and_run_take_the_cloud_flags() -> None:
    from click.testing import CliRunner

    from edgeserve.cli import main

    for command in ("serve", "chat", "run"):
        out = CliRunner().invoke(main, [command, "--help"]).output
        for flag in ("--cloud ", "--cloud-model", "--cloud-api-key", "--handoff [auto|off|always]", "--ttft-target-s"):
            assert flag in out, (command, flag)


def test_cloud_url_is_checked_and_never_echoed() -> None:
    from pydantic import ValidationError

    from edgeserve.settings import CloudSettings

    assert CloudSettings(cloud="http://gpu:8000/").cloud == "http://gpu:8000"
    with pytest.raises(ValidationError) as info:
        CloudSettings(cloud="ftp://user:secret@gpu")
    assert "secret" not in str(info.value)


def test_backlog_counts_device_work_down_from_the_event_stream() -> None:
    from edgeserve.handoff.backlog import Backlog
    from edgeserve.running import Request
    from edgeserve.service import ServiceModel
    from edgeserve.types import ErrorEvent, SamplingParams, StreamEvent, TokenEvent

    seen: list[StreamEvent] = []
    request = Request("r", list(range(200)), SamplingParams(max_tokens=40), 40, None, 0.0, seen.append)
    backlog = Backlog()
    backlog.track(request)
    service = ServiceModel(prefill_tok_s=100.0, decode_tok_s=10.0)
    assert backlog.seconds(service, 1) == pytest.approx(200 / 100 + 40 / 10)
    request.sink(TokenEvent("a", (1,)))  # the prompt is in, one answer token out
    assert backlog.seconds(service, 2) == pytest.approx(39 / 10 / 2)
    request.sink(ErrorEvent(RuntimeError("gone")))
    assert len(backlog) == 0 and backlog.seconds(service, 1) == 0 and len(seen) == 2


def test_prefill_model_learns_that_long_prompts_prefill_slower() -> None:
    from edgeserve.service import ServiceModel

    service = ServiceModel()
    assert service.prefill_coefficients() is None  # nothing measured: the plain rate
    assert service.prefill_s(800) == pytest.approx(800 / service.prefill_tok_s)
    a, b = 1 / 400, 2e-5  # a token at position p costs a + b * p seconds
    for n in (256, 1024, 2048, 4096):  # prompts prefilled in chunks of 512, each timed
        for start in range(0, n, 512):
            chunk = min(512, n - start)
            service.observe_prefill(chunk, a * chunk + b * chunk * (start + chunk / 2), start=start)
    fit = service.prefill_coefficients()
    assert fit is not None and fit[0] == pytest.approx(a, rel=1e-6) and fit[1] == pytest.approx(b, rel=1e-6)
    assert service.prefill_s(4096) == pytest.approx(a * 4096 + b * 4096 * 2048)
    # The plain average rate would have said far less for a long prompt, far more for a short one.
    assert 4096 / service.prefill_tok_s < 0.8 * service.prefill_s(4096)
    assert 100 / service.prefill_tok_s > 1.2 * service.prefill_s(100)
    # The planner's device estimates take the slope: device-only TTFT grows faster than the length.
    m = Measured(**{**SLOW.__dict__, "device_prefill_tok_s": 1 / a, "device_prefill_slope_s": b})
    local = {n: plan(ask(n, mode="off"), m).local_ttft_s for n in (1024, 4096)}
    assert local[4096] == pytest.approx(a * 4096 + b * 4096 * 4096 / 2 + 1 / 20)
    assert local[4096] > 5 * local[1024]


def test_prefill_model_without_growth_or_spread_keeps_the_plain_rate() -> None:
    from edgeserve.service import ServiceModel

    same_place = ServiceModel()
    for _ in range(5):
        same_place.observe_prefill(512, 1.0)  # one position only: the two terms cannot be told apart
    assert same_place.prefill_coefficients() is None
    assert same_place.prefill_s(1024) == pytest.approx(2.0)
    flat = ServiceModel()
    for start in (0, 512, 1024, 1536):
        flat.observe_prefill(512, 1.0, start=start)  # no slowdown with position
    fit = flat.prefill_coefficients()
    assert fit is not None and fit[0] == pytest.approx(1 / 512) and fit[1] == pytest.approx(0.0, abs=1e-12)


def test_measured_kv_restore_replaces_the_estimate() -> None:
    from edgeserve.handoff.telemetry import Telemetry
    from edgeserve.service import ServiceModel

    telemetry = Telemetry()
    telemetry.kv_available = True
    m = telemetry.measured(ServiceModel(prefill_tok_s=10.0, decode_tok_s=2.0))
    assert m.restore_s_per_token is None  # not measured: scaled from the device's prefill rate
    estimated = {o.route: o for o in plan(ask(4000), m).options}[Route.KV]
    telemetry.restore(4000, 0.4)  # measured: 0.1 ms a token
    m = telemetry.measured(ServiceModel(prefill_tok_s=10.0, decode_tok_s=2.0))
    assert m.restore_s_per_token == pytest.approx(1e-4)
    measured = {o.route: o for o in plan(ask(4000), m).options}[Route.KV]
    assert estimated.takeover_s is not None and measured.takeover_s is not None
    assert estimated.takeover_s - measured.takeover_s == pytest.approx(4000 * 2.5e-5 * 40 - 0.4)


# Figures of bench/handoff.json (12% of a core against a loopback cloud, 100 Mbit/s, 40 ms RTT), per
# prompt length: the cloud answer's first token, the KV job's first bytes and its wire bytes and
# transfer seconds, the token+kv answer after the KV's first bytes, the device's KV restore.
BENCH = {
    256: (1.42, 0.871, 2152365, 0.228, 0.26, 0.02),
    1024: (3.60, 3.053, 4976097, 0.641, 0.25, 0.13),
    2048: (8.40, 6.897, 6373944, 0.804, 0.68, 0.31),
    4096: (19.2, 17.74, 9185788, 1.167, 0.58, 0.51),
}


def _bench_measured() -> Measured:
    from edgeserve.handoff.telemetry import Telemetry
    from edgeserve.service import ServiceModel

    telemetry = Telemetry()
    telemetry.kv_available = True
    telemetry.rtt(0.04)
    for n, (answer, kv_first, kv_bytes, kv_s, after, restore) in BENCH.items():
        telemetry.cloud_ttft(n, answer)
        telemetry.kv_first_bytes(n, kv_first)
        telemetry.kv_transfer(n, kv_bytes, kv_s)
        telemetry.answer_after_kv(after)
        telemetry.restore(n, restore)
    service = ServiceModel(prefill_tok_s=48.0, decode_tok_s=5.3)
    a, b = 0.0208, 9.19e-6  # the device's prefill in that run: 26 s at 1k, 162 s at 4k
    for n in BENCH:
        for start in range(0, n, 512):
            chunk = min(512, n - start)
            service.observe_prefill(chunk, a * chunk + b * chunk * (start + chunk / 2), start=start)
    return telemetry.measured(service)


def test_kv_bytes_follow_the_prompt_length() -> None:
    m = _bench_measured()
    # Each measured length predicts itself, between them linearly, beyond them per token.
    for n, figures in BENCH.items():
        assert m.kv_bytes(n) == pytest.approx(figures[2])
    assert BENCH[2048][2] < m.kv_bytes(3072) < BENCH[4096][2]
    slope = (BENCH[4096][2] - BENCH[2048][2]) / 2048
    assert m.kv_bytes(8192) == pytest.approx(BENCH[4096][2] + slope * 4096)
    # From 256, 1k and 2k alone, 4k is predicted within 1% (9.18 MB); per token at 2k said 12.7 MB.
    shorter = Measured(**{**m.__dict__, "kv_points": m.kv_points[:3]})
    assert shorter.kv_bytes(4096) == pytest.approx(BENCH[4096][2], rel=0.01)
    assert m.kv_bytes(128) == pytest.approx(BENCH[256][2] / 2)
    # One average (the old model) overstates a 4k state by over 2x: 8.4 KB a token at 256, 2.2 at 4k.
    assert 4096 * m.kv_bytes_per_token > 2 * m.kv_bytes(4096)
    # Nothing measured: the prior per-token figure.
    assert SLOW.kv_bytes(1000) == pytest.approx(1000 * 5000.0)


def test_cloud_prefill_grows_with_the_prompt_length() -> None:
    from edgeserve.handoff.cloudfit import PrefillSamples

    samples = PrefillSamples()
    fixed, a, b = 0.3, 2.5e-3, 1e-6
    for n in (256, 1024, 2048, 4096):
        samples.add(n, fixed + a * n + b * n * n / 2)
    fit = samples.fit()
    assert fit is not None
    assert (fit.fixed_s, 1 / fit.tok_s, fit.slope_s) == pytest.approx((fixed, a, b), rel=1e-6)
    one = PrefillSamples()
    one.add(1000, 2.0)  # one length: a plain rate, no fixed part nor growth
    assert one.fit() == pytest.approx(type(fit)(0.0, 500.0, 0.0))
    close = PrefillSamples()
    for n, seconds in ((300, 1.0), (256, 0.95), (300, 1.05)):  # close lengths, noisy: a plain rate
        close.add(n, seconds)
    near = close.fit()
    assert near is not None and near.fixed_s == 0.0 and near.slope_s == 0.0
    assert 1024 / near.tok_s == pytest.approx(1024 * 3 / (300 + 256 + 300), rel=0.05)
    # Through the telemetry: every route's cloud time matches what was measured at each length
    # (a single rate overpredicts short prompts and underpredicts long ones).
    m = _bench_measured()
    for n, (answer, kv_first, *_) in BENCH.items():
        assert m.cloud_rtt_s + m.cloud_prefill_s(n) == pytest.approx(answer, rel=0.12)
        assert m.cloud_rtt_s + m.kv_prefill_s(n) == pytest.approx(kv_first, rel=0.05)
    assert m.kv_prefill_s(4096) / m.kv_prefill_s(1024) > 4.5  # faster than the length


def test_kv_chosen_where_it_was_measured_fastest_and_token_kv_caps_under_ten_percent() -> None:
    from edgeserve.handoff.planner import forced

    m = _bench_measured()
    # The bench's best measured route (within 10% + 0.1 s of the fastest, fewest cloud tokens).
    best = {256: Route.KV, 1024: Route.TOKEN_KV, 2048: Route.KV, 4096: Route.KV}
    for n, route in best.items():
        p = plan(Ask(prompt_tokens=n, max_tokens=128, ttft_target_s=1.0), m)
        assert p.route is route, (n, p.options)
        by_route = {o.route: o for o in p.options}
        both = forced(p, Route.TOKEN_KV)
        # The first ask covers the takeover (KV arrival, restore, catch-up): under 10% of 128.
        assert both.cloud_max_tokens <= 12, n
        takeover = by_route[Route.TOKEN_KV].takeover_s
        assert takeover is not None
        assert both.cloud_max_tokens >= (takeover - both.predicted_ttft_s) * 5.3
    # At 4k the KV load is long: token+kv's tokens until the device's first one, plus the top-ups'
    # overhead, break the 10% budget, so kv is chosen although token+kv's first token is earlier.
    at_4k = {o.route: o for o in plan(Ask(prompt_tokens=4096, max_tokens=128, ttft_target_s=1.0), m).options}
    assert at_4k[Route.TOKEN_KV].cloud_tokens > 12.8 and at_4k[Route.TOKEN_KV].ttft_s < at_4k[Route.KV].ttft_s


def test_budget_keeps_an_over_budget_route_out_when_nothing_meets_the_target() -> None:
    # No KV: the token route's first token is 20x earlier than local's, but it would stream ~190 of
    # 256 tokens from the cloud and still miss a 0.1 s target: the budget holds.
    p = plan(ask(2000, target=0.1), SLOW)
    assert p.route is Route.LOCAL and p.reason == "every cloud route breaks the cloud-token budget"
    # A user who allows the cloud most of the answer gets it.
    assert plan(ask(2000, target=0.1, cloud_token_share=1.0), SLOW).route is Route.TOKEN
    # ``always`` uses the cloud whatever the budget: the route with the fewest cloud tokens.
    assert plan(ask(2000, target=0.1, mode="always"), SLOW).route is Route.TOKEN


def test_token_kv_whose_answer_comes_after_the_kv_state_is_kv() -> None:
    from edgeserve.handoff.planner import forced

    # The cloud answers 3 s after its KV job's first bytes (busy sending the state), the state is in
    # ~1 s after them: the answer would show nothing, so it is not asked for and kv wins the tie.
    m = Measured(**{**SLOW.__dict__, "kv_available": True, "answer_after_kv_s": 3.0})
    p = plan(ask(2000, target=0.1), m)
    by_route = {o.route: o for o in p.options}
    assert p.route is Route.KV
    assert by_route[Route.TOKEN_KV].ttft_s == by_route[Route.KV].ttft_s
    assert by_route[Route.TOKEN_KV].cloud_tokens == 0 and forced(p, Route.TOKEN_KV).cloud_max_tokens == 0
    # Measured answering at once, token+kv shows the cloud's first tokens before the state is in.
    quick = Measured(**{**m.__dict__, "answer_after_kv_s": 0.05})
    assert plan(ask(2000, target=0.1), quick).route is Route.TOKEN_KV


def test_refill_low_water_covers_a_continuation_and_the_takeover() -> None:
    from edgeserve.handoff.refill import Refill

    r = Refill(tpot_s=0.2, latency_s=0.5, takeover_s=0.6, catch_up_s_per_token=0.03)
    # 0.5 s for a continuation + 0.6 s for the takeover = 6 pieces, +1 held back.
    assert r.low_water(0) == 7
    # Every covered token is one more for the device to evaluate at the takeover.
    assert r.low_water(100) == 7 + 15
    assert r.overhead == 4  # 0.5 s of pieces shown while a continuation comes, + 1
    assert r.ask(7, 0, 100) == 0  # at the mark: nothing yet
    assert r.ask(6, 0, 100) == 7 + 4 - 6  # below it: refill to the mark + overhead
    assert r.ask(0, 0, 3) == 3  # never beyond the request's max_tokens
    assert r.ask(0, 128, 0) == 0


def _topped_up(r: object, takeover_at: float, max_tokens: int = 128) -> tuple[float, int, int, int]:
    """Play the session's top-up rule against a cloud that sends a continuation all at once
    ``latency_s`` after it is asked and a device that takes over at ``takeover_at`` (seconds after
    the first piece; its first token then comes ``takeover_s`` plus the catch-up of every covered
    token later). Returns the longest gap in intervals, the cloud tokens received, the pieces shown
    before the takeover and the cloud requests made."""
    from edgeserve.handoff.refill import Refill

    assert isinstance(r, Refill)
    dt = r.tpot_s / 50
    received = r.ask(0, 0, max_tokens)
    queue, shown, pending, asks, t = received - 1, [0.0], None, 1, 0.0
    while t < takeover_at:
        t += dt
        if pending is not None and pending[0] <= t:
            queue, received, pending = queue + pending[1], received + pending[1], None
        if queue and t >= shown[-1] + r.tpot_s:
            shown.append(t)
            queue -= 1
        if pending is None and (n := r.ask(queue, received, max_tokens - received)):
            pending, asks = (t + r.latency_s, n), asks + 1
    before = len(shown)
    device_first = t + r.takeover_s + r.catch_up_s_per_token * received  # the open continuation is closed
    for _ in range(queue):
        shown.append(shown[-1] + r.tpot_s)
    if received < max_tokens:
        shown.append(max(device_first, shown[-1]))
    gaps = [b - a for a, b in itertools.pairwise(shown)]
    return max(gaps) / r.tpot_s, received, before, asks


@pytest.mark.parametrize("takeover_at", [0.3, 1.0, 3.0, 10.0, 30.0])
def test_refill_never_lets_the_stream_stall_and_asks_little_beyond_the_need(takeover_at: float) -> None:
    from edgeserve.handoff.refill import Refill

    r = Refill(tpot_s=0.2, latency_s=0.5, takeover_s=0.6, catch_up_s_per_token=0.03)
    gap, received, before, asks = _topped_up(r, takeover_at)
    assert gap <= 1.05  # the pacer's interval (plus the simulation's step), wherever the takeover falls
    # At the takeover the cloud has sent what was shown, what the takeover needs, and the overhead:
    # at most what the planner counts (``Refill.max_excess`` beyond the pieces until the device's first).
    assert received - before <= r.low_water(received) + r.overhead
    need = math.ceil((r.takeover_s + r.catch_up_s_per_token * received) / r.tpot_s) + 1
    assert received - before - need <= r.max_excess
    assert asks <= 1 + before / 2  # one continuation every few pieces at most


def test_refill_stops_at_max_tokens() -> None:
    from edgeserve.handoff.refill import Refill

    r = Refill(tpot_s=0.2, latency_s=0.5, takeover_s=0.6, catch_up_s_per_token=0.03)
    gap, received, _, _ = _topped_up(r, 1000.0, max_tokens=40)  # the device never takes over
    assert received == 40 and gap <= 1.05


def test_measured_continuation_latency_sets_the_low_water_mark() -> None:
    from edgeserve.handoff.planner import refill
    from edgeserve.handoff.telemetry import Telemetry
    from edgeserve.service import ServiceModel

    telemetry = Telemetry()
    service = ServiceModel(prefill_tok_s=100.0, decode_tok_s=5.0)
    prior = refill(ask(1000), telemetry.measured(service))
    assert prior.latency_s == pytest.approx(telemetry.measured(service).cloud_rtt_s)  # a round trip
    telemetry.continued(0.8)
    measured = refill(ask(1000), telemetry.measured(service))
    assert measured.latency_s == pytest.approx(0.8) and measured.low_water(0) > prior.low_water(0)


def test_token_kv_predicts_its_kv_state_slowed_by_the_answer_beside_it() -> None:
    from edgeserve.handoff.telemetry import Telemetry
    from edgeserve.service import ServiceModel

    telemetry = Telemetry()
    telemetry.kv_available = True
    service = ServiceModel(prefill_tok_s=40.0, decode_tok_s=5.0)
    telemetry.kv_transfer(1024, 5_000_000, 0.5)  # alone: 10 MB/s
    before = {o.route: o for o in plan(ask(1024), telemetry.measured(service)).options}
    telemetry.kv_transfer(1024, 5_000_000, 1.0, beside_answer=True)  # beside the answer: half the rate
    m = telemetry.measured(service)
    assert m.link_bytes_s == pytest.approx(10e6) and m.link_bytes_s_beside_answer == pytest.approx(5e6)
    after = {o.route: o for o in plan(ask(1024), m).options}
    assert after[Route.KV] == before[Route.KV]  # kv alone is not slowed
    late, early = after[Route.TOKEN_KV].takeover_s, before[Route.TOKEN_KV].takeover_s
    assert late is not None and early is not None
    slower = m.kv_bytes(1024) / 5e6 - m.kv_bytes(1024) / 10e6
    assert slower <= late - early <= 1.2 * slower  # plus the catch-up of the tokens shown meanwhile
    # ...so the cloud streams longer before the takeover: more cloud tokens predicted.
    assert after[Route.TOKEN_KV].cloud_tokens > before[Route.TOKEN_KV].cloud_tokens
