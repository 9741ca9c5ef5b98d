"""Where the device takes over from the cloud's text: pure functions of strings and token lists.

The cloud's text is re-tokenized on the device. Its last token may not survive that: a word cut in
the middle tokenizes differently once the rest of it follows. So the device takes every token of
the received text but the last as given (the "covered" text) and generates the rest itself; the
user never sees text twice, nor loses any:

- covered text the user has not seen yet is still shown (paced) before the device's own text;
- text the user has seen beyond the covered part (the ``overlap``) is what the device must
  generate first, and is suppressed from its output rather than shown again.

Invariant: ``committed + to_show + (device text minus overlap)`` is the user's whole answer, and
``covered == committed + to_show`` or ``covered + overlap == committed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Seam:
    #: Cloud tokens the device appends to the prompt as given.
    tokens: list[int]
    #: Their text: a prefix of the received cloud text.
    covered: str
    #: Covered text not yet shown to the user.
    to_show: str
    #: Text already shown beyond the covered part: the device must produce it first.
    overlap: str


def find_seam(
    received: str,
    committed: str,
    tokenize: Callable[[str], list[int]],
    detokenize: Callable[[Sequence[int]], bytes],
) -> Seam:
    """The seam for ``received`` cloud text of which ``committed`` (a prefix) was already shown."""
    if not received.startswith(committed):
        raise ValueError("the shown text must be a prefix of the received text")
    tokens = tokenize(received)[:-1] if received else []
    covered = ""
    while tokens:  # back off further while the text does not round-trip (a split UTF-8 character)
        try:
            covered = detokenize(tokens).decode("utf-8")
        except UnicodeDecodeError:
            covered = ""
        if covered and received.startswith(covered):
            break
        tokens = tokens[:-1]
        covered = ""
    if len(covered) >= len(committed):
        return Seam(tokens, covered, covered[len(committed) :], "")
    return Seam(tokens, covered, "", committed[len(covered) :])


class OverlapFilter:
    """Drops the already-shown ``overlap`` from the start of the device's text.

    If the device's text departs from it (sampling, or a cloud on another model), the rest of the
    device text passes through from the point where it departs and ``diverged`` is set: nothing
    already shown is ever repeated or retracted."""

    def __init__(self, overlap: str) -> None:
        self._left = overlap
        self.diverged = False

    def feed(self, text: str) -> str:
        if not self._left or self.diverged:
            return text
        n = min(len(text), len(self._left))
        if text[:n] == self._left[:n]:
            self._left = self._left[n:]
            return text[n:]
        common = 0
        while common < n and text[common] == self._left[common]:
            common += 1
        self.diverged = True
        self._left = ""
        return text[common:]
