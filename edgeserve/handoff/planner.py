"""Per request: answer locally, hand off tokens, hand off KV, or both. Pure: no clock, no I/O.

Every route ends with the device decoding alone; they differ in how the first token reaches the
user and when the device can take over (all times from the request's arrival; ``q`` is the device
work queued ahead of this request, which its own prefill and a KV load wait behind):

    local      first token = q + device prefill + one decode step; takeover = none
    token      first token = cloud TTFT; takeover = q + device prefill + catch-up on the cloud text
    kv         first token = takeover + one decode step, where
               takeover = max(KV arrival, q) + restore,
               KV arrival = cloud RTT + cloud prefill + prompt KV bytes / link rate
               (the cloud's prefill grows with the prompt like the device's, a + b*p a token; the
               KV bytes per token fall with it, so both come from measurements at nearby lengths)
    token+kv   the KV job goes first and the cloud's answer follows once the cloud has prefilled
               (its prefix cache then holds the prompt: one prefill serves both), so the first token
               comes one round trip (or as measured) after the cloud's prefill; takeover = the earlier of kv's
               (plus the catch-up) and token's, the KV state arriving at the rate measured beside an
               answer (a cloud with one engine interleaves the two)

When token+kv's answer would come only after the device's first token from the KV state (a short
prompt: the cloud, busy sending the state, answers after it), it would show nothing and only slow
the KV job: it is not asked for, and the route is predicted as kv's, listed after it (a tie goes to
kv).

The cloud tokens a route costs are those the cloud generates before the takeover closes its
stream: the tokens shown from the first token until the device's first token, at the device's
decode rate (the cloud decodes far faster than the pacer shows, so it generates all it is asked
for). The session asks for them a few at a time and asks the cloud to continue while the device has
not taken over (``refill``), so the stream never stalls when the takeover comes late; the
prediction adds the most that keeps queued (``Refill.max_excess``). A request whose answer cannot be
continued exactly (chat: no portable way to extend an assistant turn; penalties: the cloud would not
count the earlier tokens) is asked for the predicted tokens with a margin instead.

The choice, in order:

1. ``off``, an opted-out request or no cloud: local. A request the device alone answers within the
   TTFT target stays local too, unless the mode is ``always``.
2. The cloud-token budget (``Ask.cloud_token_share`` of ``max_tokens``; the issue's 10%): among
   the routes that meet the TTFT target and fit the budget, the fewest cloud tokens (the cloud's
   work is what costs money), then the earliest first token.
3. When no route within the budget meets the target but one over it does, the target wins: the
   route that meets it with the fewest cloud tokens. The target is what the user asked of this
   request; the budget is a cost preference.
4. When no route meets the target, the budget holds: among local and the routes within the budget,
   those within a tolerance of the fastest compete on cloud tokens. A cloud route over the budget
   is used then only in the ``always`` mode (when none fits it: the fewest cloud tokens).
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from edgeserve.handoff.refill import Refill

#: Seconds to load a restored KV blob, per token (llama.cpp: ~11 ms for 500 tokens, PLATFORM-NOTES),
#: on a device that prefills ``RESTORE_REFERENCE_TOK_S``; a slower device loads it slower in proportion
#: (the decoding of the wire, and the copy into the cache, are CPU work like the prefill).
RESTORE_S_PER_TOKEN = 2.5e-5
RESTORE_REFERENCE_TOK_S = 400.0
#: Cloud tokens asked for beyond the predicted need when the answer cannot be topped up (``refill``):
#: the device may be slower than predicted, and a cloud stream that runs dry before takeover is a stall
#: the user sees.
CLOUD_TOKEN_MARGIN = 1.5
#: token+kv: the takeover waits for the KV state, whose arrival (cloud prefill, link) is predicted
#: better than the device's own prefill of a long prompt (its rate falls with the prompt's length).
CLOUD_TOKEN_MARGIN_KV = 1.25
CLOUD_TOKEN_SLACK = 2
#: When no route meets the TTFT target: routes whose first token is within this of the fastest's
#: (relative, plus absolute seconds) count as fast, and the one with the fewest cloud tokens wins.
TTFT_TOLERANCE = 0.1
TTFT_TOLERANCE_S = 0.1


class Route(str, enum.Enum):
    LOCAL = "local"
    TOKEN = "token"
    KV = "kv"
    TOKEN_KV = "token+kv"

    @property
    def uses_tokens(self) -> bool:
        return self in (Route.TOKEN, Route.TOKEN_KV)

    @property
    def uses_kv(self) -> bool:
        return self in (Route.KV, Route.TOKEN_KV)


@dataclass(frozen=True)
class Measured:
    """What the planner knows, measured online (``edgeserve.handoff.telemetry``)."""

    device_prefill_tok_s: float
    device_decode_tok_s: float
    #: Cloud round trip (request out, first byte back, for a trivially short prompt).
    cloud_rtt_s: float
    cloud_prefill_tok_s: float
    #: Link rate from the cloud in bytes per second, and the KV bytes per prompt token on the wire.
    link_bytes_s: float
    kv_bytes_per_token: float
    cloud_up: bool = True
    #: The cloud is an edgeserve on the same model (KV handoff possible).
    kv_available: bool = False
    #: The device's prefill slows with the position: a token at position p costs
    #: ``1 / device_prefill_tok_s + device_prefill_slope_s * p`` seconds (``ServiceModel.prefill_s``).
    device_prefill_slope_s: float = 0.0
    #: Seconds per prompt token for the device to load a KV state, as measured (None: not yet; the
    #: estimate from ``RESTORE_S_PER_TOKEN``).
    restore_s_per_token: float | None = None
    #: The cloud's prefill slows with the position too (``cloud_prefill_tok_s`` is then 1 / a).
    cloud_prefill_slope_s: float = 0.0
    #: The same for the cloud's KV job, timed by its first bytes: it takes longer than the answer's
    #: prefill to its first token on short prompts and less on long ones (bench/handoff.json: 0.5-1.5 s
    #: apart at 256-4k), so each route is predicted from its own measurements. None: as the answers.
    kv_prefill_tok_s: float | None = None
    kv_prefill_slope_s: float = 0.0
    #: Seconds beyond the round trip that each cloud answer (KV job) costs whatever its length:
    #: the first decode step, the HTTP answer (``cloudfit``).
    cloud_fixed_s: float = 0.0
    kv_fixed_s: float = 0.0
    #: Measured KV states on the wire, ``(prompt tokens, bytes)`` sorted by length: int8 + zlib
    #: packs a long state better (8.4 KB a token at 256 tokens, 2.2 KB at 4k), so one average
    #: overstates long prompts and understates short ones. Empty: ``kv_bytes_per_token``.
    kv_points: tuple[tuple[float, float], ...] = ()
    #: token+kv: seconds from the KV job's first bytes to the answer's first token, as measured
    #: (None: not yet; one round trip).
    answer_after_kv_s: float | None = None
    #: Seconds from asking the cloud to continue an answer to its first piece, as measured (None:
    #: not yet; a round trip plus the cloud's fixed cost per answer).
    continue_s: float | None = None
    #: token+kv: the KV state's rate while the cloud also streams the answer (slower: the cloud's
    #: engine interleaves the two); None: not measured yet, ``link_bytes_s``.
    link_bytes_s_beside_answer: float | None = None

    def device_prefill_s(self, tokens: float, start: float = 0.0) -> float:
        """Seconds for the device to evaluate ``tokens`` after ``start`` already in its cache."""
        return tokens / self.device_prefill_tok_s + self.device_prefill_slope_s * tokens * (start + tokens / 2)

    def cloud_prefill_s(self, tokens: float) -> float:
        """Seconds beyond the round trip to the cloud's first token for a prompt of ``tokens`` (none cached)."""
        return self.cloud_fixed_s + tokens / self.cloud_prefill_tok_s + self.cloud_prefill_slope_s * tokens * tokens / 2

    def kv_prefill_s(self, tokens: float) -> float:
        """Seconds from the KV job's arrival at the cloud to its first bytes, for a prompt of ``tokens``."""
        if self.kv_prefill_tok_s is None:
            return self.cloud_prefill_s(tokens)
        return self.kv_fixed_s + tokens / self.kv_prefill_tok_s + self.kv_prefill_slope_s * tokens * tokens / 2

    def kv_bytes(self, tokens: float) -> float:
        """Wire bytes of a prompt's KV state: linear between the measured lengths around
        ``tokens``; below them, the shortest's bytes per token; above, the last segment extended."""
        points = self.kv_points
        if not points:
            return tokens * self.kv_bytes_per_token
        if tokens <= points[0][0]:
            return tokens * points[0][1] / points[0][0]
        for (n0, b0), (n1, b1) in itertools.pairwise(points):
            if tokens <= n1:
                return b0 + (b1 - b0) * (tokens - n0) / max(n1 - n0, 1e-9)
        if len(points) == 1:
            return tokens * points[0][1] / points[0][0]
        # Beyond the longest: the last segment's bytes per further token (a long state packs
        # better, so its average per token would overstate a longer one).
        (n0, b0), (n1, b1) = points[-2], points[-1]
        return b1 + max(b1 - b0, 0.0) / max(n1 - n0, 1e-9) * (tokens - n1)


