"""The per-request privacy switch: a request may forbid the cloud, so its prompt never leaves the device.

Either the header ``X-Edgeserve-Cloud: off`` (also ``false``, ``0``, ``no``), read here, or the body
field ``"cloud": false``, which every generation request's wire model declares (OpenAI and Ollama
routes) and the server passes on as ``cloud=``.
"""

from __future__ import annotations

from collections.abc import Mapping

HEADER = "x-edgeserve-cloud"
OFF = frozenset({"off", "false", "0", "no"})


def cloud_allowed(headers: Mapping[str, str]) -> bool:
    """False when the request's headers forbid the cloud."""
    return headers.get(HEADER, "").strip().lower() not in OFF
