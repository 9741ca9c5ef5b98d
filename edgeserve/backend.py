"""The backend seam: a small Protocol and a registry that imports a backend only when it is chosen.

A backend owns one loaded model and is driven by exactly one thread (the engine loop), so it needs
no locking. It does the model's work (tokens in, tokens out, on named sequences); the engine does
everything around it (stop sequences, text streaming, timing, cancellation, queueing, preemption).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np

from edgeserve.errors import BackendNotFoundError, BackendNotInstalledError
from edgeserve.types import Capabilities, ResolvedModel, SamplingParams

if TYPE_CHECKING:
    from edgeserve.progress import ProgressCallback
    from edgeserve.settings import ModelSettings


SeqId: TypeAlias = int


class Sampler(Protocol):
    """One request's token picker and its state (random generator, penalty history). Made by the
    backend (llama.cpp runs its native chain; MLX and ONNX Runtime share ``edgeserve.sampling``),
    owned by the request, so it survives a pause: a parked request resumes drawing where it stopped."""

    def close(self) -> None: ...


class Constraint(Protocol):
    """A request's output constraint (structured output): which tokens may come next. Request
    state like the sampler, so it survives a park untouched; the engine advances it."""

    def mask(self, logits: np.ndarray[Any, np.dtype[np.float32]]) -> None:
        """Set the logits of every token forbidden next to -inf, in place (one [n_vocab] row)."""
        ...

    def accept(self, token: int) -> None:
        """Advance past a picked token (never an end-of-generation one)."""
        ...

    @property
    def done(self) -> bool:
        """The constrained text is complete: the answer ends here."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Step:
    """One sequence's share of a decode call: evaluate ``token`` at the end of sequence ``seq``,
    then pick the token after it with ``sampler``, among the tokens ``constraint`` allows."""

    seq: SeqId
    token: int
    sampler: Sampler
    constraint: Constraint | None = None


class Backend(Protocol):
    """The model's work, on named sequences. A sequence is one request's KV state; the engine names
    it, and at most ``capabilities().max_sequences`` are open at once (parked ones do not count).

    A request's life on it: ``open`` (keep a cached prefix), ``prefill`` the prompt but its last
    token in chunks, then ``decode`` steps (the first evaluates the prompt's last token) until the
    engine stops; ``release`` at the end. Between any two calls the engine may ``park`` a sequence
    (its KV state to host bytes; the slot is freed) and later ``restore`` it, to continue exactly
    where it was: a token that was sampled but not evaluated is the engine's, not the backend's, so
    no logits need to survive a park (llama.cpp keeps none in its state).

    Where the open sequences share one KV memory smaller than ``max_sequences`` full contexts,
    ``prefill``, ``decode`` and ``restore`` raise ``KVCacheFullError`` when it has no room, having
    changed nothing; the engine then parks a sequence and calls again.
    """

    def capabilities(self) -> Capabilities: ...

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        """Text to token ids. With ``special``, special-token text (``<start_of_turn>``) becomes
        special tokens (a rendered chat template's markers); without, it is plain text (user content:
        a user must not be able to forge a turn)."""
        ...

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        """Token ids to bytes. Bytes, not text: one token may hold part of a UTF-8 character."""
        ...

    def sampler(self, params: SamplingParams) -> Sampler:
        """A fresh sampler for one request."""
        ...

    def open(self, seq: SeqId, prompt: Sequence[int], *, reuse: bool = True) -> int:
        """Open sequence ``seq`` for ``prompt``, keeping the longest prefix of it (never the last
        token) whose KV state the backend still holds from a released sequence; returns how many
        tokens that is. Nothing is evaluated.

        ``reuse=False`` keeps nothing: the path a seeded request takes, because kernels are not
        batch-invariant (a prompt evaluated in one batch and the same prompt as cached prefix +
        suffix give different logits), and a seed promises the same text.
        """
        ...

    def prefill(self, seq: SeqId, tokens: Sequence[int]) -> None:
        """Evaluate ``tokens`` at the end of an open sequence (no logits are needed)."""
        ...

    def decode(self, steps: Sequence[Step]) -> list[int]:
        """For each step, evaluate its token and pick the next (after ``step.constraint.mask`` on
        its logits, when it has one); returns the picked tokens in order. One call may carry
        several sequences (a batching backend evaluates them together)."""
        ...

    def park(self, seq: SeqId) -> bytes:
        """Move an open sequence's KV state to host memory as bytes and close it (its slot is free).
        The blob is self-describing (model fingerprint, tokens) and can also leave the process."""
        ...

    def restore(self, seq: SeqId, blob: bytes) -> list[int]:
        """Open ``seq`` from a blob of ``park`` (possibly from another process); returns the tokens
        its KV state covers. ``KVStateError`` if the blob does not fit this model."""
        ...

    def release(self, seq: SeqId) -> None:
        """Close a sequence. Its KV state may stay as a prefix cache for a later ``open``."""
        ...

    def close(self) -> None: ...


class BackendLoader(Protocol):
    def __call__(
        self, model: ResolvedModel, settings: ModelSettings, progress: ProgressCallback | None = None
    ) -> Backend: ...


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str
    #: The import that must succeed for this backend to work, and the extra that brings it.
    requires: str
    extra: str
    description: str
    #: The module's function listing the execution providers it can run, best first ("" if none).
    providers_function: str = ""

    def installed(self) -> bool:
        return importlib.util.find_spec(self.requires) is not None

    def providers(self) -> list[str]:
        """Execution providers compiled into this backend's runtime, best first; empty when it has
        none to choose from or is not installed. Imports the backend module only when asked."""
        if not self.providers_function or not self.installed():
            return []
        listed: list[str] = getattr(importlib.import_module(self.module), self.providers_function)()
        return listed


#: Backends by the name used on the command line. The module is imported only when chosen.
REGISTRY: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("llama", "edgeserve.backends.llama", "llama_cpp", "llama", "llama.cpp (llama-cpp-python)"),
        BackendSpec("mlx", "edgeserve.backends.mlx", "mlx_lm", "mlx", "MLX (mlx-lm)"),
        BackendSpec(
            "onnx", "edgeserve.backends.onnx", "onnxruntime_genai", "onnx", "ONNX Runtime GenAI", "execution_providers"
        ),
    )
}


def get_spec(name: str) -> BackendSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise BackendNotFoundError(f"unknown backend {name!r}; choose one of: {known}") from None


def load_backend(
    name: str, model: ResolvedModel, settings: ModelSettings, progress: ProgressCallback | None = None
) -> Backend:
    """Import the named backend's module and load the model with it (``progress`` hears about a
    first-use conversion)."""
    spec = get_spec(name)
    if not spec.installed():
        raise BackendNotInstalledError(
            f"backend {spec.name!r} ({spec.description}) is not installed: pip install 'edgeserve[{spec.extra}]'"
        )
    module = importlib.import_module(spec.module)
    loader: BackendLoader = module.load
    return loader(model, settings, progress)