@dataclass(frozen=True)
class Ask:
    """One request as the planner sees it."""

    prompt_tokens: int
    max_tokens: int
    ttft_target_s: float
    mode: str = "auto"  # auto | off | always
    #: False: the request forbids the cloud (privacy), or it cannot be split (e.g. a token prompt).
    cloud_allowed: bool = True
    #: Why the cloud is not allowed, when it is not.
    why_not: str = ""
    #: Seconds of device work queued and running ahead of this request (its prefill waits for it).
    device_queue_s: float = 0.0
    #: The cloud-token budget: the share of ``max_tokens`` the cloud may generate (rule 2).
    cloud_token_share: float = 0.10
    #: The cloud's answer can be continued exactly (a text prompt without penalties): the session
    #: tops it up (``refill``) instead of asking for a margin up front.
    cloud_continues: bool = True


@dataclass(frozen=True)
class Option:
    route: Route
    ttft_s: float
    #: Seconds from arrival until the device decodes alone (None: local from the start).
    takeover_s: float | None
    cloud_tokens: int


@dataclass(frozen=True)
class Plan:
    route: Route
    predicted_ttft_s: float
    local_ttft_s: float
    #: Tokens asked of the cloud first (0 for local and KV-only).
    cloud_max_tokens: int
    reason: str
    options: tuple[Option, ...] = ()
    #: When to ask the cloud to continue (None: the answer cannot be continued; the first ask
    #: then has a margin).
    refill: Refill | None = None


