"""Cloud-device split prefill (P/D-Device): the cloud answers first, the device takes over.

- ``planner``: per request, local, token handoff, KV handoff or both, from measured rates (pure);
- ``pacer``: the speed controller that shows cloud tokens at the device's time per token;
- ``refill``: when to ask the cloud to continue its answer, so the paced stream never runs dry;
- ``cloud``: the streamed OpenAI-compatible request to the cloud, every fault mapped once;
- ``seam``: where the device takes over from the cloud's text (back off one token, no repeats);
- ``session``: one handed-off request on its own thread; ``orchestrator``: the front door.
"""

from edgeserve.handoff.orchestrator import Handoff
from edgeserve.handoff.planner import Plan, Route
from edgeserve.handoff.session import CloudTokenEvent, HandoffReport

__all__ = ["CloudTokenEvent", "Handoff", "HandoffReport", "Plan", "Route"]
