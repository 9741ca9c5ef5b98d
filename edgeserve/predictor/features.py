"""The one feature function, used verbatim by training, evaluation, adaptation and serving.

``featurize(request, spec, out)`` writes one float32 row. Training builds its matrix by calling it
row by row, so a feature cannot be computed one way offline and another way online (the anchor's
first fault). Cost is bounded whatever the prompt size: only the head and tail of the last user
turn are scanned word by word; the rest contributes through C-speed counts.

Row layout (``feature_names(spec)`` names every column)::

    [ dense features (len(DENSE_NAMES)) | learned vocabulary, multi-hot (len(spec.vocab)) ]

One deliberate exception: in the *training* matrix the ``lexical_prior`` column is replaced by
out-of-fold values (stacking, see ``prior``); every other row, served or evaluated, uses this
function's value.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeserve.predictor import lexicon
from edgeserve.predictor.request import PredictorInput, Request, to_request
from edgeserve.predictor.scan import CUE_INDEX, N_VERBS, WordInfo, WordScan, compile_table, scan_words

#: Bump whenever a feature changes meaning; a model trained on another version refuses to load.
FEATURE_SPEC_VERSION = 2

#: Characters scanned from the start and the end of the last user turn. Instructions sit at the
#: ends of a prompt ("Summarize this: <pasted text>", "<pasted text> Rewrite it briefly").
HEAD_CHARS = 600
TAIL_CHARS = 300
#: Words at the start of the turn that also count as bigrams (the phrasing of the request).
BIGRAM_WORDS = 16


DENSE_NAMES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "log_lines",
    "questions",
    "ends_question",
    "ends_colon",
    "code_fences",
    "code_char_ratio",
    "non_ascii_ratio",
    "log_first_line_chars",
    "log_last_line_chars",
    "has_url",
    "yes_no_start",
    "clauses",
    *(f"verb_{v}" for v in (*lexicon.VERBS, "other")),
    *(f"cue_{g}" for g in lexicon.CUE_GROUPS),
    *(f"ask_{u}" for u in lexicon.UNIT_GROUPS),
    "ask_log_tokens",
    "ask_is_ceiling",
    "has_system",
    "system_log_chars",
    "system_cue_brief",
    "system_cue_long",
    "system_cue_format",
    "system_cue_code",
    "system_ask_log_tokens",
    "user_turns",
    "assistant_turns",
    "log_prev_answer_chars",
    "log_mean_answer_chars",
    "log_history_user_chars",
    "media_parts",
    "lexical_prior",
)
N_DENSE = len(DENSE_NAMES)


@dataclass(frozen=True)
class FeatureSpec:
    """What a trained model expects: the feature version and the learned vocabulary.

    ``vocab`` terms are lower-case words, ``"w1 w2"`` bigrams from the start of the turn, and
    ``"^w"`` for the turn's first word. It is chosen on the training split and saved with the model.
    """

    vocab: tuple[str, ...] = ()
    version: int = FEATURE_SPEC_VERSION
    #: The lexical prior (see ``prior``): a weight per term, and the intercept.
    prior: dict[str, float] = field(default_factory=dict, repr=False)
    prior_intercept: float = 0.0
    #: Column of each vocabulary term, and the word table compiled from it (see ``scan``).
    columns: dict[str, int] = field(init=False, repr=False, compare=False)
    table: dict[str, WordInfo] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        columns = {term: N_DENSE + i for i, term in enumerate(self.vocab)}
        object.__setattr__(self, "columns", columns)
        object.__setattr__(self, "table", compile_table(columns))

    @property
    def n_features(self) -> int:
        return N_DENSE + len(self.vocab)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "vocab": list(self.vocab),
            "prior_intercept": self.prior_intercept,
            "prior": self.prior,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeatureSpec:
        return cls(
            vocab=tuple(str(t) for t in data["vocab"]),
            version=int(data["version"]),
            prior={str(t): float(v) for t, v in data.get("prior", {}).items()},
            prior_intercept=float(data.get("prior_intercept", 0.0)),
        )


def feature_names(spec: FeatureSpec) -> list[str]:
    return [*DENSE_NAMES, *(f"term:{t}" for t in spec.vocab)]


def featurize(request: Request, spec: FeatureSpec, out: npt.NDArray[np.float32]) -> None:
    """Write the feature row of ``request`` into ``out`` (shape ``(spec.n_features,)``)."""
    window = _window(request.last_user)
    words = lexicon.WORD_RE.findall(window)
    phrases = _phrase_terms(words)
    scan = scan_words(words, spec.table)
    out[:N_DENSE] = _dense(request, window, words, scan, spec.table, _prior(words, phrases, spec))
    out[N_DENSE:] = 0.0
    for column in scan.columns:
        out[column] = 1.0
    columns = spec.columns
    for term in phrases:
        phrase_column = columns.get(term)
        if phrase_column is not None:
            out[phrase_column] = 1.0


def feature_row(prompt: PredictorInput, spec: FeatureSpec) -> npt.NDArray[np.float32]:
    """Validate and featurize one prompt or message list (a fresh row)."""
    row = np.empty(spec.n_features, dtype=np.float32)
    featurize(to_request(prompt), spec, row)
    return row


def request_terms(request: Request) -> set[str]:
    """Distinct candidate vocabulary terms of a request (what vocabulary selection counts)."""
    words = lexicon.WORD_RE.findall(_window(request.last_user))
    return {*words, *_phrase_terms(words)}


def _code_chars(window: str) -> int:
    # Spelled out: a generator over the characters costs more than the counting itself.
    return (
        window.count("{")
        + window.count("}")
        + window.count(";")
        + window.count("=")
        + window.count("(")
        + window.count(")")
        + window.count("<")
        + window.count(">")
    )


def _phrase_terms(words: Sequence[str]) -> list[str]:
    """The first word (as ``^w``) and the bigrams of the turn's first words: its phrasing."""
    if not words:
        return []
    return ["^" + words[0], *(a + " " + b for a, b in itertools.pairwise(words[:BIGRAM_WORDS]))]


