"""Top-ups: the cloud's part of a token handoff, asked for a little at a time. Pure: no clock, no I/O.

The cloud decodes far faster than the pacer shows its tokens, so whatever it is asked for it
generates at once: what it is asked for is what it costs. The planner's first ask covers the tokens
shown until its predicted takeover, no more. A takeover later than predicted would then leave the
pacer dry, a stall the user sees; a margin large enough for every misprediction would cost cloud
tokens on every request. So while the device has not taken over, the session keeps a low-water mark
of cloud pieces queued in the pacer: when the queue falls below it and the cloud's last answer has
ended at its cap, the session asks the cloud to continue (the prompt plus the answer so far, which
the cloud's prefix cache holds) for a few more tokens. The mark covers

- the continuation's first piece: its latency, measured online (round trip, prefix match, first
  decode step);
- the takeover: from then on no cloud text can be added (the seam is fixed), and the device first
  loads the prompt's KV state, evaluates every covered cloud token and decodes one step, so the
  queue must last that long.

A continuation refills the queue to the mark plus ``overhead`` pieces (those shown while a
continuation comes, plus one): asked when the queue is just below the mark, it brings more than its
own latency shows, so the next is asked for only after it arrived. At a takeover the cloud has then
sent what was shown, what the takeover needs, and at most the mark's latency part plus the
overhead beyond: ``2 * overhead`` tokens at most (``max_excess``), what never stalling costs and
what the planner adds to a topped-up route's predicted cloud tokens.

Invariant: a continuation is asked for only when the previous cloud answer has ended (one cloud
request in flight at most), and never for more tokens than the request has left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Refill:
    #: The device's time per output token: the pacer's interval.
    tpot_s: float
    #: Seconds from asking the cloud to continue to its first piece.
    latency_s: float
    #: Seconds from the takeover to the device's first token, before the catch-up: the KV state's
    #: restore and one decode step.
    takeover_s: float
    #: Seconds for the device to evaluate one covered cloud token after the prompt.
    catch_up_s_per_token: float

    def low_water(self, covered: int) -> int:
        """Cloud pieces that must stay queued while ``covered`` cloud tokens have been received."""
        seconds = self.latency_s + self.takeover_s + self.catch_up_s_per_token * covered
        # +1: a continuation's first piece is held back until its second comes (session: the
        # newest piece may still change at the seam).
        return math.ceil(seconds / self.tpot_s) + 1

    @property
    def overhead(self) -> int:
        """Pieces shown while a continuation comes, plus one."""
        return math.ceil(self.latency_s / self.tpot_s) + 1

    @property
    def max_excess(self) -> int:
        """Most cloud tokens received at a takeover beyond those shown until the device's first token."""
        return 2 * self.overhead

    def ask(self, queued: int, received: int, left: int) -> int:
        """Tokens to ask the cloud for now (0: none), with ``queued`` pieces in the pacer,
        ``received`` cloud tokens so far and ``left`` tokens the request may still generate."""
        mark = self.low_water(received)
        if queued >= mark or left <= 0:
            return 0
        return min(mark + self.overhead - queued, left)
