"""The lexical prior: a ridge regression of log length on the request's terms, stacked into the trees.

The trees see only a small vocabulary (``FeatureSpec.vocab``); the prior sees ~10k terms (every
word, leading bigram and first word used in at least ``min_groups`` training conversations) and
condenses them into one number, ``intercept + sum of the weights of the terms present``. For the
training rows the prior is predicted out-of-fold (folds by conversation), so the trees learn how
far to trust it on requests it has not seen. Training side only; serving reads the weights from
the spec (``features._prior``).
"""

from __future__ import annotations

import hashlib
import importlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from edgeserve.predictor.data import Example
from edgeserve.predictor.features import request_terms
from edgeserve.predictor.request import to_request

FOLDS = 5


def fit_prior(
    examples: Sequence[Example],
    y: npt.NDArray[np.float64],
    w: npt.NDArray[np.float64],
    *,
    min_groups: int,
    alpha: float,
    seed: int,
) -> tuple[dict[str, float], float, npt.NDArray[np.float64]]:
    """(term weights, intercept, out-of-fold prior of every training example)."""
    # The train extra's scikit-learn (and its scipy) ship no type information: imported by name.
    sparse = importlib.import_module("scipy.sparse")
    Ridge = importlib.import_module("sklearn.linear_model").Ridge

    terms = [request_terms(to_request(list(e.messages))) for e in examples]
    groups: dict[str, set[str]] = defaultdict(set)
    for example, present in zip(examples, terms, strict=True):
        for term in present:
            groups[term].add(example.group)
    vocab = sorted(t for t, g in groups.items() if len(g) >= min_groups)
    column = {t: i for i, t in enumerate(vocab)}
    rows = [r for r, present in enumerate(terms) for t in present if t in column]
    cols = [column[t] for present in terms for t in present if t in column]
    x = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(examples), len(vocab)))

    fold = np.array([_fold(f"{seed}:{e.group}") for e in examples])
    oof = np.empty(len(examples), dtype=np.float64)
    for k in range(FOLDS):
        held = fold == k
        part = Ridge(alpha=alpha, solver="sparse_cg", tol=1e-6).fit(x[~held], y[~held], sample_weight=w[~held])
        oof[held] = part.predict(x[held])
    full = Ridge(alpha=alpha, solver="sparse_cg", tol=1e-6).fit(x, y, sample_weight=w)
    # Weights rounded for a compact artefact; serving and training both use the rounded ones,
    # except for the out-of-fold training column, which no served request ever sees.
    weights = {t: round(float(c), 5) for t, c in zip(vocab, full.coef_, strict=True) if round(float(c), 5)}
    return weights, round(float(full.intercept_), 5), oof


def _fold(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big") % FOLDS
