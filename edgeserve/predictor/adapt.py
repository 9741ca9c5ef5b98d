"""Online adaptation: log what the served model really answered, then fit a correction.

The shipped predictor learned ChatGPT's answer lengths; the model edgeserve serves answers
differently. Serving code records (feature row, actual output tokens) per finished request in a
JSON-lines log (opt-in; the prompt text is stored only if asked for). ``adapt`` then refits the
model on its ShareGPT training split plus the logged rows, each logged row weighted like many
ShareGPT pairs, with the base's feature spec and settings. The result is an ordinary artefact that
serves exactly like the shipped one. Adapting an adapted artefact starts again from ShareGPT plus
the log given, so keep one growing log rather than a log per round.

(A correction fitted on the log alone, small trees on the base's residuals or a ridge, gained
nothing on 250 records when tried during development; refitting with the log weighted did, and
bench/predictor_eval.py measures that.)

Log line::

    {"v": 1, "spec": "<feature spec digest>", "x": {"<column>": value, ...}, "tokens": 412}
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeserve.errors import InvalidParameterError
from edgeserve.predictor.features import FeatureSpec, feature_row
from edgeserve.predictor.model import Calibration, LengthPredictor
from edgeserve.predictor.request import PredictorInput
from edgeserve.predictor.train import Dataset, NoProgress, Prepared, Progress, TrainConfig, evaluate, fit, prepare

LOG_VERSION = 1


def spec_digest(spec: FeatureSpec) -> str:
    """Identifies the feature layout a row was computed with; rows from another layout are skipped."""
    return hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True).encode()).hexdigest()[:16]


class AdaptationLog:
    """Append-only record of served requests' real answer lengths. Thread-safe.

    ``record`` takes the prompt (featurized here with the predictor's spec) or a feature row the
    caller already has. Prompt text is written only with ``store_prompts=True``.
    """

    def __init__(self, path: str | Path, spec: FeatureSpec, *, store_prompts: bool = False) -> None:
        self.path = Path(path)
        self.spec = spec
        self.store_prompts = store_prompts
        self._digest = spec_digest(spec)
        self._lock = threading.Lock()

    def record(self, request: PredictorInput | npt.NDArray[np.float32], actual_tokens: int) -> None:
        if not isinstance(actual_tokens, int) or isinstance(actual_tokens, bool) or actual_tokens < 0:
            raise InvalidParameterError("actual_tokens must be an integer >= 0", param="actual_tokens")
        if isinstance(request, np.ndarray):
            row = request
            if row.shape != (self.spec.n_features,):
                raise InvalidParameterError(
                    f"feature row must have shape ({self.spec.n_features},), got {row.shape}", param="features"
                )
        else:
            row = feature_row(request, self.spec)
        entry: dict[str, Any] = {
            "v": LOG_VERSION,
            "spec": self._digest,
            "x": {str(i): float(row[i]) for i in np.flatnonzero(row)},
            "tokens": actual_tokens,
            "t": round(time.time(), 3),
        }
        if self.store_prompts and not isinstance(request, np.ndarray):
            entry["prompt"] = request
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)


def read_log(path: str | Path, spec: FeatureSpec) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64], int]:
    """Rows and token counts of every usable line; also how many lines were skipped."""
    digest = spec_digest(spec)
    rows: list[npt.NDArray[np.float32]] = []
    tokens: list[float] = []
    skipped = 0
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
                if entry.get("v") != LOG_VERSION or entry.get("spec") != digest:
                    raise ValueError("other feature layout")
                row = np.zeros(spec.n_features, dtype=np.float32)
                for column, value in entry["x"].items():
                    row[int(column)] = float(value)
                n = int(entry["tokens"])
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                skipped += 1
                continue
            rows.append(row)
            tokens.append(float(n))
    x = np.stack(rows) if rows else np.zeros((0, spec.n_features), dtype=np.float32)
    return x, np.asarray(tokens, dtype=np.float64), skipped


@dataclass(frozen=True)
class AdaptConfig:
    #: Weight of one logged request relative to one ShareGPT pair (pair weights average 1). At 20,
    #: 250 logged requests carry about a tenth of the total weight: enough to move the model where
    #: the served model differs, too little to forget what ShareGPT taught.
    log_weight: float = 20.0
    #: Fewer usable log lines than this and ``adapt`` refuses (the refit would learn noise).
    min_records: int = 50


@dataclass
class AdaptResult:
    onnx_bytes: bytes
    meta: dict[str, Any]


def adapt(
    base: LengthPredictor,
    x: npt.NDArray[np.float32],
    tokens: npt.NDArray[np.float64],
    config: AdaptConfig,
    *,
    prepared: Prepared | None = None,
    progress: Progress | None = None,
    sharegpt: Path | None = None,
) -> AdaptResult:
    """Refit ``base``'s model on its own training data plus the logged rows, weighted.

    The feature spec (vocabulary included) stays the base's, since logged rows were computed with
    it. ``prepared`` lets a caller that adapts many times (the evaluation) featurize ShareGPT once.
    """
    from edgeserve.predictor.export import booster_to_onnx

    if len(tokens) < config.min_records:
        raise InvalidParameterError(
            f"the log has {len(tokens)} usable records; adaptation needs at least {config.min_records}",
            param="log",
        )
    progress = progress or NoProgress()
    train_config = TrainConfig(**base.meta["model"]["config"])
    data = prepared or prepare(train_config, progress, sharegpt, spec=base.spec)
    if data.spec != base.spec:
        raise InvalidParameterError("prepared data was featurized with another feature spec", param="prepared")
    y = np.log1p(tokens)
    combined = Dataset(
        examples=[],
        x=np.vstack([data.train.x, x]),
        y=np.concatenate([data.train.y, y]),
        w=np.concatenate([data.train.w, np.full(len(y), config.log_weight)]),
    )
    model = fit(combined, train_config, progress)
    log_scores = model.predict(x).astype(np.float64)
    # The smearing factor comes from the served model's lengths (in-sample: a few hundred records
    # are too few to hold some out).
    calibration = Calibration.from_smearing(float(np.mean(np.exp(y - log_scores))))
    meta = dict(base.meta)
    meta["calibration"] = calibration.to_json()
    meta["adaptation"] = {
        "records": len(y),
        "config": asdict(config),
        "sharegpt_test_after": evaluate(model.predict(data.test.x).astype(np.float64), data.test.tokens, calibration),
    }
    return AdaptResult(onnx_bytes=booster_to_onnx(model, data.spec.n_features), meta=meta)


def adapt_log(
    base: LengthPredictor,
    log: str | Path,
    config: AdaptConfig,
    *,
    progress: Progress | None = None,
    sharegpt: Path | None = None,
) -> AdaptResult:
    """``adapt`` on every usable line of a log written by ``AdaptationLog``."""
    x, tokens, skipped = read_log(log, base.spec)
    result = adapt(base, x, tokens, config, progress=progress, sharegpt=sharegpt)
    result.meta["adaptation"]["log"] = str(log)
    result.meta["adaptation"]["skipped_lines"] = skipped
    return result
