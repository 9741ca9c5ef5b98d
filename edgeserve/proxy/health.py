"""What ``/health`` says about the upstream: what the proxied requests saw, and a probe when they
say nothing recent.

The upstream counts as failing when:

- its last generation request failed (unreachable, timed out, broke off, malformed) less than
  ``FAILURE_HOLD_S`` ago, with no success since; a probe cannot clear this, because a server can
  answer ``GET /`` while every generation stalls (the case this exists for), or
- a probe fails: ``GET /`` answered with anything at all counts as alive. A probe runs when nothing
  was heard from the upstream for ``PROBE_AFTER_S``, so an idle proxy still notices a dead upstream,
  and one that came back is reported healthy again without waiting for traffic.

Pure bookkeeping with the time passed in; the app runs the probe.
"""

from __future__ import annotations

from dataclasses import dataclass

FAILURE_HOLD_S = 60.0
PROBE_AFTER_S = 5.0


@dataclass
class UpstreamHealth:
    last_ok: float = -float("inf")
    last_failure: float = -float("inf")
    reason: str | None = None
    probed: float = -float("inf")
    probe_failure: str | None = None

    def ok(self, now: float) -> None:
        self.last_ok = now

    def failed(self, reason: str, now: float) -> None:
        self.last_failure, self.reason = now, reason

    def needs_probe(self, now: float) -> bool:
        return now - max(self.last_ok, self.probed) >= PROBE_AFTER_S

    def probe_result(self, failure: str | None, now: float) -> None:
        self.probed, self.probe_failure = now, failure

    def failing(self, now: float) -> str | None:
        """Why the upstream is failing now, or None."""
        if self.last_failure > self.last_ok and now - self.last_failure < FAILURE_HOLD_S:
            return self.reason
        if self.probe_failure is not None and self.probed > self.last_ok:
            return self.probe_failure
        return None
