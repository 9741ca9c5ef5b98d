"""The per-request privacy switch: a request may forbid the cloud, so its prompt never leaves the device.

Either the header ``X-Edgeserve-Cloud: off`` (also ``false``, ``0``, ``no``), or the body field
``"cloud": false`` in any generation request (OpenAI or Ollama routes). The body field is read from
the raw JSON the server already holds, so the wire models need not declare it.
"""

from __future__ import annotations

import json
from typing import Any

HEADER = "x-edgeserve-cloud"
OFF = frozenset({"off", "false", "0", "no"})


def cloud_allowed(request: Any) -> bool:
    """False when the Starlette ``request`` forbids the cloud; its body must have been read already."""
    if request.headers.get(HEADER, "").strip().lower() in OFF:
        return False
    body = getattr(request, "_body", b"")  # Starlette keeps the body it read for the route
    if not body or b'"cloud"' not in body:
        return True
    try:
        data = json.loads(body)
    except ValueError:
        return True
    return not (isinstance(data, dict) and data.get("cloud") is False)
