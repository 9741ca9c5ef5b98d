"""Per request: answer locally, hand off tokens, hand off KV, or both. Pure: no clock, no I/O.

Every route ends with the device decoding alone; they differ in how the first token reaches the
user and when the device can take over (all times from the request's arrival):

    local      first token = device prefill + one decode step; takeover = none
    token      first token = cloud TTFT; takeover = device prefill (then a catch-up on the cloud text)
    kv         first token = KV arrival + one decode step, where
               KV arrival = cloud RTT + cloud prefill + prompt KV bytes / link rate + restore
    token+kv   as token and kv together, but the cloud prefills the prompt twice side by side (its
               answer and the KV job), so its TTFT and the KV arrival count that prefill twice

The cloud tokens a route costs are those the pacer shows before takeover: (takeover - first token)
times the device's decode rate. Among the routes that meet the TTFT target the planner takes the one
with the fewest cloud tokens (the cloud's work is what costs money); when none meets it, the fastest.
A request that the device alone answers within the target stays local unless the mode is ``always``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Seconds to load a restored KV blob, per token (llama.cpp: ~11 ms for 500 tokens, PLATFORM-NOTES).
RESTORE_S_PER_TOKEN = 2.5e-5
#: Cloud tokens asked for beyond the predicted need: the device may be slower than predicted, and a
#: cloud stream that runs dry before takeover is a stall the user sees.
CLOUD_TOKEN_MARGIN = 1.5
CLOUD_TOKEN_SLACK = 8


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
    local_prefill = n / m.device_prefill_tok_s
    out = [Option(Route.LOCAL, local_prefill + tpot, None, 0)]
    if not (ask.cloud_allowed and m.cloud_up):
        return out
    cloud_ttft = m.cloud_rtt_s + n / m.cloud_prefill_tok_s
    # Catch-up: the device evaluates the cloud text shown so far, a prefill of that many tokens.
    shown = max(local_prefill - cloud_ttft, 0.0) / tpot
    token_takeover = local_prefill + shown / m.device_prefill_tok_s
    out.append(_cloud_option(Route.TOKEN, cloud_ttft, token_takeover, tpot, ask.max_tokens))
    if m.kv_available:
        transfer = n * m.kv_bytes_per_token / m.link_bytes_s + n * RESTORE_S_PER_TOKEN
        kv_arrival = cloud_ttft + transfer
        out.append(Option(Route.KV, kv_arrival + tpot, kv_arrival, 0))
        # Both at once: the cloud prefills the prompt twice (its answer, and the KV job), side by
        # side, so each takes twice as long (measured: 1k tokens, TTFT 10.1 s against 5.8 s alone).
        shared_ttft = m.cloud_rtt_s + 2 * n / m.cloud_prefill_tok_s
        both = min(token_takeover, shared_ttft + transfer)
        out.append(_cloud_option(Route.TOKEN_KV, shared_ttft, both, tpot, ask.max_tokens))
    return out


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
        best = min(remote, key=lambda o: (o.ttft_s, o.cloud_tokens))
        reason = "fastest first token (none meets the target)"
        if ask.mode != "always" and best.ttft_s >= local.ttft_s:
            return Plan(Route.LOCAL, local.ttft_s, local.ttft_s, 0, "the cloud would not be faster", tuple(found))
    return Plan(best.route, best.ttft_s, local.ttft_s, _cap(best.route, found, ask.max_tokens), reason, tuple(found))


def _cap(route: Route, found: Sequence[Option], max_tokens: int) -> int:
    """Cloud tokens to ask for: enough to cover until the device's own prefill is done (with margin),
    even when KV is expected sooner, since a late KV state must not leave the user with nothing to
    read. The stream is closed at the takeover, so the cap bounds the cloud's cost, not its use."""
    if not route.uses_tokens:
        return 0
    token = next(o for o in found if o.route is Route.TOKEN)
    return min(math.ceil(token.cloud_tokens * CLOUD_TOKEN_MARGIN) + CLOUD_TOKEN_SLACK, max_tokens)


def forced(plan: Plan, route: Route) -> Plan:
    """``plan`` with its route replaced (benchmarks and tests compare routes on the same request);
    the prediction is that route's own."""
    option = next((o for o in plan.options if o.route is route), None)
    if option is None:
        raise ValueError(f"route {route.value} is not possible for this request")
    cap = _cap(route, plan.options, 1 << 30)
    return Plan(route, option.ttft_s, plan.local_ttft_s, cap, f"forced {route.value}", plan.options)
