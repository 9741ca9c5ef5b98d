"""``edgeserve serve``: flags (generated from the settings) → engine → app → uvicorn.

FastAPI and uvicorn are imported inside the command, so that registering it costs ``edgeserve run``
nothing.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import click

from edgeserve._options import build, options_from
from edgeserve._startup import configure_logging, ensure_port_free
from edgeserve.settings import CloudSettings, EngineSettings, ModelSettings, ServerSettings

log = logging.getLogger("edgeserve.server")


@click.command()
@options_from(ServerSettings)
@options_from(ModelSettings)
@options_from(EngineSettings)
@options_from(CloudSettings)
def serve(**values: Any) -> None:
    """Serve the model over OpenAI- and Ollama-compatible HTTP APIs (loopback only by default)."""
    server = build(ServerSettings, values)
    model = build(ModelSettings, values)
    engine_settings = build(EngineSettings, values)
    cloud = build(CloudSettings, values)
    configure_logging(server.log_level, timed=True)
    ensure_port_free(server.host, server.port)  # before the model loads, not after
    import uvicorn

    from edgeserve.engine import Engine
    from edgeserve.server.app import create_app
    from edgeserve.server.listen import raise_open_files_limit, uvicorn_options

    if not _is_loopback(server.host):
        if server.api_key is None:
            log.warning("listening on %s without an API key: anyone who can reach it can use it", server.host)
        if not server.allowed_hosts:
            log.warning("clients must name this server by IP address or be listed in --allowed-hosts")
    raise_open_files_limit(server.max_connections)
    with Engine.from_settings(model, engine_settings, cloud=cloud) as engine:
        app = create_app(engine, server, model=engine.model)
        uvicorn.run(app, **uvicorn_options(server))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
