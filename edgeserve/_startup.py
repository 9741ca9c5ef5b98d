"""What a command sets up before its real work: logging for every command, the listening port for
the servers (``serve``, ``proxy``).

Logging is configured here and only here. The group's ``-v`` and a server's ``--log-level`` both
come through ``configure_logging``, and a later call replaces the handler an earlier one installed
(``logging.basicConfig`` would keep the first call's level: that is how ``serve --log-level`` once did
nothing). Handlers that are not edgeserve's (an application's, pytest's) are left alone.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys

import click

PLAIN = "%(levelname)s %(name)s: %(message)s"
#: Servers run for days: their lines carry the time.
TIMED = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one handler edgeserve's CLI puts on the root logger (found again by its class). Writes
    to the ``sys.stderr`` of each record's moment, not of its creation: click's test runner swaps
    the stream per call, and a stale one would be closed."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def verbosity() -> int:
    """The ``-v`` count given to the ``edgeserve`` group (0 outside a click command)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return 0
    return int(ctx.find_root().params.get("verbose") or 0)


def configure_logging(level: str | None = None, *, timed: bool = False) -> int:
    """Send log records to stderr at ``level`` (a server's ``--log-level``; None: warnings) or the
    group's ``-v`` level, whichever is more verbose. Returns the level set on the root logger."""
    verbose = verbosity()
    from_v = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    effective = min(from_v, int(logging.getLevelName(level.upper()))) if level else from_v
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(sys.stderr)
    handler.setFormatter(logging.Formatter(TIMED if timed else PLAIN))
    root.addHandler(handler)
    root.setLevel(effective)
    # Backend libraries narrate every load (buffer sizes, cache layouts): only errors unless -vv.
    logging.getLogger("edgeserve.llama_cpp").setLevel(logging.DEBUG if verbose >= 2 else logging.ERROR)
    return effective


def ensure_port_free(host: str, port: int) -> None:
    """Fail now, in one line, if ``host:port`` cannot be listened on, rather than after the model
    has loaded. The probe socket is closed again; uvicorn binds the same way (``SO_REUSEADDR``), so a
    port left in TIME_WAIT counts as free, as it is for uvicorn."""
    if port == 0:  # any free port: nothing to check
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise click.ClickException(
                        f"port {port} on {host} is already in use; stop what listens there or choose "
                        "another with --port"
                    ) from None
                raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
