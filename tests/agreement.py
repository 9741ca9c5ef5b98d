"""The cross-backend agreement check, shared by every backend measured against llama.cpp: a fixed
text, and llama.cpp's next-token argmax at each of its positions (teacher forcing)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: The fixed text of the agreement check: plain prose, written for this test.
AGREEMENT_TEXT = (
    "The river rises in the hills to the north of the town and runs south for about forty miles before it "
    "reaches the sea. For most of the year it is slow and shallow, and children wade across it in summer to "
    "reach the meadows on the far bank. In the spring, when the snow on the hills melts, the water comes up "
    "quickly and the old stone bridge has more than once been closed. The town grew up around a mill that "
    "stood beside the bridge. The mill ground wheat for the farms of the valley until the railway arrived, "
    "and with it cheaper flour from the cities. The building still stands, though the wheel is gone, and it "
    "is now a small museum where visitors can see the millstones and read about the families who worked "
    "there. On market days the square in front of the church fills with stalls selling cheese, bread, "
    "vegetables and flowers, and the cafes put their tables out on the pavement. Most of the people who live "
    "in the town today work in the larger city to the south, and they travel there each morning by train. "
    "The station is a short walk from the square, and the first train leaves a little after six o'clock."
)
AGREEMENT_MIN = 0.95


def llama_cpp_argmax(gguf_path: Path, tokens: Sequence[int]) -> np.ndarray[Any, Any]:
    """llama.cpp's predicted next token after each prefix of ``tokens``, from one pass over them."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(gguf_path), n_ctx=1024, n_batch=512, n_threads=1, logits_all=True, verbose=False
    )
    try:
        llm.eval(list(tokens))
        return np.asarray(llm.scores[: len(tokens)]).argmax(axis=-1)
    finally:
        llm.close()