def options(ask: Ask, m: Measured) -> list[Option]:
    """The predicted outcome of every route the measurements allow."""
    n = ask.prompt_tokens
    tpot = 1.0 / m.device_decode_tok_s
    queue = max(ask.device_queue_s, 0.0)
    local_prefill = queue + m.device_prefill_s(n)
    out = [Option(Route.LOCAL, local_prefill + tpot, None, 0)]
    if not (ask.cloud_allowed and m.cloud_up):
        return out
    cloud_ttft = m.cloud_rtt_s + m.cloud_prefill_s(n)
    token_takeover = _caught_up(local_prefill, cloud_ttft, tpot, m, n)
    topup = refill(ask, m) if ask.cloud_continues else None
    out.append(_cloud_option(Route.TOKEN, cloud_ttft, token_takeover, tpot, ask.max_tokens, topup))
    if m.kv_available:
        restore = n * _restore_s_per_token(m)
        kv_first = m.cloud_rtt_s + m.kv_prefill_s(n)

        def ready(link_bytes_s: float) -> float:
            """When the device can decode from the KV state, arriving at ``link_bytes_s``."""
            return max(kv_first + m.kv_bytes(n) / link_bytes_s, queue) + restore

        kv_ready = ready(m.link_bytes_s)
        out.append(Option(Route.KV, kv_ready + tpot, kv_ready, 0))
        # The answer is asked for once the KV job's first bytes show the cloud has prefilled: one
        # more round trip, and its own prefill is a prefix-cache hit.
        both_ttft = kv_first + (m.cloud_rtt_s if m.answer_after_kv_s is None else m.answer_after_kv_s)
        if both_ttft >= kv_ready + tpot:
            # The answer would come after the device's first token from the KV state (on a short
            # prompt the cloud, busy sending the state, answers after it): it would show nothing
            # and only slow the KV job down, so it is not asked for (``_cap``: 0) and the route is
            # kv's, listed after it (a tie goes to kv).
            out.append(Option(Route.TOKEN_KV, kv_ready + tpot, kv_ready, 0))
            return out
        beside = m.link_bytes_s if m.link_bytes_s_beside_answer is None else m.link_bytes_s_beside_answer
        both = min(token_takeover, _caught_up(ready(beside), both_ttft, tpot, m, n))
        out.append(_cloud_option(Route.TOKEN_KV, both_ttft, both, tpot, ask.max_tokens, topup))
    return out


