"""``edgeserve proxy``: flags (generated from ``ProxySettings``) → app → uvicorn. FastAPI and
uvicorn are imported inside the command, so that registering it costs ``edgeserve run`` nothing."""

from __future__ import annotations

import logging
from typing import Any

import click

from edgeserve._options import build, options_from
from edgeserve._startup import configure_logging, ensure_port_free
from edgeserve.settings import ProxySettings

log = logging.getLogger("edgeserve.proxy")


@click.command()
@options_from(ProxySettings)
def proxy(**values: Any) -> None:
    """Sidecar in front of Ollama or any OpenAI-compatible server: short requests first.

    Generation routes (/v1/chat/completions, /v1/completions, /api/chat, /api/generate) wait in an
    SJF queue and go upstream --max-inflight at a time; everything else passes through. GET /queue
    shows the queue, /metrics the latencies by policy and predicted class.
    """
    settings = build(ProxySettings, values)
    configure_logging(settings.log_level, timed=True)
    ensure_port_free(settings.host, settings.port)
    import uvicorn

    from edgeserve.predictor import AdaptationLog, LengthPredictor
    from edgeserve.proxy.app import create_proxy_app
    from edgeserve.proxy.headers import UpstreamTarget

    predictor = LengthPredictor.load(settings.predictor)
    recorder = AdaptationLog(settings.adapt_log, predictor.spec) if settings.adapt_log else None
    app = create_proxy_app(settings, predictor=predictor, recorder=recorder)
    upstream = UpstreamTarget.parse(settings.upstream).redacted  # never log the URL's password
    log.info("proxying %s with %s admission, %d in flight", upstream, settings.policy, settings.max_inflight)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=10)
