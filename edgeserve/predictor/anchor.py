"""The Clairvoyant anchor's 19 lexical features, re-implemented from its description for comparison.

Only the evaluation uses this (``bench/predictor_eval.py``): it trains the anchor's model (a
3-class XGBoost, 300 trees of depth 6) on the same ShareGPT split as edgeserve's and scores it on
the same test sets. As in the anchor, only the last user message is read, as a string. Unlike the
anchor, the same function computes the features for training and for testing.
"""

from __future__ import annotations

import re

import numpy as np
import numpy.typing as npt

from edgeserve.predictor.request import PredictorInput, to_request

VERBS = ("what", "write", "explain", "summarize", "how", "list", "implement", "compare", "describe",
         "generate", "why", "define")  # fmt: skip
# fmt: off
CODE_WORDS = frozenset({"code", "function", "def", "class", "script", "program", "implement", "algorithm",
                        "debug", "refactor", "import", "variable", "loop", "recursion", "api", "sql", "regex"})
# fmt: on
FORMAT_WORDS = ("list", "table", "bullet", "step by step", "enumerate", "outline", "numbered", "format", "structure")
LENGTH_CONSTRAINT = re.compile(
    r"\bin\s+\d+\s+(?:words?|sentences?)\b|\bno\s+more\s+than\s+\d+|\bunder\s+\d+\s+words?\b"
    r"|\bbriefly\b|\bconcisely\b|\bshortly\b|\bone[\s-]liner\b|\btl;?dr\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"\w+")
N_FEATURES = 6 + len(VERBS) + 1


def anchor_features(prompt: PredictorInput) -> npt.NDArray[np.float32]:
    text = to_request(prompt).last_user
    lower = text.lower()
    words = set(_WORD.findall(lower))
    row = np.zeros(N_FEATURES, dtype=np.float32)
    row[0] = len(text) / 4.0  # the "approximate prompt tokens"
    row[1] = float(bool(words & CODE_WORDS))
    row[2] = float(bool(LENGTH_CONSTRAINT.search(text)))
    row[3] = float(text.rstrip().endswith("?"))
    row[4] = float(any(k in lower for k in FORMAT_WORDS))
    row[5] = float(
        text.count(",") + text.count(";") + text.count(" and ") + text.count(" but ") + text.count(" because ")
    )
    verb = next((i for i, v in enumerate(VERBS) if v in words), len(VERBS))
    row[6 + verb] = 1.0
    return row
