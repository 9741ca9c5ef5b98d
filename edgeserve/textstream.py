"""Token bytes to streamed text, with stop sequences.

Two things make this more than ``"".join``: one token can carry part of a UTF-8 character, and a
stop sequence can span tokens. So bytes go through an incremental decoder, and any tail of the
text that could still grow into a stop sequence is held back until it cannot.

Invariant: the concatenation of everything ``push`` and ``finish`` return is the final text, and it
never contains a stop sequence or any character after one.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._pending = ""  # decoded, not yet released: might be the start of a stop sequence
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Feed one token's bytes; returns text safe to release now (may be empty)."""
        self._pending += self._decoder.decode(data)
        if not self._stop:
            out, self._pending = self._pending, ""
            return out
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = self._held_back()
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return out

    def finish(self) -> str:
        """Release what is held back once generation ends without a stop sequence."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            self._pending = self._pending[:cut]
        out, self._pending = self._pending, ""
        return out

    def _first_stop(self) -> int | None:
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of the pending text that is a proper prefix of a stop sequence."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(s[:k]):
                    best = k
                    break
        return best
