"""One pass over a window's words that fills every word-level feature.

Per word, one dict lookup in a table compiled once per model (lexicon cues, task verbs, number
words, units and the learned vocabulary merged); words in none of them, the common case, cost just
that lookup. This keeps the predict call within tens of microseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from edgeserve.predictor import lexicon

#: Per word: (vocab column or -1, cue group or -1, phrase continuations, number value, unit, verb rank or -1).
#: A unit is (unit group index, answer tokens per unit); phrases are (following words, cue group).
WordInfo: TypeAlias = tuple[int, int, tuple[tuple[tuple[str, ...], int], ...], float, "tuple[int, float] | None", int]

N_CUES = len(lexicon.CUE_GROUPS)
N_UNITS = len(lexicon.UNIT_GROUPS)
N_VERBS = len(lexicon.VERBS)
CUE_INDEX = {g: i for i, g in enumerate(lexicon.CUE_GROUPS)}
_UNIT_INDEX = {u: i for i, u in enumerate(lexicon.UNIT_GROUPS)}


def compile_table(vocab_columns: dict[str, int]) -> dict[str, WordInfo]:
    """Merge the static lexicon with a model's single-word vocabulary columns."""
    words: set[str] = set(lexicon.CUE_WORDS) | set(lexicon.CUE_PHRASES) | set(lexicon.NUMBER_WORDS)
    words |= set(lexicon.UNITS) | set(lexicon.VERBS)
    words |= {t for t in vocab_columns if " " not in t and not t.startswith("^")}
    verb_rank = {v: i for i, v in enumerate(lexicon.VERBS)}
    table: dict[str, WordInfo] = {}
    for word in words:
        group = lexicon.CUE_WORDS.get(word)
        unit = lexicon.UNITS.get(word)
        phrases = tuple((rest, CUE_INDEX[g]) for rest, g in lexicon.CUE_PHRASES.get(word, ()))
        table[word] = (
            vocab_columns.get(word, -1),
            CUE_INDEX[group] if group is not None else -1,
            phrases,
            lexicon.number_value(word),
            (_UNIT_INDEX[unit[0]], unit[1]) if unit is not None else None,
            verb_rank.get(word, -1),
        )
    return table


@dataclass(slots=True)
class WordScan:
    """What a scan found."""

    #: Count per cue group (``lexicon.CUE_GROUPS`` order).
    cues: list[float]
    #: Largest requested amount per unit group (``lexicon.UNIT_GROUPS`` order).
    amounts: list[float]
    #: Rough answer tokens of the largest request, and whether it is a ceiling ("under 100 words").
    ask_tokens: float
    ask_ceiling: float
    #: Rank of the first task verb in the anchor's priority order (``N_VERBS`` for none).
    verb: int
    #: Vocabulary columns of the single words seen.
    columns: list[int]

    def amount_features(self) -> list[float]:
        return [math.log1p(v) for v in self.amounts] + [math.log1p(self.ask_tokens), self.ask_ceiling]


def scan_words(words: Sequence[str], table: dict[str, WordInfo]) -> WordScan:
    cues = [0.0] * N_CUES
    amounts = [0.0] * N_UNITS
    tokens = ceiling = 0.0
    verb = N_VERBS
    columns: list[int] = []
    n = len(words)
    skip_to = 0
    no_phrases: tuple[tuple[tuple[str, ...], int], ...] = ()
    for i, word in enumerate(words):
        info = table.get(word)
        if info is None:
            if not word.isdigit():
                continue
            number, column, cue, phrases, v = lexicon.number_value(word), -1, -1, no_phrases, -1
        else:
            column, cue, phrases, number, _, v = info
        if column >= 0:
            columns.append(column)
        if v >= 0 and v < verb:
            verb = v
        if i >= skip_to:
            # A phrase ("in detail") counts once, as itself, not again through its words.
            for rest, group in phrases:
                if tuple(words[i + 1 : i + 1 + len(rest)]) == rest:
                    cues[group] += 1.0
                    skip_to = i + 1 + len(rest)
                    break
            else:
                if cue >= 0:
                    cues[cue] += 1.0
        if number:
            unit = _unit_after(words, i, n, table)
            if unit is not None:
                slot, per_unit = unit
                if number > amounts[slot]:
                    amounts[slot] = number
                if number * per_unit > tokens:
                    tokens = number * per_unit
                    ceiling = 1.0 if i and words[i - 1] in lexicon.CEILING_WORDS else 0.0
    return WordScan(cues, amounts, tokens, ceiling, verb, columns)


def _unit_after(words: Sequence[str], i: int, n: int, table: dict[str, WordInfo]) -> tuple[int, float] | None:
    # The unit may follow directly ("5 ideas") or after one word ("5 short ideas", "500-word essay"
    # splits as "500", "word").
    for j in (i + 1, i + 2):
        if j < n:
            info = table.get(words[j])
            if info is not None and info[4] is not None:
                return info[4]
    return None
