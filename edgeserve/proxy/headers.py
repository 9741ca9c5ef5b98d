"""Which headers cross the proxy, each way, and which credentials go upstream (RFC 9110 §7.6).

Both ways the proxy drops the hop-by-hop fields (§7.6.1: the fixed list, and every field the
message's own ``Connection`` header names) and adds itself to ``Via`` (§7.6.3). Towards the client
it also drops the upstream's ``Date`` and ``Server``: the server under the proxy (uvicorn) writes
its own, and two ``Date`` fields make a message invalid (§6.6.1: Date is a singleton).

Credentials upstream, in this order (the first that applies is sent, never two):

1. ``upstream_api_key``: ``Authorization: Bearer KEY``;
2. credentials in the upstream URL (``http://user:pass@host``): ``Authorization: Basic``;
3. the client's own ``Authorization``, unless the proxy checks its own key (then it is the proxy's
   and never travels on).

Operator-configured credentials win over the client's: the official OpenAI SDK sends an
``Authorization`` header on every request (``Bearer unused`` when there is no key), which would
otherwise always shadow them.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass

from yarl import URL

#: Hop-by-hop fields (RFC 9110 §7.6.1), and the framing the HTTP stacks on each side recompute.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_REQUEST_DROPPED = HOP_BY_HOP | {"host", "content-length"}
#: Written by the server the proxy runs under; the upstream's copies would make duplicates.
_RESPONSE_DROPPED = HOP_BY_HOP | {"date", "server"}
VIA = "1.1 edgeserve-proxy"


@dataclass(frozen=True)
class UpstreamTarget:
    """The upstream URL split into where to send (no credentials), what to show, and what to send."""

    base_url: str
    #: The URL with its credentials replaced by ``***``: the only form that is ever shown or logged.
    redacted: str
    #: ``Basic ...`` from the URL's credentials, or None.
    basic_auth: str | None

    @classmethod
    def parse(cls, url: str) -> UpstreamTarget:
        parsed = URL(url)
        if parsed.user is None and parsed.password is None:
            base = url.rstrip("/")
            return cls(base, base, None)
        # RFC 7617, UTF-8 as its charset parameter allows.
        pair = f"{parsed.user or ''}:{parsed.password or ''}".encode()
        auth = "Basic " + base64.b64encode(pair).decode("ascii")
        bare = str(parsed.with_user(None)).rstrip("/")
        scheme, _, rest = bare.partition("://")
        return cls(bare, f"{scheme}://***@{rest}", auth)


def _connection_listed(headers: Iterable[tuple[bytes, bytes]]) -> set[str]:
    listed: set[str] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            listed.update(t.strip().lower() for t in v.decode("latin-1").split(",") if t.strip())
    return listed


def request_headers(
    headers: Iterable[tuple[bytes, bytes]], *, proxy_checks_key: bool, upstream_auth: str | None
) -> list[tuple[str, str]]:
    """Client headers (ASGI: lower-case names) to send upstream. ``upstream_auth``: the operator's
    credentials (items 1 and 2 of the module's list), which replace the client's."""
    headers = list(headers)
    dropped = _REQUEST_DROPPED | _connection_listed(headers)
    drop_auth = proxy_checks_key or upstream_auth is not None
    out = []
    via = VIA
    for k, v in headers:
        name = k.decode("latin-1")
        if name == "via":
            via = f"{v.decode('latin-1')}, {VIA}"
        elif name not in dropped and not (drop_auth and name == "authorization"):
            out.append((name, v.decode("latin-1")))
    if upstream_auth is not None:
        out.append(("authorization", upstream_auth))
    out.append(("via", via))
    return out


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Upstream response headers for the ASGI response: lower-case names, hop-by-hop, ``Date`` and
    ``Server`` dropped, ``Via`` extended. A Content-Length still holds: the bytes are untouched."""
    headers = list(headers)
    dropped = _RESPONSE_DROPPED | _connection_listed(headers)
    out = []
    via = VIA.encode()
    for k, v in headers:
        name = k.lower()
        text = name.decode("latin-1")
        if text == "via":
            via = v + b", " + via
        elif text not in dropped:
            out.append((name, v))
    out.append((b"via", via))
    return out


def keep_alive_limits(headers: Iterable[tuple[bytes, bytes]]) -> tuple[float | None, int | None]:
    """``Keep-Alive: timeout=5, max=100`` (RFC 2068 §19.7.1.1) as (idle seconds, requests left)."""
    timeout: float | None = None
    max_requests: int | None = None
    for k, v in headers:
        if k.lower() != b"keep-alive":
            continue
        for param in v.decode("latin-1").split(","):
            key, _, value = param.strip().partition("=")
            try:
                if key.lower() == "timeout":
                    timeout = float(value)
                elif key.lower() == "max":
                    max_requests = int(value)
            except ValueError:
                continue  # a malformed parameter limits nothing
    return timeout, max_requests
