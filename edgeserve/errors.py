"""The one exception hierarchy of edgeserve.

Every error a user or a client can cause, and every backend failure, is one of these. Backend
libraries' own exceptions are mapped at the backend boundary; the HTTP layer picks a status code
by class (``http_status``), never by reading the message.

    EdgeserveError
    ├── UserError                       a request or a setting that cannot work as given
    │   ├── InvalidParameterError       a sampling value out of range, an empty prompt   (400)
    │   ├── ContextLengthError          prompt (plus max_tokens) longer than the context (400)
    │   ├── ModelNotFoundError          no model by that name or path                    (404)
    │   └── BackendNotFoundError        unknown backend name                             (400)
    │       └── BackendNotInstalledError  its extra is not installed                     (400)
    ├── QueueFullError                  admission refused: the queue is at capacity      (429)
    ├── RequestCancelledError           the caller cancelled or went away                (499)
    ├── EngineClosedError               the engine was shut down                         (503)
    ├── UpstreamError                   the proxy's upstream unreachable, reset or malformed (502)
    │   └── UpstreamTimeout             no connection, first byte or next chunk in time  (504)
    └── BackendError                    the backend failed while running                 (500)
        ├── KVStateError                a KV state blob that does not fit this model     (400)
        └── KVCacheFullError            the KV memory has no room for this work now      (503)
"""

from __future__ import annotations


class EdgeserveError(Exception):
    """Base of every error edgeserve raises on purpose."""

    http_status = 500
    #: OpenAI-style ``error.type`` for wire responses.
    error_type = "server_error"


class UserError(EdgeserveError):
    """Something the caller asked for cannot work; the message says what and how to fix it."""

    http_status = 400
    error_type = "invalid_request_error"


class InvalidParameterError(UserError):
    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidParameterError):
    pass


class ModelNotFoundError(UserError):
    http_status = 404
    error_type = "not_found_error"


class BackendNotFoundError(UserError):
    pass


class BackendNotInstalledError(BackendNotFoundError):
    pass


class QueueFullError(EdgeserveError):
    http_status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestCancelledError(EdgeserveError):
    # 499 is nginx's "client closed request": nobody reads it, but logs and metrics do.
    http_status = 499
    error_type = "cancelled"


class EngineClosedError(EdgeserveError):
    http_status = 503
    error_type = "server_error"


class UpstreamError(EdgeserveError):
    """The proxy's upstream server could not be reached, broke off, or sent what is not a response.
    Mapped from the HTTP client's own exceptions once, in ``edgeserve.proxy.upstream``."""

    http_status = 502
    error_type = "server_error"


class UpstreamTimeout(UpstreamError):
    http_status = 504


class BackendError(EdgeserveError):
    pass


class KVStateError(BackendError):
    http_status = 400
    error_type = "invalid_request_error"


class KVCacheFullError(BackendError):
    """The backend's KV memory, shared by its open sequences, has no room for this call; nothing was
    evaluated. The engine answers it by parking a sequence and trying again, so a caller sees it
    only when one sequence alone outgrows the memory."""

    http_status = 503
