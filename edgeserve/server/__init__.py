"""The HTTP server: OpenAI- and Ollama-compatible routes over one injected ``Engine``.

    from edgeserve.server.app import create_app
    app = create_app(engine, ServerSettings())     # an ASGI app; serve it with uvicorn

This package's ``__init__`` and ``cli`` import nothing from the ``server`` extra (FastAPI, uvicorn),
because ``edgeserve.cli`` registers ``serve`` in the base install, where those may be missing.

Layout: ``*_wire.py`` hold the JSON shapes (pydantic, documented in ``/openapi.json``), apart from
the engine's own types; ``*_routes.py`` translate wire → engine → wire; ``generation.py`` runs one
request (metrics, disconnects, streaming); ``guard.py`` is the API-key, body-size, media-type and
body-time middleware; ``origins.py`` the Host/Origin guard (DNS rebinding, web pages); ``boundary.py``
the outermost layer (crashes end in a 500 that keeps the connection, refusals are counted);
``listen.py`` the uvicorn protocol and options (head timeout, connection cap) that ``serve`` runs.
"""
