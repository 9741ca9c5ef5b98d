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
               (plus the catch-up) and token's

The cloud tokens a route costs are those the cloud generates before the takeover closes its
stream. The cloud decodes far faster than the pacer shows, so that is the cap the planner asks
for: the tokens shown between the first token and the predicted takeover (at the device's decode
rate), with a margin. Among the routes that meet the TTFT target the planner takes the one with
the fewest cloud tokens (the cloud's work is what costs money); when none meets it, the fastest.
A request that the device alone answers within the target stays local unless the mode is ``always``.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Seconds to load a restored KV blob, per token (llama.cpp: ~11 ms for 500 tokens, PLATFORM-NOTES),
#: on a device that prefills ``RESTORE_REFERENCE_TOK_S``; a slower device loads it slower in proportion
#: (the decoding of the wire, and the copy into the cache, are CPU work like the prefill).
RESTORE_S_PER_TOKEN = 2.5e-5
RESTORE_REFERENCE_TOK_S = 400.0
#: Cloud tokens asked for beyond the predicted need: the device may be slower than predicted, and a
#: cloud stream that runs dry before takeover is a stall the user sees.
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
    #: Cap on the tokens asked of the cloud (0 for local and KV-only).
    cloud_max_tokens: int
    reason: str
    options: tuple[Option, ...] = ()


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
    out.append(_cloud_option(Route.TOKEN, cloud_ttft, token_takeover, tpot, ask.max_tokens))
    if m.kv_available:
        restore = n * _restore_s_per_token(m)
        kv_first = m.cloud_rtt_s + m.kv_prefill_s(n)
        kv_ready = max(kv_first + m.kv_bytes(n) / m.link_bytes_s, queue) + restore
        out.append(Option(Route.KV, kv_ready + tpot, kv_ready, 0))
        # The answer is asked for once the KV job's first bytes show the cloud has prefilled: one
        # more round trip, and its own prefill is a prefix-cache hit.
        both_ttft = kv_first + (m.cloud_rtt_s if m.answer_after_kv_s is None else m.answer_after_kv_s)
        both = min(token_takeover, _caught_up(kv_ready, both_ttft, tpot, m, n))
        out.append(_cloud_option(Route.TOKEN_KV, both_ttft, both, tpot, ask.max_tokens))
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


def _cloud_option(route: Route, ttft: float, takeover: float, tpot: float, max_tokens: int) -> Option:
    tokens = min(max(math.ceil((takeover - ttft) / tpot), 1), max_tokens)
    return Option(route, ttft, takeover, tokens)


def plan(ask: Ask, m: Measured) -> Plan:
    """Choose a route for ``ask`` (see the module docstring for the rule)."""
    found = options(ask, m)
    local = found[0]
    if ask.mode == "off" or len(found) == 1:
        why = "handoff off" if ask.mode == "off" else (ask.why_not or "cloud unavailable")
        return Plan(Route.LOCAL, local.ttft_s, local.ttft_s, 0, why, tuple(found))
    if ask.mode != "always" and local.ttft_s <= ask.ttft_target_s:
        return Plan(Route.LOCAL, local.ttft_s, local.ttft_s, 0, "device meets the TTFT target", tuple(found))
    remote = found[1:]
    meeting = [o for o in remote if o.ttft_s <= ask.ttft_target_s]
    if meeting:
        best = min(meeting, key=lambda o: (o.cloud_tokens, o.ttft_s))
        reason = "fewest cloud tokens within the TTFT target"
    else:
        # None meets the target: the fastest, but a first token a round trip later is not worth
        # many more cloud tokens, so the routes within a tolerance of the fastest compete on those.
        fastest = min(o.ttft_s for o in remote)
        close = [o for o in remote if o.ttft_s <= fastest * (1 + TTFT_TOLERANCE) + TTFT_TOLERANCE_S]
        best = min(close, key=lambda o: (o.cloud_tokens, o.ttft_s))
        reason = "fastest first token, fewest cloud tokens among the near-fastest (none meets the target)"
        if ask.mode != "always" and best.ttft_s >= local.ttft_s:
            return Plan(Route.LOCAL, local.ttft_s, local.ttft_s, 0, "the cloud would not be faster", tuple(found))
    return Plan(best.route, best.ttft_s, local.ttft_s, _cap(best.route, found, ask.max_tokens), reason, tuple(found))


def _cap(route: Route, found: Sequence[Option], max_tokens: int) -> int:
    """Cloud tokens to ask for: those the pacer shows until the route's predicted takeover, with a
    margin. The cloud decodes faster than the pacer shows, so it generates the whole cap before the
    takeover closes its stream: the cap is the cloud's cost. (token+kv: if the KV state comes late,
    the stream can run dry before the device has the prompt; the device then starts its own
    prefill, ``session.KV_LATE_FACTOR``.)"""
    if not route.uses_tokens:
        return 0
    option = next(o for o in found if o.route is route)
    margin = CLOUD_TOKEN_MARGIN_KV if route.uses_kv else CLOUD_TOKEN_MARGIN
    return min(math.ceil(option.cloud_tokens * margin) + CLOUD_TOKEN_SLACK, max_tokens)


def forced(plan: Plan, route: Route) -> Plan:
    """``plan`` with its route replaced (benchmarks and tests compare routes on the same request);
    the prediction is that route's own."""
    option = next((o for o in plan.options if o.route is route), None)
    if option is None:
        raise ValueError(f"route {route.value} is not possible for this request")
    cap = _cap(route, plan.options, 1 << 30)
    return Plan(route, option.ttft_s, plan.local_ttft_s, cap, f"forced {route.value}", plan.options)
