"""Talking to the upstream server: which headers cross, and what a finished response said about
its own length. Bytes are relayed untouched; only a bounded tail is kept to read the usage from."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

#: Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the HTTP client recomputes.
_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
TAIL_BYTES = 16 * 1024

# The usage fields as OpenAI (completion_tokens, finish_reason) and Ollama (eval_count, done_reason)
# write them; read from the response's last bytes, where both APIs put them.
_TOKENS = re.compile(rb'"(?:completion_tokens|eval_count)"\s*:\s*(\d+)')
_FINISH = re.compile(rb'"(?:finish_reason|done_reason)"\s*:\s*"([a-z_]+)"')


def request_headers(
    headers: Iterable[tuple[str, str]], *, strip_auth: bool, upstream_key: str | None
) -> list[tuple[str, str]]:
    """Client headers to send upstream. The client's Authorization is the proxy's own when the proxy
    checks a key, so it never travels on; an upstream key replaces it."""
    out = [
        (k, v)
        for k, v in headers
        if k.lower() not in _NOT_FORWARDED and not (k.lower() == "authorization" and (strip_auth or upstream_key))
    ]
    if upstream_key:
        out.append(("authorization", f"Bearer {upstream_key}"))
    if not any(k.lower() == "accept-encoding" for k, _ in out):
        # Otherwise httpx asks for gzip on the client's behalf: the client would get an encoding it
        # never asked for, and the usage tail would be compressed bytes.
        out.append(("accept-encoding", "identity"))
    return out


def response_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {k: v for k, v in headers if k.lower() not in _NOT_FORWARDED or k.lower() == "content-length"}


@dataclass
class UsageTail:
    """The last bytes of a relayed response, enough to read how many tokens it generated."""

    tail: bytes = b""

    def feed(self, chunk: bytes) -> None:
        self.tail = (self.tail + chunk)[-TAIL_BYTES:]

    def completion_tokens(self) -> int | None:
        found = _TOKENS.findall(self.tail)
        return int(found[-1]) if found else None

    def finish_reason(self) -> str | None:
        found = _FINISH.findall(self.tail)
        return found[-1].decode() if found else None
