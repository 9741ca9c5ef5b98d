"""Host and Origin checks: the guard against DNS rebinding and against web pages posting to the server.

A server on loopback without an API key (the default) is reachable from any web page the user opens.
The browser sends a cross-origin "simple" POST without asking anyone, and a DNS-rebinding page makes
its own name resolve to 127.0.0.1, after which even the same-origin rules let it read the answers.
Two checks close both doors, before any route runs:

- **Host**: a name must be a loopback name (``localhost``, ``*.localhost``), the bound host, or listed
  in ``allowed_hosts``. An IP-address Host is always accepted: rebinding needs a name the attacker's
  DNS answers for, and a browser sends that name, never the address, in Host.
- **Origin** (browsers send it with every cross-origin request and with every POST): it must be a
  loopback origin, the request's own host (same origin), or match ``allowed_origins``. Requests
  without Origin (curl, the SDKs) pass; a foreign origin is refused with 403 before anything runs.

The allowed origins also get CORS answers (``cors_regex`` feeds Starlette's ``CORSMiddleware``), so a
listed web app can really call the API, as ``OLLAMA_ORIGINS`` allows with Ollama.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from edgeserve.server.http_errors import error_response
from edgeserve.settings import ServerSettings

ANY = "*"
#: Loopback origins on any port, in the form browsers serialise them (lower case, no default port).
LOOPBACK_ORIGIN = r"https?://(localhost|[a-z0-9.-]+\.localhost|127(\.\d{1,3}){3}|\[::1\])(:\d{1,5})?"


@dataclass(frozen=True)
class OriginPolicy:
    #: Host names (lower case, no port) served besides loopback names and IP addresses.
    hosts: frozenset[str]
    #: fnmatch patterns over whole origins (``scheme://host[:port]``), lower case.
    origins: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> OriginPolicy:
        hosts = {h for h in settings.allowed_hosts.split(",") if h}
        hosts.add(settings.host.lower().strip("[]"))
        return cls(frozenset(hosts), tuple(o for o in settings.allowed_origins.split(",") if o))

    @property
    def any_host(self) -> bool:
        return ANY in self.hosts

    @property
    def any_origin(self) -> bool:
        return ANY in self.origins

    def host_allowed(self, host_header: str) -> bool:
        """``host_header`` as sent (``name:port``, ``[::1]:8080``); an absent Host (HTTP/1.0) passes."""
        name = host_name(host_header)
        if not name or self.any_host or _is_ip(name):
            return True
        return name == "localhost" or name.endswith(".localhost") or name in self.hosts

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        origin = origin.strip().lower()
        if self.any_origin or re.fullmatch(LOOPBACK_ORIGIN, origin):
            return True
        if host_header and origin.partition("://")[2] == host_header.strip().lower():
            return True  # same origin: the page was served by this server under this very name
        return any(fnmatch.fnmatchcase(origin, pattern) for pattern in self.origins)

    def cors_regex(self) -> str:
        """One regex for every origin that gets CORS answers (loopback and listed)."""
        return "|".join([LOOPBACK_ORIGIN, *(fnmatch.translate(p) for p in self.origins)])


def host_name(host_header: str) -> str:
    """The name or address in a Host header, lower case, without port, brackets or a trailing dot."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit():
        host = name
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class OriginGuard:
    """ASGI middleware: 403 (in the API's error shape) for a Host or an Origin the policy refuses."""

    def __init__(self, app: ASGIApp, *, policy: OriginPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        origin = headers.get(b"origin")
        message = None
        if not self.policy.host_allowed(host):
            message = (
                f"host {host_name(host)!r} is not served here (a DNS-rebinding guard): use an IP address or "
                "localhost, or start the server with --allowed-hosts NAME"
            )
        elif origin is not None and not self.policy.origin_allowed(origin.decode("latin-1"), host):
            message = (
                f"origin {origin.decode('latin-1')!r} may not call this server from a browser; "
                "start it with --allowed-origins ORIGIN to allow a web app"
            )
        if message is None:
            await self.app(scope, receive, send)
            return
        await error_response(scope["path"], 403, message, code="forbidden_origin")(scope, receive, send)
