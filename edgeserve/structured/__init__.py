"""Structured output and tool calling: JSON that follows a schema, and tool calls whose arguments
follow the tool's, enforced while decoding by a logits mask (``grammar.GrammarConstraint``) that
every backend applies before its sampler.

    engine side                          per request
    StructuredOutput(backend)            spec.plan(response_format, tools, tool_choice)
      GrammarCompiler (LRU per grammar)    -> OutputSpec (grammar text, tools)
        Vocabulary (once per model)        -> GrammarConstraint (Request.constraint)
                                         tools.with_tool_calls(result)  (the calls, parsed)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgeserve.backend import Backend
from edgeserve.errors import InvalidParameterError
from edgeserve.structured.grammar import GrammarCompiler, GrammarConstraint, Vocabulary
from edgeserve.structured.spec import OutputSpec, Tool, plan, response_schema
from edgeserve.structured.tools import CallSplitter, instructions, parse_calls, with_tool_calls

__all__ = [
    "CallSplitter",
    "GrammarCompiler",
    "GrammarConstraint",
    "OutputSpec",
    "StructuredOutput",
    "Tool",
    "Vocabulary",
    "expects_calls",
    "parse_calls",
    "plan",
    "response_schema",
    "with_tool_calls",
]


class StructuredOutput:
    """One engine's structured-output state: its model's vocabulary (built on first use) and its
    compiled grammars. Thread-safe; used in callers' threads while requests are prepared."""

    def __init__(self, backend: Backend) -> None:
        caps = backend.capabilities()

        def vocabulary() -> Vocabulary:
            return Vocabulary(
                caps.n_vocab,
                sorted(caps.eog_token_ids),
                caps.bos_token_id,
                backend.detokenize,
                lambda text: backend.tokenize(text, add_bos=False, special=False),
            )

        self.compiler = GrammarCompiler(vocabulary)

    def prepare(
        self,
        response_format: Any,
        tools: Any,
        tool_choice: Any,
        messages: Sequence[Mapping[str, Any]] | None,
    ) -> tuple[OutputSpec | None, list[Mapping[str, Any]] | None]:
        """Validate the request's output fields; returns the spec and the messages to render (the
        tools' instructions first, as a system message). Raises ``InvalidParameterError``."""
        spec = plan(response_format, tools, tool_choice)
        if spec is None or not spec.calls_tools:
            return spec, None if messages is None else list(messages)
        if messages is None:
            raise InvalidParameterError("tools need a chat request (messages, not a prompt)", param="tools")
        from edgeserve.chat import content_text  # chat imports this package's tools module

        text = instructions(spec.tools, spec.choice)
        rest = list(messages)
        # One system message (some templates take only one, and only first): the caller's follows ours.
        if rest and hasattr(rest[0], "get") and rest[0].get("role") in ("system", "developer"):
            text += "\n\n" + content_text(rest.pop(0).get("content"))
        return spec, [{"role": "system", "content": text}, *rest]

    def constraint(self, spec: OutputSpec | None) -> GrammarConstraint | None:
        if spec is None or spec.grammar is None:
            return None
        return self.compiler.constraint(spec.grammar, spec.param)

    def close(self) -> None:
        self.compiler.close()


def expects_calls(tools: Any, tool_choice: Any) -> bool:
    """Whether an answer to a request with these fields may hold tool calls to parse out."""
    return bool(tools) and tool_choice != "none"