def _restore_s_per_token(m: Measured) -> float:
    if m.restore_s_per_token is not None:
        return m.restore_s_per_token
    return RESTORE_S_PER_TOKEN * max(RESTORE_REFERENCE_TOK_S / m.device_prefill_tok_s, 1.0)


def _caught_up(ready: float, first_token: float, tpot: float, m: Measured, n: int) -> float:
    """When the device, with the prompt's KV (``n`` tokens) at ``ready``, has also evaluated the
    cloud text shown since ``first_token`` (a prefill of that many tokens after the prompt)."""
    shown = max(ready - first_token, 0.0) / tpot
    return ready + m.device_prefill_s(shown, n)


def _cloud_option(
    route: Route, ttft: float, takeover: float, tpot: float, max_tokens: int, topup: Refill | None
) -> Option:
    """The cloud tokens a route costs: those shown from the first token until the device's first
    one (a decode step after the takeover), plus the most that topping up keeps queued beyond them
    (``Refill.max_excess``: the budget is a promise, so the bound, not the average) or, when the
    answer cannot be continued, the margin asked for up front."""
    need = max(math.ceil((takeover - ttft) / tpot) + 1, 1)
    if topup is not None:
        tokens = need + topup.max_excess
    else:
        margin = CLOUD_TOKEN_MARGIN_KV if route.uses_kv else CLOUD_TOKEN_MARGIN
        tokens = math.ceil(need * margin) + CLOUD_TOKEN_SLACK
    return Option(route, ttft, takeover, min(tokens, max_tokens))


def refill(ask: Ask, m: Measured) -> Refill:
    """The session's top-up rule for this request (``refill``), from the same measurements."""
    n = ask.prompt_tokens
    latency = m.cloud_rtt_s + m.cloud_fixed_s if m.continue_s is None else m.continue_s
    tpot = 1.0 / m.device_decode_tok_s
    return Refill(tpot, latency, n * _restore_s_per_token(m) + tpot, m.device_prefill_s(1, n))


def plan(ask: Ask, m: Measured) -> Plan:
    """Choose a route for ``ask`` (the rules in the module docstring)."""
    found = options(ask, m)
    local = found[0]
    if ask.mode == "off" or len(found) == 1:
        why = "handoff off" if ask.mode == "off" else (ask.why_not or "cloud unavailable")
        return Plan(Route.LOCAL, local.ttft_s, local.ttft_s, 0, why, tuple(found))
    if ask.mode != "always" and local.ttft_s <= ask.ttft_target_s:
        return Plan(Route.LOCAL, local.ttft_s, local.ttft_s, 0, "device meets the TTFT target", tuple(found))
    best, reason = _choose(ask, found)
    topup = refill(ask, m) if ask.cloud_continues else None
    cap = _cap(best.route, found, ask.max_tokens, topup)
    return Plan(best.route, best.ttft_s, local.ttft_s, cap, reason, tuple(found), topup)


def _choose(ask: Ask, found: Sequence[Option]) -> tuple[Option, str]:
    """Rules 2-4 (module docstring) over the routes ``found``, local first."""
    local, remote = found[0], found[1:]
    budget = ask.cloud_token_share * ask.max_tokens
    within = [o for o in remote if o.cloud_tokens <= budget]
    meeting = [o for o in remote if o.ttft_s <= ask.ttft_target_s]
    if any(o in within for o in meeting):
        best = min((o for o in meeting if o in within), key=lambda o: (o.cloud_tokens, o.ttft_s))
        return best, "fewest cloud tokens within the TTFT target"
    if meeting:
        best = min(meeting, key=lambda o: (o.cloud_tokens, o.ttft_s))
        return best, "over the cloud-token budget: no route within it meets the TTFT target"
    # None meets the target: the fastest, but a first token a round trip later is not worth many
    # more cloud tokens, so the routes within a tolerance of the fastest compete on those.
    if ask.mode == "always":
        pool = within or [min(remote, key=lambda o: (o.cloud_tokens, o.ttft_s))]
    else:
        pool = [local, *within]
    fastest = min(o.ttft_s for o in pool)
    close = [o for o in pool if o.ttft_s <= fastest * (1 + TTFT_TOLERANCE) + TTFT_TOLERANCE_S]
    best = min(close, key=lambda o: (o.cloud_tokens, o.ttft_s))
    if best.route is Route.LOCAL:
        why = "the cloud would not be faster" if within else "every cloud route breaks the cloud-token budget"
        return best, why
    return best, "fastest first token within the cloud-token budget, fewest cloud tokens among the near-fastest"


def _cap(route: Route, found: Sequence[Option], max_tokens: int, topup: Refill | None) -> int:
    """Cloud tokens to ask for first: the route's predicted cloud tokens (``_cloud_option``), and
    with top-ups no more than fill the pacer's queue from empty (``Refill.ask``): the session asks
    for more while the device has not taken over. Without top-ups the prediction has a margin
    (token+kv: if the KV state comes late, the stream can still run dry before the device has the
    prompt; the device then starts its own prefill, ``session.KV_LATE_FACTOR``). The cloud decodes
    faster than the pacer shows, so it generates all it is asked for: this is the cloud's cost."""
    if not route.uses_tokens:
        return 0
    option = next(o for o in found if o.route is route)
    if option.cloud_tokens == 0:
        return 0  # token+kv whose answer would come after the KV state: not asked for
    if topup is not None:
        return max(min(option.cloud_tokens, topup.ask(0, 0, max_tokens)), 1)
    return min(option.cloud_tokens, max_tokens)


def forced(plan: Plan, route: Route) -> Plan:
    """``plan`` with its route replaced (benchmarks and tests compare routes on the same request);
    the prediction is that route's own."""
    option = next((o for o in plan.options if o.route is route), None)
    if option is None:
        raise ValueError(f"route {route.value} is not possible for this request")
    cap = _cap(route, plan.options, 1 << 30, plan.refill)
    return Plan(route, option.ttft_s, plan.local_ttft_s, cap, f"forced {route.value}", plan.options, plan.refill)
