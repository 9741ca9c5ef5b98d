"""edgeserve: run LLMs on your own hardware.

from edgeserve import Engine
with Engine.from_settings() as engine:           # the embedded default model on llama.cpp
    for event in engine.stream("The capital of France is", max_tokens=16):
        ...
"""

import logging

from edgeserve.engine import AsyncRequestHandle, Engine, Handle, RequestHandle
from edgeserve.errors import (
    BackendError,
    BackendNotFoundError,
    BackendNotInstalledError,
    ContextLengthError,
    EdgeserveError,
    EngineClosedError,
    InvalidParameterError,
    KVStateError,
    ModelNotFoundError,
    QueueFullError,
    RequestCancelledError,
    UserError,
)
from edgeserve.settings import EngineSettings, ModelSettings, ServerSettings
from edgeserve.types import (
    Capabilities,
    ErrorEvent,
    FinalEvent,
    FinishReason,
    GenerationResult,
    SamplingParams,
    TokenEvent,
)

# A library prints nothing of its own accord: without this, Python's last-resort handler wrote every
# warning (llama.cpp's load narration among them) to an embedding app's stderr. Apps and the CLI
# configure logging as they like; records still propagate to their handlers.
logging.getLogger("edgeserve").addHandler(logging.NullHandler())

__all__ = [
    "AsyncRequestHandle",
    "BackendError",
    "BackendNotFoundError",
    "BackendNotInstalledError",
    "Capabilities",
    "ContextLengthError",
    "EdgeserveError",
    "Engine",
    "EngineClosedError",
    "EngineSettings",
    "ErrorEvent",
    "FinalEvent",
    "FinishReason",
    "GenerationResult",
    "Handle",
    "InvalidParameterError",
    "KVStateError",
    "ModelNotFoundError",
    "ModelSettings",
    "QueueFullError",
    "RequestCancelledError",
    "RequestHandle",
    "SamplingParams",
    "ServerSettings",
    "TokenEvent",
    "UserError",
]
