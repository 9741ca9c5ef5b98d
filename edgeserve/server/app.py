"""``create_app``: the ASGI app over one injected engine. No module-level state: everything a route
needs hangs off ``app.state.edgeserve`` (a ``ServerContext``), so several apps can share a process.

The engine belongs to the caller, who closes it; the app only submits to it.

Layers, outermost first: ``ErrorBoundary`` (every request ends with a whole response and refusals
are counted), ``OriginGuard`` (Host and Origin: DNS rebinding, foreign web pages), CORS for the
allowed origins (before the key check: preflights carry no key), ``GuardMiddleware`` (key, body size,
JSON media type, body read time), then the routes.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse, Response

from edgeserve.engine import Engine
from edgeserve.server import kv_routes, ollama_routes, openai_routes, openai_wire
from edgeserve.server.boundary import ErrorBoundary
from edgeserve.server.context import Context, ServedModel, ServerContext
from edgeserve.server.guard import GuardMiddleware
from edgeserve.server.http_errors import install as install_error_handlers
from edgeserve.server.metrics import ServerMetrics
from edgeserve.server.origins import OriginGuard, OriginPolicy
from edgeserve.settings import ServerSettings
from edgeserve.types import ResolvedModel

#: Models that only travel inside streams, so no route names them as its response model.
STREAM_MODELS: tuple[type[BaseModel], ...] = (openai_wire.ChatCompletionChunk, openai_wire.ErrorResponse)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class Health(BaseModel):
    status: str
    model: str
    queue_depth: int
    busy: bool


system = APIRouter(tags=["Server"])


@system.get("/health", response_model=Health)
async def health(ctx: Context) -> Health:
    """Liveness and load; open without an API key."""
    return Health(status="ok", model=ctx.model.name, queue_depth=ctx.engine.queue_depth, busy=ctx.engine.busy)


@system.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}}, "description": "Prometheus text."}},
)
async def metrics(ctx: Context) -> Response:
    return Response(ctx.metrics.render(), media_type=PROMETHEUS_TEXT)


@system.get("/", response_class=PlainTextResponse)
async def root() -> str:
    # Ollama clients probe "/" to see whether a server is up.
    return "edgeserve is running"


def create_app(
    engine: Engine, settings: ServerSettings | None = None, *, model: ResolvedModel | None = None
) -> FastAPI:
    """The server over ``engine``. ``model`` (where the engine's model came from) fills in file size
    and date for /api/tags; without it the engine's model name is used alone."""
    settings = settings or ServerSettings()
    served = ServedModel.of(engine, model)
    app = FastAPI(
        title="edgeserve",
        version=version("edgeserve"),
        summary="OpenAI- and Ollama-compatible API over one local model.",
        redoc_url=None,
    )
    metrics = ServerMetrics(engine, served.name)
    app.state.edgeserve = ServerContext(engine, settings, metrics, served)
    app.include_router(openai_routes.router)
    app.include_router(ollama_routes.router)
    app.include_router(kv_routes.router)
    app.include_router(system)
    if engine.handoff is not None:  # the cloud-device handoff reports each request's route and TTFT
        engine.handoff.listeners.append(metrics.handoff)
    install_error_handlers(app)
    _add_layers(app, settings, metrics)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schema = _with_stream_models(_without_422(schema), STREAM_MODELS)
            app.openapi_schema = _with_model_limits(schema, engine.capabilities.n_vocab)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _add_layers(app: FastAPI, settings: ServerSettings, metrics: ServerMetrics) -> None:
    """The middleware, added innermost first (Starlette wraps each new one around the others)."""
    app.add_middleware(
        GuardMiddleware,
        api_key=settings.api_key,
        max_body_bytes=settings.max_body_bytes,
        require_json=True,
        body_timeout_s=settings.body_timeout_s,
    )
    policy = OriginPolicy.from_settings(settings)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"] if policy.any_origin else [],
        allow_origin_regex=None if policy.any_origin else policy.cors_regex(),
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["*"],
        max_age=600,
    )
    app.add_middleware(OriginGuard, policy=policy)
    routers = (openai_routes.router, ollama_routes.router, kv_routes.router, system)
    paths = [route.path for router in routers for route in router.routes if isinstance(route, APIRoute)]
    app.add_middleware(ErrorBoundary, metrics=metrics, paths=paths)


def _with_stream_models(schema: dict[str, Any], models: tuple[type[BaseModel], ...]) -> dict[str, Any]:
    """Add the models that only appear inside streams (referenced from ``text/event-stream`` bodies)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        js = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        for name, definition in js.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components.setdefault(model.__name__, js)
    return schema


def _with_model_limits(schema: dict[str, Any], n_vocab: int) -> dict[str, Any]:
    """Token-id prompts must be below the served model's vocabulary size, known only at run time."""
    prompt = schema["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    for option in prompt.get("anyOf", ()):
        if option.get("type") == "array" and option.get("items", {}).get("type") == "integer":
            option["items"]["maximum"] = n_vocab - 1
    return schema


def _without_422(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents validation failures as 422; this server answers them with 400 (the error
    models already documented there), so the schema says what really happens."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema
