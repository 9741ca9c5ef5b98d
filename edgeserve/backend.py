"""The backend seam: a small Protocol and a registry that imports a backend only when it is chosen.

A backend owns one loaded model and is driven by exactly one thread (the engine loop), so it needs
no locking. It does the model's work (tokens in, tokens out); the engine does everything around it
(stop sequences, text streaming, timing, cancellation, queueing).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from edgeserve.errors import BackendNotFoundError, BackendNotInstalledError
from edgeserve.types import Capabilities, ResolvedModel, SamplingParams

if TYPE_CHECKING:
    from edgeserve.settings import ModelSettings


class Backend(Protocol):
    def capabilities(self) -> Capabilities: ...

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        """Text to token ids. Special-token text (``<start_of_turn>``) is parsed as special tokens,
        because rendered chat templates contain it."""
        ...

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        """Token ids to bytes. Bytes, not text: one token may hold part of a UTF-8 character."""
        ...

    def prefill(self, prompt: Sequence[int], *, reuse: bool = True) -> int:
        """Evaluate ``prompt`` so that the next token can be sampled. With ``reuse``, keeps the
        longest prefix already in the KV cache; returns how many prompt tokens it reused.

        ``reuse=False`` evaluates from scratch: the path a seeded request takes, because llama.cpp's
        kernels are not batch-invariant (the logits of a prompt evaluated in one batch and of the
        same prompt evaluated as cached prefix + suffix differ), and a seed promises the same text.
        """
        ...

    def decode(self, params: SamplingParams) -> Iterator[int]:
        """Sample a token, yield it, evaluate it, repeat, until the consumer stops iterating.

        The backend never stops by itself: end-of-generation, stop sequences and max_tokens are
        the engine's decisions. Closing the iterator cancels within one decode step.
        """
        ...

    def export_state(self) -> bytes:
        """The KV state of every token evaluated so far, as an opaque blob."""
        ...

    def import_state(self, blob: bytes) -> list[int]:
        """Load a blob from ``export_state`` (possibly from another process) and return the tokens it
        covers. A following ``prefill`` of those tokens (plus more) reuses it."""
        ...

    def close(self) -> None: ...


class BackendLoader(Protocol):
    def __call__(self, model: ResolvedModel, settings: ModelSettings) -> Backend: ...


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str
    #: The import that must succeed for this backend to work, and the extra that brings it.
    requires: str
    extra: str
    description: str

    def installed(self) -> bool:
        return importlib.util.find_spec(self.requires) is not None


#: Backends by the name used on the command line. The module is imported only when chosen.
REGISTRY: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("llama", "edgeserve.backends.llama", "llama_cpp", "llama", "llama.cpp (llama-cpp-python)"),
        BackendSpec("mlx", "edgeserve.backends.mlx", "mlx_lm", "mlx", "MLX (mlx-lm)"),
        BackendSpec("onnx", "edgeserve.backends.onnx", "onnxruntime_genai", "onnx", "ONNX Runtime GenAI"),
    )
}


def get_spec(name: str) -> BackendSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise BackendNotFoundError(f"unknown backend {name!r}; choose one of: {known}") from None


def load_backend(name: str, model: ResolvedModel, settings: ModelSettings) -> Backend:
    """Import the named backend's module and load the model with it."""
    spec = get_spec(name)
    if not spec.installed():
        raise BackendNotInstalledError(
            f"backend {spec.name!r} ({spec.description}) is not installed: pip install 'edgeserve[{spec.extra}]'"
        )
    module = importlib.import_module(spec.module)
    loader: BackendLoader = module.load
    return loader(model, settings)