def _window(text: str) -> str:
    if len(text) <= HEAD_CHARS + TAIL_CHARS:
        return text.lower()
    return (text[:HEAD_CHARS] + "\n\n" + text[-TAIL_CHARS:]).lower()


def _dense(
    request: Request, window: str, words: Sequence[str], scan: WordScan, table: dict[str, WordInfo], prior: float
) -> list[float]:
    text = request.last_user
    n = len(text)
    newlines = text.count("\n")
    stripped = window.rstrip()
    first_nl = text.find("\n")
    last_nl = text.rfind("\n")
    w = len(window) or 1
    verbs = [0.0] * (N_VERBS + 1)
    verbs[scan.verb] = 1.0
    row: list[float] = [
        math.log1p(n),
        math.log1p(text.count(" ") + newlines + (1 if n else 0)),
        math.log1p(newlines),
        float(window.count("?")),
        float(stripped.endswith("?")),
        float(stripped.endswith(":")),
        float(text.count("```")),
        _code_chars(window) / w,
        0.0 if window.isascii() else (len(window.encode("utf-8")) - len(window)) / w,
        math.log1p(first_nl if first_nl >= 0 else n),
        math.log1p(n - last_nl - 1 if last_nl >= 0 else n),
        float("http" in window),
        float(bool(words) and words[0] in lexicon.YES_NO_STARTS),
        float(
            window.count(",")
            + window.count(";")
            + window.count(" and ")
            + window.count(" but ")
            + window.count(" because ")
        ),
        *verbs,
        *scan.cues,
        *scan.amount_features(),
        *_system(request.system, table),
    ]
    answers = request.assistant_turns
    row += [
        float(request.user_turns),
        float(answers),
        math.log1p(request.prev_assistant_chars),
        math.log1p(request.assistant_chars / answers) if answers else 0.0,
        math.log1p(request.history_user_chars),
        float(request.media_parts),
        prior,
    ]
    return row


def _prior(words: Sequence[str], phrases: Sequence[str], spec: FeatureSpec) -> float:
    """The lexical prior over the distinct terms ``request_terms`` counts. ``fsum`` is exact, so
    the set's (per-process) iteration order cannot change the result in the last bit."""
    present = filter(None, map(spec.prior.get, {*words, *phrases}))
    return math.fsum((spec.prior_intercept, *present))


def _system(system: str, table: dict[str, WordInfo]) -> list[float]:
    if not system:
        return [0.0] * 7
    scan = scan_words(lexicon.WORD_RE.findall(_window(system)), table)
    return [
        1.0,
        math.log1p(len(system)),
        scan.cues[CUE_INDEX["brief"]],
        scan.cues[CUE_INDEX["long"]],
        scan.cues[CUE_INDEX["format"]],
        scan.cues[CUE_INDEX["code"]],
        math.log1p(scan.ask_tokens),
    ]
